"""Mixed precision for insert_qdq: keep the layers float that cost the most accuracy, or that ONNX Runtime runs
slower quantized, measured on the actual model (``insert_qdq``'s ``accuracy`` and ``latency`` options).

Variants are the same insert_qdq run with ``overrides: {node: {quantize: false}}`` added for the layers kept float
(so a float layer is exactly the original float op, with no Q/DQ of its own), run in ONNX Runtime with all graph
optimizations on (as deployed: integer kernels, 1 thread) on the first calibration samples.

Accuracy (``accuracy: {metric, target, max_float_fraction, samples}``):

- ``metric: agreement``: the fraction of samples whose every output agrees with float. An output of class scores
  (:func:`class_outputs`: made by Softmax/LogSoftmax, or [N, C] logits of a Gemm/MatMul/Add head) agrees when the
  argmax along its last axis is equal at every position (the predicted class, each CTC time step's symbol, each
  token), keeping at least ``margin`` of float's lead over the runner-up; any other output (a map, boxes, an
  embedding) when its SQNR is at least ``sqnr_floor`` dB; integer outputs when equal. Recurrent-state outputs
  (:func:`state_outputs`: shaped like a graph input, fed back by the caller) are judged through the outputs they
  drive; their drift over many steps is not measured here. ``metric: output_sqnr``: the smallest SQNR (dB) over
  outputs, all samples together.
- Sensitivity of layer L = metric(all quantized but L) - metric(all quantized), one variant per quantized layer
  (NNCF's accuracy-aware ranking: the gain of reverting one layer). The table goes to the report, sorted.
- Search: the k most sensitive layers (ties: finer position-level agreement, then output SQNR gain) are kept float
  for k = 1, 2, ..., re-measuring the combined model each time (sensitivities are not additive), until the target
  holds or ``max_float_fraction`` of the quantized layers is float; the best k measured wins (then the report says
  the target was not reached, with the best metric found).

Latency (``latency: {max_ratio, runs}``): the quantized layers, in topological order, are cut into regions of
consecutive layers; each region is timed kept float against the model with it quantized (interleaved medians); a
region whose float variant is faster by more than the noise margin stays float (reason in the report). Then the
whole model is timed against float: unless it is measurably within ``max_ratio`` (its ratio at most ``max_ratio -
margin``), every layer is kept float (quantizing that model costs accuracy and buys no time in ONNX Runtime), with
the reason. The ratio goes to the report.
"""
from __future__ import annotations

import logging
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from qcompile import numerics
from qcompile.errors import ConfigError
from qcompile.ir import iter_graphs, to_model
from qcompile.pass_infra import PassResult
from qcompile.types import ConfigBase

logger = logging.getLogger(__name__)

Feeds = dict[str, np.ndarray]


@dataclass(frozen=True)
class AccuracyConfig(ConfigBase):
    metric: str = "agreement"
    target: float = 1.0
    max_float_fraction: float = 0.25
    samples: int = 32
    sqnr_floor: float = 30.0
    margin: float = 0.0  # a class position agrees only if it keeps this fraction of float's top-1 margin

    def validate(self) -> None:
        if self.metric not in ("agreement", "output_sqnr"):
            raise ConfigError(f"insert_qdq.accuracy.metric must be agreement or output_sqnr, got {self.metric!r}")
        if self.metric == "agreement" and not 0.0 <= self.target <= 1.0:
            raise ConfigError(f"insert_qdq.accuracy.target (agreement) must be in [0, 1], got {self.target}")
        if not 0.0 <= self.margin < 1.0:
            raise ConfigError(f"insert_qdq.accuracy.margin must be in [0, 1), got {self.margin}")
        if not 0.0 <= self.max_float_fraction <= 1.0 or self.samples < 1:
            raise ConfigError("insert_qdq.accuracy: max_float_fraction in [0, 1] and samples >= 1")


@dataclass(frozen=True)
class LatencyConfig(ConfigBase):
    max_ratio: float = 1.0
    runs: int = 30
    regions: int = 8
    margin: float = 0.03  # a float region must be this much faster (fraction of the model's time) to stay float

    def validate(self) -> None:
        if self.max_ratio <= 0 or self.runs < 3 or self.regions < 1 or not 0 <= self.margin < 1:
            raise ConfigError("insert_qdq.latency: max_ratio > 0, runs >= 3, regions >= 1, margin in [0, 1)")


def quantized_layers(graph: gs.Graph, ops: Sequence[str]) -> list[str]:
    """Nodes of `ops` (insert_qdq's compute and chain ops) that read a DequantizeLinear output, in topological order
    (every subgraph included): each one an insert_qdq override can keep float."""
    out = []
    for g in iter_graphs(graph):
        for n in g.nodes:
            if n.op in ops and any(t.inputs and t.inputs[0].op == "DequantizeLinear" for t in n.inputs):
                out.append(n.name)
    return out


def _run(model: onnx.ModelProto, samples: list[Feeds]) -> list[dict[str, np.ndarray]]:
    sess = numerics.session(model, optimize=True)
    return [numerics.run(sess, f) for f in samples]


