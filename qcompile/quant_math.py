"""Quantization arithmetic shared by the Q/DQ passes: parameters from ranges, weight and bias quantization.

``q = saturate(round_half_even(x / scale) + zero_point)`` (ONNX QuantizeLinear), ``x ≈ (q - zero_point)·scale``.
A b-bit quantizer (2 <= b <= 8) keeps its levels in the 8-bit type: int8 holds [-2^(b-1), 2^(b-1)-1], uint8 holds
[0, 2^b-1] (:meth:`QuantDType.qrange`); b = 8 is the plain 8-bit quantizer, byte for byte.
Activation ranges are widened to contain 0 so zero is exact (padding, ReLU); asymmetric: ``s = (hi-lo)/(qmax-qmin)``,
``z = clamp(round(qmin - lo/s))``; symmetric: ``s = max|x| / ((qmax-qmin)/2)``, z = 0 (int8) or 2^(b-1) (uint8).
Symmetric weights use the restricted range ``z ± (2^(b-1)-1)`` (8-bit: [-127, 127], no -128) with
``s_c = max|W_c| / (2^(b-1)-1)``, so that u8·s8 products pairwise summed never saturate int16 on non-VNNI x86 and
the range is symmetric. Biases are int32 at scale ``s_x·s_w`` with zero point 0.
"""
from __future__ import annotations

import numpy as np

from qcompile.types import QParams, QuantDType

TINY_SCALE = float(np.finfo(np.float32).tiny) * 1e10  # smallest scale we emit (avoids denormal/zero scales)
MIN_BITS, MAX_BITS = 2, 8


def _bits(bits: int) -> int:
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"bit width must be an int in [{MIN_BITS}, {MAX_BITS}], got {bits!r}")
    return int(bits)


def symmetric_zero_point(dtype: QuantDType, bits: int = 8) -> int:
    return 0 if dtype is QuantDType.INT8 else 1 << (_bits(bits) - 1)


def activation_qparams(lo: float, hi: float, dtype: QuantDType, symmetric: bool, bits: int = 8) -> QParams:
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    qmin, qmax = dtype.qrange(_bits(bits))
    if symmetric:
        amax = max(abs(lo), abs(hi))
        scale = amax / ((qmax - qmin) / 2.0) if amax > 0 else 1.0
        zp = symmetric_zero_point(dtype, bits)
    else:
        scale = (hi - lo) / (qmax - qmin) if hi > lo else 1.0
        zp = int(np.clip(np.round(qmin - lo / scale), qmin, qmax))
    scale = max(scale, TINY_SCALE)
    return QParams(np.array(scale, np.float32), np.array(zp, dtype.numpy))


def quantize(x: np.ndarray, qp: QParams, dtype: QuantDType, bits: int = 8) -> np.ndarray:
    scale, zp = qp.scale, qp.zero_point.astype(np.int32)
    if qp.axis is not None and scale.ndim == 1:
        shape = [1] * x.ndim
        shape[qp.axis] = -1
        scale, zp = scale.reshape(shape), zp.reshape(shape)
    q = np.rint(x.astype(np.float32) / scale) + zp
    return np.clip(q, *dtype.qrange(_bits(bits))).astype(dtype.numpy)


def weight_qparams(w: np.ndarray, axis: int | None, dtype: QuantDType, symmetric: bool = True,
                   bits: int = 8) -> QParams:
    """Per-channel (axis) or per-tensor (axis None) b-bit weight parameters."""
    if axis is None:
        lo, hi = float(w.min()), float(w.max())
        qp = _weight_range(np.array([lo]), np.array([hi]), dtype, symmetric, bits)
        return QParams(qp[0].reshape(()), qp[1].reshape(()), None)
    red = tuple(i for i in range(w.ndim) if i != axis)
    lo, hi = w.min(axis=red).astype(np.float64), w.max(axis=red).astype(np.float64)
    scale, zp = _weight_range(lo, hi, dtype, symmetric, bits)
    return QParams(scale, zp, axis)


