"""ONNX Runtime runs for checking (graph optimizations off), seeded inputs and error metrics."""
from __future__ import annotations

import logging
import re
from typing import Mapping, Sequence

import numpy as np
import onnx
import onnxruntime as ort

from qcompile.errors import ModelError

logger = logging.getLogger(__name__)
ort.set_default_logger_severity(3)  # ORT's optimizer warnings are not the user's business; errors still raise

ORT_TYPES = {
    "tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int8)": np.int8, "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_, "tensor(int16)": np.int16,
}


def session(model: onnx.ModelProto | bytes | str, *, optimize: bool = False, threads: int = 1,
            ) -> ort.InferenceSession:
    """An ORT CPU session. `optimize=False` disables every graph optimization (exact fp32 checks)."""
    so = ort.SessionOptions()
    so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                   else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 4  # its errors come back as exceptions, one line each (ModelError)
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model
    try:
        return ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise ModelError(f"ONNX Runtime cannot load the model: {str(exc).splitlines()[0]}") from None


RUN_FAILED = "ONNX Runtime fails running the model: "  # the ModelError of :func:`run`, then ORT's words


def run(sess: ort.InferenceSession, feeds: Mapping[str, np.ndarray],
        outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """``outputs`` (default: the graph's) of one run; an ONNX Runtime failure is one :class:`ModelError` line."""
    names = list(outputs) if outputs is not None else [o.name for o in sess.get_outputs()]
    try:
        vals = sess.run(names, dict(feeds))
    except Exception as exc:  # ORT raises its own types from C++ (InvalidArgument, Fail, RuntimeException)
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        msg = re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : (Non-zero status code returned while running )?", "",
                     msg)
        raise ModelError(RUN_FAILED + msg) from None
    return dict(zip(names, vals))


def seeded_inputs(model: onnx.ModelProto, seed: int = 0) -> dict[str, np.ndarray]:
    """One input per graph input: floats ~ N(0,1), integers 0 (valid as ids and masks), dynamic dims = 1."""
    rng = np.random.default_rng(seed)
    inits = {i.name for i in model.graph.initializer}
    feeds = {}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else 1 for d in tt.shape.dim]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)
        if np.issubdtype(dtype, np.floating):
            feeds[vi.name] = rng.standard_normal(shape).astype(dtype)
        else:
            feeds[vi.name] = np.zeros(shape, dtype=dtype)
    return feeds


ROUNDING_PERTURBATION = 2.0 ** -23  # one fp32 ulp at 1.0: twice the unit roundoff


