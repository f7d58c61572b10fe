"""Quantization arithmetic shared by the Q/DQ passes: parameters from ranges, weight and bias quantization.

``q = saturate(round_half_even(x / scale) + zero_point)`` (ONNX QuantizeLinear), ``x ≈ (q - zero_point)·scale``.
Activation ranges are widened to contain 0 so zero is exact (padding, ReLU). Symmetric weights use the restricted
range [-127, 127] (no -128) so that u8·s8 products pairwise summed never saturate int16 on non-VNNI x86 and the
range is symmetric. Biases are int32 at scale ``s_x·s_w`` with zero point 0.
"""
from __future__ import annotations

import numpy as np

from qcompile.types import QParams, QuantDType

TINY_SCALE = float(np.finfo(np.float32).tiny) * 1e10  # smallest scale we emit (avoids denormal/zero scales)


def activation_qparams(lo: float, hi: float, dtype: QuantDType, symmetric: bool) -> QParams:
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    qmin, qmax = dtype.qmin, dtype.qmax
    if symmetric:
        amax = max(abs(lo), abs(hi))
        scale = amax / ((qmax - qmin) / 2.0) if amax > 0 else 1.0
        zp = 0 if dtype is QuantDType.INT8 else 128
    else:
        scale = (hi - lo) / (qmax - qmin) if hi > lo else 1.0
        zp = int(np.clip(np.round(qmin - lo / scale), qmin, qmax))
    scale = max(scale, TINY_SCALE)
    return QParams(np.array(scale, np.float32), np.array(zp, dtype.numpy))


def quantize(x: np.ndarray, qp: QParams, dtype: QuantDType) -> np.ndarray:
    scale, zp = qp.scale, qp.zero_point.astype(np.int32)
    if qp.axis is not None and scale.ndim == 1:
        shape = [1] * x.ndim
        shape[qp.axis] = -1
        scale, zp = scale.reshape(shape), zp.reshape(shape)
    q = np.rint(x.astype(np.float32) / scale) + zp
    return np.clip(q, dtype.qmin, dtype.qmax).astype(dtype.numpy)


def weight_qparams(w: np.ndarray, axis: int | None, dtype: QuantDType, symmetric: bool = True) -> QParams:
    """Per-channel (axis) or per-tensor (axis None) weight parameters."""
    if axis is None:
        lo, hi = float(w.min()), float(w.max())
        qp = _weight_range(np.array([lo]), np.array([hi]), dtype, symmetric)
        return QParams(qp[0].reshape(()), qp[1].reshape(()), None)
    red = tuple(i for i in range(w.ndim) if i != axis)
    lo, hi = w.min(axis=red).astype(np.float64), w.max(axis=red).astype(np.float64)
    scale, zp = _weight_range(lo, hi, dtype, symmetric)
    return QParams(scale, zp, axis)


def _weight_range(lo: np.ndarray, hi: np.ndarray, dtype: QuantDType, symmetric: bool
                  ) -> tuple[np.ndarray, np.ndarray]:
    lo, hi = np.minimum(lo, 0.0), np.maximum(hi, 0.0)
    if symmetric:
        qmax = dtype.qmax if dtype is QuantDType.INT8 else 127
        amax = np.maximum(np.abs(lo), np.abs(hi))
        scale = np.where(amax > 0, amax / qmax, 1.0)
        zp = np.zeros_like(scale) if dtype is QuantDType.INT8 else np.full_like(scale, 128)
    else:
        scale = np.where(hi > lo, (hi - lo) / (dtype.qmax - dtype.qmin), 1.0)
        zp = np.clip(np.round(dtype.qmin - lo / scale), dtype.qmin, dtype.qmax)
    scale = np.maximum(scale, TINY_SCALE)
    return scale.astype(np.float32), zp.astype(dtype.numpy)


def quantize_weight(w: np.ndarray, qp: QParams, dtype: QuantDType, symmetric: bool = True) -> np.ndarray:
    q = quantize(w, qp, dtype)
    if symmetric and dtype is QuantDType.INT8:
        q = np.maximum(q, -127).astype(np.int8)
    return q


def quantize_bias(b: np.ndarray, input_scale: np.ndarray, weight_scale: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray] | None:
    """int32 bias and its scale s_x·s_w; None when it would overflow int32."""
    scale = (np.float32(input_scale) * weight_scale.astype(np.float32)).astype(np.float32)
    scale = np.broadcast_to(scale, b.shape).astype(np.float32) if scale.ndim else scale
    q = np.rint(b.astype(np.float64) / scale.astype(np.float64))
    if np.any(np.abs(q) > 2**31 - 1):
        return None
    return q.astype(np.int32), scale
