"""Quantization arithmetic shared by the Q/DQ passes: parameters from ranges, weight and bias quantization.

``q = saturate(round_half_even(x / scale) + zero_point)`` (ONNX QuantizeLinear), ``x ≈ (q - zero_point)·scale``.
A b-bit quantizer (2 <= b <= 8) keeps its levels in the 8-bit type: int8 holds [-2^(b-1), 2^(b-1)-1], uint8 holds
[0, 2^b-1] (:meth:`QuantDType.qrange`); b = 8 is the plain 8-bit quantizer, byte for byte.
Activation ranges are widened to contain 0 so zero is exact (padding, ReLU); asymmetric: ``s = (hi-lo)/(qmax-qmin)``,
``z = clamp(round(qmin - lo/s))``; symmetric: ``s = max|x| / ((qmax-qmin)/2)``, z = 0 (int8) or 2^(b-1) (uint8).
Symmetric weights use the restricted range ``z ± (2^(b-1)-1)`` (8-bit: [-127, 127], no -128) with
``s_c = max|W_c| / (2^(b-1)-1)``, so that u8·s8 products pairwise summed never saturate int16 on non-VNNI x86 and
the range is symmetric. Biases are int32 at scale ``s_x·s_w`` with zero point 0.

Per-block weights (``QParams.block_size`` = B, ``axis`` = the blocked, reduction axis K): one scale (and zero point)
per B consecutive elements along K and per position of the other axes, the ONNX opset-21 ``DequantizeLinear``
``block_size`` layout: scale shape = the weight's shape with ``ceil(K/B)`` along K. When B does not divide K the last
block is partial (ONNX and ORT 1.32 accept it; nothing is padded). An optional clip ``ratio`` (same shape as the
scale) shrinks each block's range before the scale is taken (AWQ's clipping search): ``s = ratio·max|W_blk| / q``.
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


def expand_blocks(p: np.ndarray, axis: int, block: int, size: int) -> np.ndarray:
    """A per-block parameter repeated ``block`` times along ``axis`` and cut to ``size`` (the weight's extent)."""
    return np.take(np.repeat(np.asarray(p), block, axis=axis), np.arange(size), axis=axis)


def _blocks(w: np.ndarray, axis: int, block: int) -> np.ndarray:
    """``w`` with ``axis`` split into [ceil(K/B), B] (zero padded: ranges always contain 0, so padding is inert)."""
    k = w.shape[axis]
    nb = -(-k // block)
    pad = [(0, 0)] * w.ndim
    pad[axis] = (0, nb * block - k)
    wp = np.pad(np.asarray(w, np.float64), pad)
    return wp.reshape(*w.shape[:axis], nb, block, *w.shape[axis + 1:])


def block_qparams(w: np.ndarray, axis: int, block: int, dtype: QuantDType, symmetric: bool = True, bits: int = 4,
                  ratio: np.ndarray | float | None = None) -> QParams:
    """Per-block b-bit weight parameters along ``axis`` (module docstring), optionally with clip ``ratio``."""
    wb = _blocks(w, axis, block)
    lo, hi = wb.min(axis=axis + 1), wb.max(axis=axis + 1)
    if ratio is not None:
        lo, hi = lo * np.asarray(ratio, np.float64), hi * np.asarray(ratio, np.float64)
    scale, zp = _weight_range(lo, hi, dtype, symmetric, bits)
    return QParams(scale, zp, axis, block)


def dequantize(q: np.ndarray, qp: QParams) -> np.ndarray:
    """``(q − z)·s`` in float32 (DequantizeLinear), for per-tensor, per-channel and per-block parameters."""
    scale, zp = _broadcast(np.asarray(qp.scale, np.float32), qp, q.shape)
    return ((q.astype(np.int32) - zp).astype(np.float32) * scale).astype(np.float32)


def _broadcast(scale: np.ndarray, qp: QParams, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """``(scale, zero point as int32)`` of ``qp`` broadcastable against a tensor of ``shape`` (blocks expanded,
    a per-channel vector along its axis)."""
    zp = np.asarray(qp.zero_point).astype(np.int32)
    if qp.block_size:
        return (expand_blocks(scale, qp.axis, qp.block_size, shape[qp.axis]),
                expand_blocks(zp, qp.axis, qp.block_size, shape[qp.axis]))
    if qp.axis is not None and np.ndim(scale) == 1:
        view = [1] * len(shape)
        view[qp.axis] = -1
        return scale.reshape(view), zp.reshape(view)
    return scale, zp


def quantize(x: np.ndarray, qp: QParams, dtype: QuantDType, bits: int = 8) -> np.ndarray:
    scale, zp = _broadcast(qp.scale, qp, x.shape)
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


def block_shape(shape: tuple[int, ...], axis: int, block: int) -> tuple[int, ...]:
    """Shape of the per-block scale of a weight of ``shape`` blocked along ``axis``."""
    return tuple(-(-d // block) if i == axis else d for i, d in enumerate(shape))


def weight_hint_problem(q, qp, shape: tuple[int, ...], axis: int | None, bits: int, block: int | None = None) -> str:
    """Why (integer values `q`, `qp`) cannot stand for a weight of `shape` quantized along `axis` (per block of
    `block` along it when given) ("" when it can)."""
    if not isinstance(qp, QParams):
        return f"expected QParams, got {type(qp).__name__}"
    q, scale, zp = np.asarray(q), np.asarray(qp.scale), np.asarray(qp.zero_point)
    if q.shape != tuple(shape):
        return f"integer values have shape {list(q.shape)}, the weight {list(shape)}"
    if qp.axis != axis:
        return f"hint axis {qp.axis} but the weight is quantized along axis {axis} here"
    if (qp.block_size or None) != (block or None):
        return f"hint block size {qp.block_size} but the weight is quantized with block size {block} here"
    if block:
        if scale.shape != block_shape(tuple(shape), axis, block):
            return f"scale shape {list(scale.shape)}, expected {list(block_shape(tuple(shape), axis, block))}"
    elif (scale.shape != (shape[axis],)) if axis is not None else (scale.size != 1):
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
