"""Empirical bias correction for insert_qdq (``bias_correction: N``): after Q/DQ insertion, the mean shift that
quantization causes at the output of every quantized Conv / Gemm / MatMul(+Add bias) is measured on calibration data
and taken out of that layer's int32 bias.

Quantizing weights and activations moves each output channel's mean, not only its spread: a depthwise kernel whose
taps sum to almost zero (an edge filter on a flat background) leaks ``c · Σ(W_q - W)`` of its input level c through
the rounded taps, and a clipped activation range lowers the mean of everything after it. These shifts add up from
layer to layer. Nagel et al., "Data-Free Quantization Through Weight Equalization and Bias Correction" (ICCV 2019,
§4.2, the empirical variant) and NNCF's BiasCorrection subtract E[y_quantized - y_float] per channel from the bias.

Each layer's *own* shift is measured: the quantized graph gets a float twin of the layer (its float weights and
bias) reading the layer's input from before quantization, both run in one ONNX Runtime session (graph optimizations
off, so the simulated Q/DQ graph exposes each layer's float output) on the first calibration samples, and the
difference of their channel means is the layer's own shift; a shift that comes from the layers before is left to
them. (Correcting every layer's total shift at once diverged on PP-OCRv4 rec: each layer also took out what the
layers before it had already corrected.) ``N`` rounds each measure what the last one left. The correction is an
integer change of an int32 bias (scale ``s_x·s_w`` unchanged), so the integer kernels, the integer reference and
every target run it as they run any bias. Layers without a quantized bias (no bias input, bias kept float) are left
as they are, and counted. Measured (BENCHMARKS.md): PP-OCRv4 rec w8a8 strings equal 0.687 -> 0.780, ddddocr
0.875 -> 0.927, zoo output SQNR +0.5 to +2.3 dB; it is not used inside w8a8-auto, where on rec's float set it cost
agreement (the mean follows the background area, the strokes decide the text).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from qcompile import numerics
from qcompile.calibrate import augmented_model

logger = logging.getLogger(__name__)

Feeds = dict[str, np.ndarray]
_INT32 = np.iinfo(np.int32)


@dataclass
class Target:
    """One quantized layer whose int32 bias can absorb the shift of its output's channel means."""
    node: str
    output: str  # the layer's float output (same name in the float graph)
    axis: int  # channel axis of that output
    bias: gs.Constant  # int32 values
    scale: np.ndarray  # their scale s_x·s_w (per channel or scalar)


def _int32_bias(t: gs.Tensor) -> tuple[gs.Constant, np.ndarray] | None:
    """(int32 constant, scale) when t = DequantizeLinear(int32 constant, constant scale)."""
    dq = t.inputs[0] if t.inputs else None
    if dq is None or dq.op != "DequantizeLinear":
        return None
    q, s = dq.inputs[0], dq.inputs[1]
    if not (isinstance(q, gs.Constant) and isinstance(s, gs.Constant)) or q.values.dtype != np.int32:
        return None
    return q, np.asarray(s.values, np.float64)


def _reads_dq(node: gs.Node, i: int) -> bool:
    t = node.inputs[i] if len(node.inputs) > i else None
    return t is not None and bool(t.inputs) and t.inputs[0].op == "DequantizeLinear"


def targets(graph: gs.Graph) -> tuple[list[Target], int]:
    """The correctable layers of the top-level graph, and how many quantized layers have no int32 bias."""
    out: list[Target] = []
    skipped = 0
    for node in graph.nodes:
        if node.op not in ("Conv", "Gemm", "MatMul") or not (_reads_dq(node, 0) and _reads_dq(node, 1)):
            continue
        y = node.outputs[0]
        found = None
        if node.op in ("Conv", "Gemm") and len(node.inputs) > 2 and node.inputs[2].name:
            found = _int32_bias(node.inputs[2])
        elif node.op == "MatMul" and len(y.outputs) == 1 and y.outputs[0].op == "Add":
            add = y.outputs[0]
            found = _int32_bias(add.inputs[1 - add.inputs.index(y)])
        if found is None or (node.op == "Gemm" and int(node.attrs.get("transA", 0))):
            skipped += 1
            continue
        axis = 1 if node.op in ("Conv", "Gemm") else -1
        out.append(Target(node.name, y.name, axis, found[0], found[1]))
    return out, skipped


def channel_means(model: onnx.ModelProto, samples: Sequence[Feeds], axes: dict[str, int]) -> dict[str, np.ndarray]:
    """Mean of each named tensor per channel (along its axis) over `samples` and all other positions (ORT,
    graph optimizations off)."""
    names = sorted(axes)
    sess = numerics.session(model, optimize=False)
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    for feeds in samples:
        for n, v in numerics.run(sess, feeds, names).items():
            v = np.asarray(v, np.float64)
            ax = axes[n] % v.ndim
            red = tuple(i for i in range(v.ndim) if i != ax)
            s = v.sum(axis=red)
            sums[n] = s if n not in sums else sums[n] + s
            counts[n] = counts.get(n, 0) + v.size // v.shape[ax]
    return {n: sums[n] / counts[n] for n in sums}