def _weight_range(lo: np.ndarray, hi: np.ndarray, dtype: QuantDType, symmetric: bool, bits: int = 8
                  ) -> tuple[np.ndarray, np.ndarray]:
    lo, hi = np.minimum(lo, 0.0), np.maximum(hi, 0.0)
    qmin, qmax = dtype.qrange(_bits(bits))
    if symmetric:
        amax = np.maximum(np.abs(lo), np.abs(hi))
        scale = np.where(amax > 0, amax / ((1 << (bits - 1)) - 1), 1.0)
        zp = np.full_like(scale, symmetric_zero_point(dtype, bits))
    else:
        scale = np.where(hi > lo, (hi - lo) / (qmax - qmin), 1.0)
        zp = np.clip(np.round(qmin - lo / scale), qmin, qmax)
    scale = np.maximum(scale, TINY_SCALE)
    return scale.astype(np.float32), zp.astype(dtype.numpy)


def quantize_weight(w: np.ndarray, qp: QParams, dtype: QuantDType, symmetric: bool = True,
                    bits: int = 8) -> np.ndarray:
    q = quantize(w, qp, dtype, bits)
    if symmetric:  # restricted range z ± (2^(b-1)-1)
        z, half = symmetric_zero_point(dtype, bits), (1 << (bits - 1)) - 1
        q = np.clip(q, z - half, z + half).astype(dtype.numpy)
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


def activation_hint_problem(qp, bits: int) -> str:
    """Why `qp` cannot be a per-tensor b-bit activation quantizer ("" when it can)."""
    if not isinstance(qp, QParams):
        return f"expected QParams, got {type(qp).__name__}"
    scale, zp = np.asarray(qp.scale), np.asarray(qp.zero_point)
    if qp.axis is not None or scale.size != 1 or zp.size != 1:
        return f"activations are quantized per tensor; got axis {qp.axis}, scale shape {list(scale.shape)}"
    return _params_problem(scale, zp, bits)


def weight_hint_problem(q, qp, shape: tuple[int, ...], axis: int | None, bits: int) -> str:
    """Why (integer values `q`, `qp`) cannot stand for a weight of `shape` quantized along `axis` ("" when it can)."""
    if not isinstance(qp, QParams):
        return f"expected QParams, got {type(qp).__name__}"
    q, scale, zp = np.asarray(q), np.asarray(qp.scale), np.asarray(qp.zero_point)
    if q.shape != tuple(shape):
        return f"integer values have shape {list(q.shape)}, the weight {list(shape)}"
    if qp.axis != axis:
        return f"hint axis {qp.axis} but the weight is quantized along axis {axis} here"
    if (scale.shape != (shape[axis],)) if axis is not None else (scale.size != 1):
        return f"scale shape {list(scale.shape)}, expected {[shape[axis]] if axis is not None else []}"
    if zp.shape != scale.shape:
        return f"zero point shape {list(zp.shape)} differs from scale shape {list(scale.shape)}"
    why = _params_problem(scale, zp, bits)
    if why:
        return why
    if q.dtype.kind not in "iu":
        return f"integer values have dtype {q.dtype}, not an integer type"
    lo, hi = QuantDType.of(zp.dtype).qrange(bits)
    if q.size and (q.min() < lo or q.max() > hi):
        return f"integer values span [{q.min()}, {q.max()}], outside the {bits}-bit {zp.dtype} range [{lo}, {hi}]"
    return ""


def _params_problem(scale: np.ndarray, zp: np.ndarray, bits: int) -> str:
    if scale.dtype != np.float32 or not np.all(np.isfinite(scale)) or np.any(scale <= 0):
        return "scale must be finite positive float32"
    if zp.dtype not in (np.int8, np.uint8):
        return f"zero point dtype {zp.dtype}; expected int8 or uint8"
    lo, hi = QuantDType.of(zp.dtype).qrange(bits)
    if np.any(zp < lo) or np.any(zp > hi):
        return f"zero point outside the {bits}-bit {zp.dtype} range [{lo}, {hi}]"
    return ""