def perturbed(model: onnx.ModelProto, rel: float = ROUNDING_PERTURBATION, seed: int = 0) -> onnx.ModelProto:
    """A copy of ``model`` where every float constant and every float value a top-level node computes is moved by
    ``rel`` relative, with a random sign: constants elementwise, computed values per channel of their last axis
    (one ``Mul`` by ``1 ± rel`` after the node, where shape inference knows that axis, and a ``Clip`` to the finite
    range). Exponents of ``Pow`` stay as they are. Its deviation from the
    unmodified model is this model's sensitivity to fp32 rounding, through its own depth and magnitudes: the noise
    any rewrite that rounds constants and intermediate values differently stays within."""
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(seed)
    out = onnx.ModelProto()
    out.CopyFrom(model)

    # a Pow's exponent is the op's meaning, not a rounded value: 2·(1 ± ulp) of a negative base is NaN
    exponents = {n.input[1] for n in out.graph.node if n.op_type == "Pow" and len(n.input) > 1}

    def nudge(t: onnx.TensorProto, name: str) -> None:
        v = numpy_helper.to_array(t)
        if not np.issubdtype(v.dtype, np.floating) or v.size == 0 or name in exponents:
            return
        signs = rng.integers(0, 2, v.shape) * 2 - 1
        v64 = v.astype(np.float64)
        sentinel = ~np.isfinite(v64) | (np.abs(v64) > np.finfo(v.dtype).max / 2)  # -inf masks written as float min
        moved = np.where(sentinel, v64, v64 * (1.0 + rel * signs))
        t.CopyFrom(numpy_helper.from_array(moved.astype(v.dtype), t.name))

    for t in out.graph.initializer:
        nudge(t, t.name)
    for node in out.graph.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value" and a.type == onnx.AttributeProto.TENSOR:
                    nudge(a.t, node.output[0])
    try:
        inferred = onnx.shape_inference.infer_shapes(out)
    except Exception:  # noqa: BLE001 - a model shape inference rejects keeps its constants-only perturbation
        return out
    types = {vi.name: vi.type.tensor_type for vi in [*inferred.graph.value_info, *inferred.graph.output]}
    nodes, inits, taken = [], [], {t.name for t in out.graph.initializer} | {
        o for n in out.graph.node for o in n.output} | {i.name for i in out.graph.input}
    for node in out.graph.node:
        nodes.append(node)
        if node.op_type == "Constant":
            continue
        for k, name in enumerate(node.output):
            tt = types.get(name)
            if not name or tt is None or not tt.shape.dim or not tt.shape.dim[-1].HasField("dim_value"):
                continue
            dtype = helper.tensor_dtype_to_np_dtype(tt.elem_type)
            c = tt.shape.dim[-1].dim_value
            if not np.issubdtype(dtype, np.floating) or c <= 0:
                continue
            raw, factor, moved = f"{name}__rounding_raw", f"{name}__rounding_factor", f"{name}__rounding_moved"
            while raw in taken or factor in taken or moved in taken:
                raw, factor, moved = raw + "_", factor + "_", moved + "_"
            lo, hi = f"{factor}_lo", f"{factor}_hi"
            taken |= {raw, factor, moved, lo, hi}
            node.output[k] = raw
            inits.append(numpy_helper.from_array((1.0 + rel * (rng.integers(0, 2, c) * 2 - 1)).astype(dtype), factor))
            fmax = np.finfo(dtype).max
            inits += [numpy_helper.from_array(np.array(-fmax, dtype), lo),
                      numpy_helper.from_array(np.array(fmax, dtype), hi)]
            # a mask's float min moved outward would overflow to -inf, and -inf·0 or -inf + inf is NaN downstream:
            # the Clip keeps every moved value finite (a value already infinite comes back as ±max: same softmax)
            nodes.append(helper.make_node("Mul", [raw, factor], [moved], name=f"{raw}_Mul"))
            nodes.append(helper.make_node("Clip", [moved, lo, hi], [name], name=f"{raw}_Clip"))
    out.graph.ClearField("node")
    out.graph.node.extend(nodes)
    out.graph.initializer.extend(inits)
    return out


def sqnr_db(ref: np.ndarray, test: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio in dB (inf when equal)."""
    ref = np.asarray(ref, np.float64).ravel()
    test = np.asarray(test, np.float64).ravel()
    noise = float(np.sum((ref - test) ** 2))
    signal = float(np.sum(ref ** 2))
    if noise == 0.0:
        return float("inf")
    if signal == 0.0:
        return float("-inf")
    return float(10.0 * np.log10(signal / noise))


def cosine(ref: np.ndarray, test: np.ndarray) -> float:
    a = np.asarray(ref, np.float64).ravel()
    b = np.asarray(test, np.float64).ravel()
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0.0 or nb == 0.0:
        return 1.0 if na == nb else 0.0
    return float(np.dot(a, b) / (na * nb))


def compare(ref: np.ndarray, test: np.ndarray) -> dict[str, float]:
    ref64 = np.asarray(ref, np.float64)
    test64 = np.asarray(test, np.float64)
    diff = np.abs(ref64 - test64)
    max_abs = float(diff.max()) if diff.size else 0.0
    denom = np.maximum(np.abs(ref64), np.finfo(np.float32).tiny)
    max_rel = float((diff / denom).max()) if diff.size else 0.0
    return {"max_abs": max_abs, "max_rel": max_rel, "sqnr_db": sqnr_db(ref, test), "cosine": cosine(ref, test)}


def within_fp32_tolerance(ref: np.ndarray, test: np.ndarray, rtol: float = 1e-5, atol: float = 1e-6) -> bool:
    """|ref - test| <= atol * max(1, max|ref|) + rtol * |ref|, elementwise (atol scaled to the tensor)."""
    ref64 = np.asarray(ref, np.float64)
    test64 = np.asarray(test, np.float64)
    if ref64.shape != test64.shape:
        return False
    if not np.array_equal(np.isfinite(ref64), np.isfinite(test64)):
        return False
    fin = np.isfinite(ref64)
    if not np.array_equal(ref64[~fin], test64[~fin]):
        return False
    scale = max(1.0, float(np.abs(ref64[fin]).max()) if fin.any() else 1.0)
    return bool(np.all(np.abs(ref64[fin] - test64[fin]) <= atol * scale + rtol * np.abs(ref64[fin])))
