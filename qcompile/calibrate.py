"""Calibration: run the float model in ONNX Runtime with every observed tensor exposed as an output, and stream
each value into its observer (bounded memory: observers keep histograms, never tensors).

The augmented model is the current graph with extra outputs; graph optimizations are off so the observed values
are exactly what the float graph computes. Samples run one at a time (batch 1, as in deployment).
"""
from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from tqdm import tqdm

from qcompile import numerics
from qcompile.errors import CalibrationError
from qcompile import ir
from qcompile.ir import outer_inputs, to_model
from qcompile.match import is_float

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TensorRange:
    lo: float
    hi: float
    stats: dict = field(default_factory=dict)

    @property
    def has_sentinels(self) -> bool:
        """True when the tensor carried mask sentinels (|x| >= 1e30) or non-finite values."""
        return bool(self.stats.get("n_sentinel", 0) or self.stats.get("n_nonfinite", 0))


@dataclass
class CalibrationTable:
    ranges: dict[str, TensorRange] = field(default_factory=dict)
    num_samples: int = 0
    untaken: list[str] = field(default_factory=list)  # If branches no calibration sample took

    def __contains__(self, name: str) -> bool:
        return name in self.ranges

    def __getitem__(self, name: str) -> TensorRange:
        return self.ranges[name]

    def to_dict(self) -> dict:
        return {"num_samples": self.num_samples, "untaken_branches": list(self.untaken),
                "ranges": {k: {"lo": v.lo, "hi": v.hi, **v.stats} for k, v in sorted(self.ranges.items())}}


def float_activations(graph: gs.Graph) -> list[str]:
    """Names of float tensors computed at run time in the top-level graph (graph inputs included)."""
    names = [t.name for t in graph.inputs if is_float(t)]
    seen = set(names)
    for node in graph.nodes:
        for t in node.outputs:
            if isinstance(t, gs.Variable) and t.name and t.name not in seen and is_float(t):
                names.append(t.name)
                seen.add(t.name)
    return names


def augmented_model(graph: gs.Graph, header: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    model = to_model(graph.copy(), header)
    existing = {o.name for o in model.graph.output}
    tensors = graph.tensors()
    for name in names:
        if name not in existing:
            dt = tensors[name].dtype if name in tensors and tensors[name].dtype is not None else np.float32
            elem = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dt))
            model.graph.output.append(onnx.helper.make_tensor_value_info(name, elem, None))
    return model


def activations(graph: gs.Graph, header: onnx.ModelProto, samples: Iterable[dict[str, np.ndarray]],
                names: Sequence[str]) -> Iterable[dict[str, np.ndarray]]:
    """The float values of `names`, one dict per sample (ORT, graph optimizations off): what passes that need
    activation statistics (smoothing, reparameterization) read."""
    sess = numerics.session(augmented_model(graph, header, names), optimize=False)
    for feeds in samples:
        yield numerics.run(sess, feeds, list(names))


def channel_absmax(graph: gs.Graph, header: onnx.ModelProto, samples: Iterable[dict[str, np.ndarray]],
                   names: Sequence[str], axis: int) -> dict[str, np.ndarray]:
    """max |x| per channel (along `axis`) of each tensor in `names` over `samples`; non-finite values count as 0."""
    amax: dict[str, np.ndarray] = {}
    for values in activations(graph, header, samples, names):
        for n, v in values.items():
            v = np.abs(np.asarray(v, np.float64))
            v = np.where(np.isfinite(v), v, 0.0)
            v = v.max(axis=tuple(i for i in range(v.ndim) if i != axis % v.ndim))
            amax[n] = v if n not in amax else np.maximum(amax[n], v)
    return amax


def calibrate(graph: gs.Graph, header: onnx.ModelProto, samples: Iterable[dict[str, np.ndarray]],
              names: Sequence[str], make_observer: Callable[[str], object],
              progress: bool | None = None) -> CalibrationTable:
    """Observe `names` over `samples`; `make_observer(tensor_name)` gives each tensor its observer."""
    samples = list(samples)
    if not samples:
        raise CalibrationError("no calibration samples")
    names = [n for n in names]
    branches = list(_top_level_branches(graph))
    capture = list(dict.fromkeys([t.name for node, _, b in branches for t in [node.inputs[0], *outer_inputs(b)]
                                  if t.name not in names and t not in graph.inputs]))
    model = augmented_model(graph, header, names + capture)
    sess = numerics.session(model, optimize=False, threads=os.cpu_count() or 1)
    observers = {n: make_observer(n) for n in names}
    branch_feeds: dict[tuple[str, str], list[dict]] = {(n.name, k): [] for n, k, _ in branches}
    if progress is None:
        progress = sys.stderr.isatty() and not os.environ.get("CI")
    for feeds in tqdm(samples, desc="calibrating", unit="sample", disable=not progress, leave=False):
        try:
            values = {**feeds, **numerics.run(sess, feeds, [n for n in names + capture if n not in feeds])}
        except Exception as exc:  # numerics.run's ModelError, or a feed ORT refuses
            why = str(exc).splitlines()[0].removeprefix(numerics.RUN_FAILED)
            raise CalibrationError(f"ONNX Runtime failed on a calibration sample: {why}") from None
        for n in names:
            observers[n].update(values[n])
        for node, key, branch in branches:  # the feeds of every If branch this sample takes
            if bool(np.asarray(values[node.inputs[0].name]).reshape(-1)[0]) == (key == "then_branch"):
                branch_feeds[(node.name, key)].append({t.name: values[t.name] for t in outer_inputs(branch)})
    table = CalibrationTable(num_samples=len(samples))
    for n, obs in observers.items():
        lo, hi = obs.compute_range()
        table.ranges[n] = TensorRange(float(lo), float(hi), dict(obs.stats))
    for node, key, branch in branches:
        feeds = branch_feeds[(node.name, key)]
        if not feeds:
            table.untaken.append(f"{node.name}.{key}")
            continue
        sub = ir.to_graph(onnx.shape_inference.infer_shapes(ir.branch_as_model(branch, header)))
        part = calibrate(sub, header, feeds, float_activations(sub), make_observer, progress=False)
        table.ranges.update({k: v for k, v in part.ranges.items() if k not in table.ranges})
        table.untaken.extend(part.untaken)
    logger.info("calibrated %d tensors on %d samples", len(table.ranges), len(samples))
    return table


def _top_level_branches(graph: gs.Graph):
    for node in graph.nodes:
        if node.op == "If":
            for key in ("then_branch", "else_branch"):
                if isinstance(node.attrs.get(key), gs.Graph):
                    yield node, key, node.attrs[key]
