"""ONNX Runtime runs for checking (graph optimizations off), seeded inputs and error metrics."""
from __future__ import annotations

import logging
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
    so.log_severity_level = 3
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model
    try:
        return ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise ModelError(f"ONNX Runtime cannot load the model: {str(exc).splitlines()[0]}") from None


def run(sess: ort.InferenceSession, feeds: Mapping[str, np.ndarray],
        outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    names = list(outputs) if outputs is not None else [o.name for o in sess.get_outputs()]
    vals = sess.run(names, dict(feeds))
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