RESHAPING = ("Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze")


def class_outputs(model: onnx.ModelProto) -> set[str]:
    """Outputs that hold class scores along their last axis: made by Softmax / LogSoftmax, or rank-2 [N, C] logits
    made by Gemm / MatMul / Add (a classifier head), possibly through ops that only reshape. Other outputs (maps,
    boxes, embeddings, recurrent states) are not."""
    prod = {o: n for n in model.graph.node for o in n.output}
    out = set()
    for vi in model.graph.output:
        n = prod.get(vi.name)
        while n is not None and n.op_type in RESHAPING and n.input[0] in prod:  # exporters end with these
            n = prod[n.input[0]]
        rank = len(vi.type.tensor_type.shape.dim) if vi.type.tensor_type.HasField("shape") else None
        if n is not None and (n.op_type in ("Softmax", "LogSoftmax")
                              or (rank == 2 and n.op_type in ("Gemm", "MatMul", "Add"))):
            out.add(vi.name)
    return out


def state_outputs(model: onnx.ModelProto) -> set[str]:
    """Outputs a caller feeds back as inputs (recurrent state, e.g. ``state`` [2, N, 128] -> ``stateN``): same element
    type and rank as a graph input that has a fixed dim, every dim equal to the input's or unknown. They are judged
    through the outputs they drive, not on their own."""
    def dims(vi):
        return [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]

    def fits(o, i):
        do, di = dims(o), dims(i)
        return (o.type.tensor_type.elem_type == i.type.tensor_type.elem_type and len(do) == len(di)
                and any(d is not None for d in di) and all(a is None or a == b for a, b in zip(do, di)))
    outs = {o.name for o in model.graph.output if any(fits(o, i) for i in model.graph.input)}
    return outs if len(outs) < len(model.graph.output) else set()


def _keeps_top1(ref: np.ndarray, out: np.ndarray, margin: float) -> np.ndarray:
    """Per position: the float top-1 class is still top-1, ahead of the runner-up by at least `margin` times float's
    own lead (0: plain argmax equality). A position whose lead quantization nearly erased is a flip waiting for the
    next input, which calibration samples alone would not show."""
    top = ref.argmax(-1)
    same = out.argmax(-1) == top
    if margin <= 0:
        return same
    r = np.sort(ref.astype(np.float64), axis=-1)
    lead_f = r[..., -1] - r[..., -2]
    o = out.astype(np.float64)
    o_top = np.take_along_axis(o, top[..., None], -1)[..., 0]
    np.put_along_axis(o, top[..., None], -np.inf, -1)
    return same & (o_top - o.max(-1) >= margin * lead_f)


def _score(outs: list[dict], ref: list[dict], cfg: AccuracyConfig, classes: set[str],
           states: set[str] = frozenset()) -> tuple[float, float, float]:
    """(metric, finer agreement used to rank layers, smallest output SQNR in dB) of `outs` against float's `ref`.

    The finer agreement is the fraction of class-score positions (and other outputs' samples) that agree: one
    flipped CTC step moves it a little where the per-sample metric moves by a whole sample."""
    sqnr = min(numerics.sqnr_db(np.concatenate([np.ravel(r[k]) for r in ref]),
                                np.concatenate([np.ravel(o[k]) for o in outs])) for k in ref[0] if k not in states)
    if cfg.metric == "output_sqnr":
        return sqnr, sqnr, sqnr
    agree, fine = [], []
    for o, r in zip(outs, ref):
        ok = True
        for k, rv in r.items():
            if k in states:
                continue
            rv, ov = np.asarray(rv), np.asarray(o[k])
            if rv.dtype.kind != "f":
                same = np.array([np.array_equal(rv, ov)])
            elif k in classes and rv.ndim >= 1 and rv.shape[-1] >= 2:
                same = np.ravel(_keeps_top1(rv, ov, cfg.margin))
            else:
                same = np.array([numerics.sqnr_db(rv, ov) >= cfg.sqnr_floor])
            ok &= bool(same.all())
            fine.extend(same.tolist())
        agree.append(ok)
    return float(np.mean(agree)), float(np.mean(fine)), sqnr