def _pre_quantization(t: gs.Tensor) -> gs.Tensor | None:
    """x when t = DequantizeLinear(QuantizeLinear(x)): the float value the quantized layer's input stands for."""
    dq = t.inputs[0] if t.inputs else None
    q = dq.inputs[0].inputs[0] if dq is not None and dq.op == "DequantizeLinear" and dq.inputs[0].inputs else None
    return q.inputs[0] if q is not None and q.op == "QuantizeLinear" else None


def _with_shadows(graph: gs.Graph, float_nodes: dict[str, gs.Node], layers: list[Target]
                  ) -> tuple[gs.Graph, dict[str, str]]:
    """A copy of the quantized graph where each layer gets a float twin (its float weights and bias, reading the
    layer's input before quantization): {layer output: twin output}."""
    g = graph.copy()
    nodes = {n.name: n for n in g.nodes}
    twins: dict[str, str] = {}
    for t in layers:
        node, fnode = nodes.get(t.node), float_nodes.get(t.node)
        x = _pre_quantization(node.inputs[0]) if node is not None else None
        if x is None or fnode is None or not all(isinstance(c, gs.Constant) for c in fnode.inputs[1:] if c.name):
            continue
        consts = [gs.Constant(f"{t.node}__bias_correction_{i}", np.asarray(c.values)) if c.name else c
                  for i, c in enumerate(fnode.inputs[1:], 1)]
        y = gs.Variable(f"{t.output}__bias_correction_float", dtype=np.float32)
        g.nodes.append(gs.Node(fnode.op, f"{t.node}__bias_correction", dict(fnode.attrs), [x, *consts], [y]))
        twins[t.output] = y.name
    return g, twins


def apply(layers: list[Target], shifts: dict[str, np.ndarray]) -> None:
    """Take each layer's shift (output units, per channel) out of its int32 bias."""
    for t in layers:
        d = shifts.get(t.node)
        if d is None:
            continue
        q = t.bias.values.astype(np.int64)
        step = np.rint(np.broadcast_to(d, q.shape) / np.broadcast_to(t.scale, q.shape)).astype(np.int64)
        t.bias.values = np.clip(q - step, _INT32.min, _INT32.max).astype(np.int32)


def measure(graph: gs.Graph, header: onnx.ModelProto, float_graph: gs.Graph, samples: Sequence[Feeds],
            layers: list[Target]) -> tuple[dict[str, np.ndarray], float]:
    """Each layer's own shift of its channel means: the quantized layer minus its float twin reading the same
    input (so a shift that comes from the layers before is left to them). Returns the shifts and their mean size
    relative to the mean |output| (for the report)."""
    g, twins = _with_shadows(graph, {n.name: n for n in float_graph.nodes}, layers)
    axes = {**{t.output: t.axis for t in layers if t.output in twins},
            **{twins[t.output]: t.axis for t in layers if t.output in twins}}
    means = channel_means(augmented_model(g, header, list(axes)), samples, axes)
    shifts, rel = {}, []
    for t in layers:
        if t.output in twins:
            ref = means[twins[t.output]]
            shifts[t.node] = means[t.output] - ref
            rel.append(float(np.mean(np.abs(shifts[t.node])) / (np.mean(np.abs(ref)) + 1e-12)))
    return shifts, (float(np.mean(rel)) if rel else 0.0)


def correct(graph: gs.Graph, header: onnx.ModelProto, float_graph: gs.Graph, samples: Sequence[Feeds],
            layers: list[Target], rounds: int, known: dict[str, np.ndarray] | None = None) -> dict:
    """Measure and take out the layers' own mean shifts, `rounds` times (each round measures what the last one
    left). `known` (node -> total shift) caches the result: a layer found there is corrected by it without a new
    measurement (mixed-precision variants of one model: a layer's own shift does not depend on which other layers
    are float), and the layers measured here are added to it."""
    known = {} if known is None else known
    apply(layers, known)
    todo = [t for t in layers if t.node not in known]
    history = []
    total: dict[str, np.ndarray] = {}
    for _ in range(rounds if todo else 0):
        shifts, rel = measure(graph, header, float_graph, samples, todo)
        history.append(round(rel, 6))
        apply(todo, shifts)
        for k, v in shifts.items():
            total[k] = total.get(k, 0.0) + v
    known.update(total)
    logger.info("bias correction: %d layers measured (relative own mean shift per round %s), %d reused",
                len(total), history, len(layers) - len(todo))
    return {"layers": sum(t.node in known for t in layers), "measured": len(total), "rounds": rounds,
            "samples": len(samples), "relative_mean_shift": history}