@dataclass
class Search:
    """Builds and measures variants: `quantize(float_layers)` runs insert_qdq with those layers kept float."""

    quantize: Callable[[frozenset], PassResult]
    header: onnx.ModelProto
    float_model: onnx.ModelProto
    samples: list[Feeds]

    def model(self, floats: frozenset) -> onnx.ModelProto:
        return to_model(self.quantize(floats).graph, self.header)

    def accuracy(self, cfg: AccuracyConfig, layers: list[str]) -> tuple[frozenset, dict]:
        t0 = time.perf_counter()
        samples = self.samples[: cfg.samples]
        ref = _run(self.float_model, samples)
        classes, states = class_outputs(self.float_model), state_outputs(self.float_model)
        score = lambda floats: _score(_run(self.model(floats), samples), ref, cfg, classes, states)  # noqa: E731
        base, base_fine, base_sqnr = score(frozenset())
        table = []
        for name in (layers if base < cfg.target else []):  # the table costs one run per layer: only when needed
            m, f, s = score(frozenset([name]))
            table.append({"node": name, "gain": round(m - base, 6), "fine_gain": round(f - base_fine, 6),
                          "sqnr_gain_db": round(s - base_sqnr, 3)})
        table.sort(key=lambda r: (-r["gain"], -r["fine_gain"], -r["sqnr_gain_db"]))
        limit = int(np.floor(cfg.max_float_fraction * len(layers)))
        best, best_fine, best_k = base, base_fine, 0
        kept = []
        for k in range(1, min(limit, len(table)) + 1):  # the k most sensitive layers float, k = 1, 2, ...
            if best >= cfg.target:
                break
            m, f, _ = score(frozenset(r["node"] for r in table[:k]))
            kept.append({"node": table[k - 1]["node"], "metric_after": round(m, 6), "fine_after": round(f, 6)})
            if (m, f) > (best, best_fine):
                best, best_fine, best_k = m, f, k
        floats = [r["node"] for r in table[:best_k]]
        kept = kept[:best_k]
        info = {"metric": cfg.metric, "target": cfg.target, "class_outputs": sorted(classes),
                "state_outputs": sorted(states), "samples": len(samples), "layers": len(layers),
                "quantized_metric": round(base, 6), "final_metric": round(best, 6), "target_met": best >= cfg.target,
                "max_float_layers": limit, "kept_float": kept, "sensitivity": table,
                "seconds": round(time.perf_counter() - t0, 2)}
        if best < cfg.target:
            info["reason"] = (f"target {cfg.target} not reached with {len(floats)} of {len(layers)} layers float "
                              f"(max_float_fraction {cfg.max_float_fraction}); best {best:.4f}")
        return frozenset(floats), info

    def _times(self, models: list[onnx.ModelProto], runs: int) -> list[float]:
        sessions = [numerics.session(m, optimize=True) for m in models]
        feed = self.samples[0]
        for s in sessions:
            for _ in range(3):
                s.run(None, feed)
        times: list[list[float]] = [[] for _ in sessions]
        for r in range(runs):
            order = list(range(len(sessions)))
            order = order[r % len(order):] + order[: r % len(order)]
            for i in order:
                t = time.perf_counter()
                sessions[i].run(None, feed)
                times[i].append(time.perf_counter() - t)
        return [statistics.median(t) for t in times]

    def latency(self, cfg: LatencyConfig, layers: list[str], floats: frozenset) -> tuple[frozenset, dict]:
        t0 = time.perf_counter()
        todo = [n for n in layers if n not in floats]
        k = max(1, min(cfg.regions, len(todo)))
        regions = [todo[i * len(todo) // k:(i + 1) * len(todo) // k] for i in range(k)]
        regions = [r for r in regions if r]
        base = self.model(floats)
        decided = set(floats)
        rows = []
        for reg in regions:
            variant = self.model(frozenset(decided | set(reg)))
            t_q, t_f = self._times([base, variant], cfg.runs)
            faster = (t_q - t_f) > cfg.margin * t_q
            rows.append({"first": reg[0], "last": reg[-1], "layers": len(reg), "quantized_ms": round(t_q * 1e3, 4),
                         "float_ms": round(t_f * 1e3, 4), "kept_float": faster})
            if faster:
                decided |= set(reg)
                base = variant
        t_float, t_final = self._times([self.float_model, base], cfg.runs)
        ratio = t_final / t_float
        # the quantized model must be measurably within max_ratio (by the noise margin): a model that only ties
        # with float in this timing costs accuracy for nothing and may be slower when timed again
        if ratio > cfg.max_ratio - cfg.margin and set(todo) - decided:
            rows.append({"first": todo[0], "last": todo[-1], "layers": len(todo),
                         "quantized_ms": round(t_final * 1e3, 4),
                         "float_ms": round(t_float * 1e3, 4), "kept_float": True, "whole_model": True})
            decided |= set(todo)  # no region helps on its own but the quantized model is slower: keep it float
            base = self.model(frozenset(decided))
            t_float, t_final = self._times([self.float_model, base], cfg.runs)
            ratio = t_final / t_float
        info = {"max_ratio": cfg.max_ratio, "regions": rows, "float_ms": round(t_float * 1e3, 4),
                "quantized_ms": round(t_final * 1e3, 4), "ratio": round(ratio, 3),
                "kept_float_layers": sorted(decided - set(floats)), "seconds": round(time.perf_counter() - t0, 2)}
        if any(r.get("whole_model") for r in rows):
            info["reason"] = (f"the quantized model was not measurably faster than {cfg.max_ratio}x fp32 (timed "
                              f"{rows[-1]['quantized_ms']} ms vs fp32 {rows[-1]['float_ms']} ms, noise margin "
                              f"{cfg.margin:.0%}): every layer kept float")
        if ratio > cfg.max_ratio:
            info["reason"] = (f"{ratio:.2f}x fp32 after keeping {sum(r['kept_float'] for r in rows)} of {len(rows)} "
                              "regions float: what stays quantized is the Q/DQ the float layers' neighbours keep, "
                              "within the timing noise of the float model")
        return frozenset(decided), info
