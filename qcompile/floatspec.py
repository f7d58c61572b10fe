"""Specified float arithmetic: the float regions between integer borders, defined to the last bit.

A float region (LayerNorm, RMSNorm, softmax, SiLU, an unquantized attention MatMul) ends at a QuantizeLinear, which
rounds ``x / s`` to an integer: a value one ulp off may land on the other side of a rounding tie, and the flipped
integer then travels through every layer after it. So the integer reference and every target compute these
regions with the same sequence of IEEE float32 operations, written down here (numpy, for the reference) and in
:mod:`qcompile.targets.tvm.kernels.floatspec` (TIR, for the targets):

- ``+ - * /`` and ``sqrt`` are IEEE float32 operations, each rounded once: never contracted into a fused
  multiply-add (OpenCL ``FP_CONTRACT OFF``, nvcc ``--fmad=false``), division and square root correctly rounded.
- :func:`exp`: float32 only (no float64, so the same on devices without it): ``k = floor(x·log2 e + 1/2)``,
  ``r = (x − k·ln2_hi) − k·ln2_lo`` (Cody and Waite; ``k·ln2_hi`` exact), a degree-7 Taylor polynomial in ``r`` by
  Horner's rule, then ``(p · 2^(k−1)) · 2``; 0 below −86 (no subnormal on the way), +inf above 88.72. Within
  ~2 ulp of exp.
- :func:`log`: float32 only, fdlibm's ``logf`` on its general path for every x: ``x = 2^k·m`` with ``m`` in
  ``[√2/2, √2)`` (integer operations on the bits; a subnormal scaled by 2^25 first), ``f = m − 1``,
  ``s = f/(2+f)``, ``R = z·(Lg1 + w·Lg3) + w·(Lg2 + w·Lg4)`` (``z = s²``, ``w = z²``), ``hfsq = (0.5·f)·f``,
  ``k·ln2_hi − ((hfsq − (s·(hfsq + R) + k·ln2_lo)) − f)``; −inf at 0, NaN below 0 or at NaN, +inf at +inf. Within
  1 ulp of log. (libm's ``logf`` differs between C libraries, OpenCL allows 3 ulp, a DSP has none.)
  Softplus is ``max(x, 0) + log(1 + exp(−|x|))`` and Mish ``x·tanh(log(1 + exp(x)))``, as TVM imports them.
- :func:`sin` and :func:`cos`: float32 only: ``k = floor(x·(2/π) + 1/2)``, ``r = x − k·P1 − k·P2 − ... − k·P5``
  left to right (π/2 in five float32 parts, the first four of 8 significant bits: each ``k·Pi`` exact for
  ``|k| < 2^16``, and the subtractions that cancel are exact), ``z = r²``, Cephes' ``sinf`` / ``cosf`` polynomials,
  ``r + (r·z)·((S3·z + S2)·z + S1)`` and ``(((C3·z + C2)·z + C1)·z)·z − 0.5·z + 1``, picked and signed by
  ``k mod 4`` (``k − 4·floor(k/4)``, in float). Within 3.5 ulp of sin / cos for ``|x| < 2^16·π/2`` (102 943: a
  diffusion timestep's or a position's phase); past that the reduction loses bits (deterministic, not accurate).
  NaN at ±inf and NaN; sin(−0) = −0. (libm's differ between C libraries and a DSP has none.)
- :func:`sigmoid` and :func:`tanh` from ``e = exp(−|x|)`` (``exp(−2|x|)``): ``1/(1+e)`` or ``e/(1+e)``;
  ``±(1−e)/(1+e)``.
- ``Pow(x, y)`` for the exponents exporters write (:func:`pow_exponent`): a whole ``n`` from 1 to ``POW_WHOLE_MAX``
  is ``n − 1`` products left to right, ``((x·x)·x)···`` (GELU's tanh form has ``x^3``); ``−n`` is ``1 / x^n``;
  ``±0.5`` is ``sqrt(x)``, ``1 / sqrt(x)`` (``x ** 0.5``, an RMSNorm's ``(ms + ε) ** -0.5``); ``0.25`` is
  ``sqrt(sqrt(x))`` and ``0.75`` ``sqrt(x)·sqrt(sqrt(x))`` (LocalResponseNorm's β), multiplied after the whole
  part's products for ``n + 1/4 ...`` (:func:`pow_specified`). libm's ``powf`` differs between C libraries and is
  missing on a DSP. Unlike IEEE ``pow``: ``(−0) ** 0.5`` is −0, and ``(−inf) ** ±0.5`` NaN.
- Sums (ReduceSum, ReduceMean, GlobalAveragePool, an AveragePool's windows, the softmax denominator, a float
  MatMul's dot products) add in index order into one float32 accumulator that starts at 0 (row-major over several
  reduced axes); a mean is that sum divided by the count (an AveragePool's: the window's size with
  ``count_include_pad``, else its elements inside the input). (numpy's own sums are pairwise and BLAS's dot products
  blocked: neither is what a kernel adds; onnx's reference pools take numpy's means.)
- Softmax: ``e = exp(x − max)``, ``e / Σe``; LogSoftmax: ``(x − max) − log(Σe)``.

- BatchNormalization (inference: the running mean and variance, whatever ``momentum`` says): ``((X − mean) /
  sqrt(var + ε)) · scale + bias`` per channel (axis 1), TOPI's order.
- GroupNormalization and InstanceNormalization (PyTorch's GroupNorm export): ``D = X − mean``,
  ``(D / sqrt(mean(D·D) + ε)) · scale + bias`` per channel, the means over a group's channels and the spatial axes,
  row-major, as above (ONNX's function body; TVM's importer's order for InstanceNormalization).
- LayerNormalization: its ONNX function body (``D = X − mean``, ``mean(D·D) + ε``, sqrt, reciprocal,
  ``D·inv·scale + bias``) with those means (TOPI's takes ``rsqrt``, an OpenCL built-in within 2 ulp).
- Resize, bilinear over H and W (:func:`resize_linear`, TOPI's order): the source coordinate from the ratio
  ``in / out`` (``(o + 0.5)·(in/out) − 0.5`` for half_pixel), floor and fraction ``t``, both neighbours' indices
  clamped to the image, ``a·(1 − t) + b·t`` along x on both rows, then along y. (onnx's reference divides by the
  scale and weights in float64: a segmentation head's upsampled logits were 1 ulp off in a third of the pixels on
  every TVM target.)

``Erf`` is float64 ``math.erf`` rounded to float32 (onnx's reference; :mod:`..kernels.mathfns` on targets with a
double FPU). Not specified yet, so left to each engine: float Conv/Gemm, Pow with any other exponent (``powf``), and
any float op not named here that rounds (libm functions).
"""
from __future__ import annotations

import math

import numpy as np
from onnx.reference.op_run import OpRun

F32 = np.float32
TAYLOR = 7
LOG2E = F32(1.0 / math.log(2.0))
LN2_HI = F32(0.693145751953125)          # 16 significant bits: k * LN2_HI is exact for |k| <= 256
LN2_LO = F32(math.log(2.0) - 0.693145751953125)
EXP_LO = F32(-86.0)                      # below: 0 (exp(-86) = 4.4e-38, 2^(k-1) and p * 2^(k-1) stay normal)
EXP_HI = F32(88.72)                      # above: +inf
COEFFS = tuple(F32(1.0 / math.factorial(n)) for n in range(TAYLOR + 1))
POW_WHOLE_MAX = 8                        # Pow(x, ±n) with a whole n in [1, 8]: products (module docstring)
# log: fdlibm's logf (FreeBSD e_logf.c), its general path for every x
LOG_LN2_HI = np.uint32(0x3F317180).view(F32)   # 6.9313812256e-01, 12 significant bits: k * LOG_LN2_HI exact
LOG_LN2_LO = np.uint32(0x3717F7D1).view(F32)   # 9.0580006145e-06
LOG_LG = tuple(np.uint32(b).view(F32) for b in (0x3F2AAAAA, 0x3ECCCE13, 0x3E91E9EE, 0x3E789E26))
LOG_TINY = F32(2.0 ** -126)                     # below (subnormal): scaled by 2^25 first
# sin / cos: k = nearest multiple of π/2, r = x − k·π/2 with π/2 in five float32 parts (the first four of 8
# significant bits: k·part exact for |k| < 2^16), Cephes' sinf / cosf polynomials on [−π/4, π/4]
TWO_OVER_PI = F32(2.0 / math.pi)
PIO2_PARTS = tuple(np.uint32(b).view(F32) for b in (0x3FC90000, 0x39FE0000, 0xB52C0000, 0x30880000, 0x2C34611A))
TRIG_K_EXACT = 2 ** 16                           # |k| below: every k·part exact (|x| < 102 943)
SIN_COEFFS = tuple(F32(v) for v in (-1.6666654611e-1, 8.3321608736e-3, -1.9515295891e-4))
COS_COEFFS = tuple(F32(v) for v in (4.166664568298827e-2, -1.388731625493765e-3, 2.443315711809948e-5))


def exp(x: np.ndarray) -> np.ndarray:
    """float32 exp, operation for operation what the targets compute (module docstring)."""
    x = np.asarray(x, F32)
    with np.errstate(invalid="ignore", over="ignore"):
        xc = np.minimum(np.maximum(x, EXP_LO), EXP_HI)          # keeps k in [-124, 128]
        k = np.floor(xc * LOG2E + F32(0.5))
        r = (xc - k * LN2_HI) - k * LN2_LO
        p = COEFFS[TAYLOR]
        for c in COEFFS[TAYLOR - 1::-1]:
            p = p * r + c
        scale = ((k.astype(np.int32) + 126) << 23).view(F32)  # 2^(k-1)
        y = (p * scale) * F32(2.0)
        y = np.where(x < EXP_LO, F32(0.0), np.where(x > EXP_HI, F32(np.inf), y))
    return np.where(np.isnan(x), x, y).astype(F32)


def log(x: np.ndarray) -> np.ndarray:
    """float32 natural log, operation for operation what the targets compute (module docstring)."""
    x = np.asarray(x, F32)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        sub = x < LOG_TINY
        xs = np.where(sub, x * F32(2.0 ** 25), x)
        bits = xs.view(np.int32)
        mant = bits & np.int32(0x007FFFFF)
        i = (mant + np.int32(0x4AFB20)) & np.int32(0x00800000)       # 1 where the mantissa is past sqrt(2)
        m = (mant | (i ^ np.int32(0x3F800000))).view(F32)              # in [sqrt(2)/2, sqrt(2))
        k = (bits >> 23) - np.int32(127) + (i >> 23) - np.where(sub, np.int32(25), np.int32(0))
        f = m - F32(1.0)
        s = f / (F32(2.0) + f)
        z = s * s
        w = z * z
        r = z * (LOG_LG[0] + w * LOG_LG[2]) + w * (LOG_LG[1] + w * LOG_LG[3])
        hfsq = (F32(0.5) * f) * f
        dk = k.astype(F32)
        y = dk * LOG_LN2_HI - ((hfsq - (s * (hfsq + r) + dk * LOG_LN2_LO)) - f)
        y = np.where(x == F32(0.0), F32(-np.inf), np.where(x == F32(np.inf), x, y))
    return np.where((x < 0) | np.isnan(x), F32(np.nan), y).astype(F32)


def _quadrant(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(q, sin r, cos r) for ``x = k·π/2 + r``, ``q = k mod 4`` (as float32, module docstring)."""
    k = np.floor(x * TWO_OVER_PI + F32(0.5))
    r = x
    for part in PIO2_PARTS:
        r = r - k * part
    q = k - F32(4.0) * np.floor(k * F32(0.25))
    z = r * r
    s0, s1, s2 = SIN_COEFFS
    c0, c1, c2 = COS_COEFFS
    sin_r = r + (r * z) * ((s2 * z + s1) * z + s0)
    cos_r = ((((c2 * z + c1) * z + c0) * z) * z - F32(0.5) * z) + F32(1.0)
    return q, sin_r, cos_r


def sin(x: np.ndarray) -> np.ndarray:
    """float32 sine, operation for operation what the targets compute (module docstring)."""
    x = np.asarray(x, F32)
    with np.errstate(invalid="ignore", over="ignore"):
        q, s, c = _quadrant(x)
        y = np.where(q == 0, s, np.where(q == 1, c, np.where(q == 2, -s, -c)))
        return np.where(x == 0, x, y).astype(F32)  # sin(−0) = −0


def cos(x: np.ndarray) -> np.ndarray:
    """float32 cosine, operation for operation what the targets compute (module docstring)."""
    x = np.asarray(x, F32)
    with np.errstate(invalid="ignore", over="ignore"):
        q, s, c = _quadrant(x)
        return np.where(q == 0, c, np.where(q == 1, -s, np.where(q == 2, -c, s))).astype(F32)


def softplus(x: np.ndarray) -> np.ndarray:
    """``max(x, 0) + log(1 + exp(-|x|))``: TVM's import of ONNX Softplus (never overflows; ONNX writes
    ``log(exp(x) + 1)``, +inf from x > 88.7)."""
    x = np.asarray(x, F32)
    return (np.maximum(x, F32(0.0)) + log(F32(1.0) + exp(-np.abs(x)))).astype(F32)


def mish(x: np.ndarray) -> np.ndarray:
    """``x · tanh(log(1 + exp(x)))``: ONNX Mish (opset 18) as its definition and TVM's import write it."""
    x = np.asarray(x, F32)
    return (x * tanh(log(F32(1.0) + exp(x)))).astype(F32)


def sigmoid(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, F32)
    e = exp(-np.abs(x))
    d = F32(1.0) + e
    return np.where(x >= 0, F32(1.0) / d, e / d).astype(F32)


def tanh(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, F32)
    e = exp(F32(-2.0) * np.abs(x))
    t = (F32(1.0) - e) / (F32(1.0) + e)
    return np.where(x < 0, -t, t).astype(F32)


def reduce_sum(x: np.ndarray, axes: tuple[int, ...], keepdims: bool) -> np.ndarray:
    """Sum over `axes` in index order (row-major over several axes), one float32 accumulator from 0."""
    x = np.asarray(x, F32)
    axes = tuple(sorted(a % x.ndim for a in axes)) if x.ndim else ()
    rest = [a for a in range(x.ndim) if a not in axes]
    moved = np.transpose(x, rest + list(axes))
    flat = moved.reshape(moved.shape[:len(rest)] + (-1,))
    acc = np.zeros(flat.shape[:-1], F32)
    for k in range(flat.shape[-1]):
        acc = acc + flat[..., k]
    if keepdims:
        acc = acc.reshape([1 if a in axes else x.shape[a] for a in range(x.ndim)])
    return acc


def reduce_mean(x: np.ndarray, axes: tuple[int, ...], keepdims: bool) -> np.ndarray:
    x = np.asarray(x, F32)
    count = int(np.prod([x.shape[a] for a in axes])) if axes else 1
    return (reduce_sum(x, axes, keepdims) / F32(count)).astype(F32)


def average_pool(x: np.ndarray, kernel: tuple[int, ...], strides: tuple[int, ...], pads: tuple[int, ...],
                 count_include_pad: bool) -> np.ndarray:
    """ONNX AveragePool over the spatial axes (2 onwards), ``pads`` = begins then ends: each window added in index
    order (row-major over the kernel) into a float32 accumulator from 0, divided by the count (module docstring).
    Padding adds nothing: ``acc + 0`` is ``acc``."""
    x = np.asarray(x, F32)
    nd = len(kernel)
    begins, ends = pads[:nd], pads[nd:]
    out = [(x.shape[2 + d] + begins[d] + ends[d] - kernel[d]) // strides[d] + 1 for d in range(nd)]
    width = [(0, 0), (0, 0)] + [(begins[d], ends[d]) for d in range(nd)]
    xp = np.pad(x, width)
    inside = np.pad(np.ones(x.shape[2:], np.int64), width[2:])
    acc = np.zeros(x.shape[:2] + tuple(out), F32)
    count = np.zeros(tuple(out), np.int64)
    for offset in np.ndindex(*kernel):
        window = tuple(slice(o, o + s * (n - 1) + 1, s) for o, s, n in zip(offset, strides, out))
        acc = acc + xp[(Ellipsis, *window)]
        count += inside[window]
    if count_include_pad:
        count = np.full_like(count, int(np.prod(kernel)))
    return (acc / np.maximum(count, 1).astype(F32)).astype(F32)


def softmax(x: np.ndarray, axis: int) -> np.ndarray:
    x = np.asarray(x, F32)
    e = exp(x - x.max(axis=axis, keepdims=True))
    return (e / reduce_sum(e, (axis,), True)).astype(F32)


def log_softmax(x: np.ndarray, axis: int) -> np.ndarray:
    x = np.asarray(x, F32)
    d = x - x.max(axis=axis, keepdims=True)
    return (d - log(reduce_sum(exp(d), (axis,), True))).astype(F32)


def matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """ONNX MatMul (numpy.matmul broadcasting) with each dot product added in k order, never fused: every output is
    ``((0 + a0*b0) + a1*b1) + ...`` in float32, each product rounded before it is added. Each step reads one
    contiguous row of ``b`` (a transposed weight, as a tied LM head is, is copied once: read in place, its rows are
    strided and the 576 x 49152 head of SmolLM2 took 8x longer) and works in place (no array allocated per k)."""
    a, b = np.asarray(a, F32), np.asarray(b, F32)
    a2 = a[None, :] if a.ndim == 1 else a
    b2 = np.ascontiguousarray(b[:, None] if b.ndim == 1 else b)
    acc = np.zeros(np.broadcast_shapes(a2.shape[:-2], b2.shape[:-2]) + (a2.shape[-2], b2.shape[-1]), F32)
    prod = np.empty_like(acc)
    a_k = np.ascontiguousarray(np.moveaxis(a2, -1, 0))[..., None]  # a_k[k]: column k of a, (batch..., m, 1)
    for k in range(a2.shape[-1]):
        np.multiply(a_k[k], b2[..., k:k + 1, :], out=prod)
        np.add(acc, prod, out=acc)
    if a.ndim == 1:
        acc = acc[..., 0, :]
    if b.ndim == 1:
        acc = acc[..., 0]
    return acc


# ------------------------------------------------------------------------- the reference's float ops (onnx OpRun)
class _FloatOp(OpRun):
    op_domain = ""

    def _attr(self, name: str, default=None):
        v = getattr(self, name, None)
        return default if v is None else v


def _is_f32(*xs: np.ndarray) -> bool:
    return all(np.asarray(x).dtype == F32 for x in xs)


class Exp(_FloatOp):
    def _run(self, x, **_):
        return (exp(x) if _is_f32(x) else np.exp(x).astype(x.dtype),)


class Log(_FloatOp):
    def _run(self, x, **_):
        return (log(x) if _is_f32(x) else np.log(x),)


class Sin(_FloatOp):
    def _run(self, x, **_):
        return (sin(x) if _is_f32(x) else np.sin(x),)


class Cos(_FloatOp):
    def _run(self, x, **_):
        return (cos(x) if _is_f32(x) else np.cos(x),)


class Softplus(_FloatOp):
    def _run(self, x, **_):
        return (softplus(x) if _is_f32(x) else np.log(np.exp(x) + 1).astype(x.dtype),)


class Mish(_FloatOp):
    def _run(self, x, **_):
        return (mish(x) if _is_f32(x) else (x * np.tanh(np.log1p(np.exp(x)))).astype(x.dtype),)


class Sigmoid(_FloatOp):
    def _run(self, x, **_):
        return (sigmoid(x) if _is_f32(x) else (1 / (1 + np.exp(-x))).astype(x.dtype),)


class Tanh(_FloatOp):
    def _run(self, x, **_):
        return (tanh(x) if _is_f32(x) else np.tanh(x),)


class Softmax(_FloatOp):
    def _run(self, x, **_):
        axis = int(self._attr("axis", -1))
        if not _is_f32(x):
            e = np.exp(x - x.max(axis=axis, keepdims=True))
            return ((e / e.sum(axis=axis, keepdims=True)).astype(x.dtype),)
        return (softmax(x, axis),)


class LogSoftmax(_FloatOp):
    def _run(self, x, **_):
        axis = int(self._attr("axis", -1))
        if not _is_f32(x):
            d = x - x.max(axis=axis, keepdims=True)
            return ((d - np.log(np.exp(d).sum(axis=axis, keepdims=True))).astype(x.dtype),)
        return (log_softmax(x, axis),)


def pow_exponent(y) -> float | None:
    """The exponent ``y`` (a one-element value) where ``Pow(x, y)`` is specified -- a multiple of 1/4 with ``|y|``
    in ``[1/4, POW_WHOLE_MAX]`` -- and then computed by :func:`pow_specified`; None otherwise."""
    y = np.asarray(y)
    if y.size != 1 or not np.issubdtype(y.dtype, np.number):
        return None
    v = float(y.reshape(()))
    if (4 * v).is_integer() and 0.25 <= abs(v) <= POW_WHOLE_MAX:
        return v
    return None


def pow_specified(x, e: float, sqrt, one):
    """``x ** e`` for an exponent :func:`pow_exponent` accepts, in float32 operations: ``x^n`` for the whole part
    ``n`` of ``|e|`` as ``n − 1`` products left to right, its quarters as a root -- ``sqrt(x)`` (1/2),
    ``sqrt(sqrt(x))`` (1/4), ``sqrt(x)·sqrt(sqrt(x))`` (3/4; LocalResponseNorm's β) -- multiplied after it, then
    ``one / that`` for a negative ``e`` (numpy arrays with ``np.sqrt`` and ``F32(1)``, TE expressions with ``te.sqrt``
    and a float32 constant alike)."""
    whole, quarters = int(abs(e)), int(round((abs(e) % 1) * 4))
    root = None
    if quarters == 2:
        root = sqrt(x)
    elif quarters == 1:
        root = sqrt(sqrt(x))
    elif quarters == 3:
        half = sqrt(x)
        root = half * sqrt(half)
    out = None
    for _ in range(whole):
        out = x if out is None else out * x
    out = root if out is None else out if root is None else out * root
    return one / out if e < 0 else out


class Pow(_FloatOp):
    def _run(self, x, y, **_):
        e = pow_exponent(y) if _is_f32(x) else None
        if e is not None:
            with np.errstate(divide="ignore", invalid="ignore"):  # IEEE's inf and NaN, as a kernel gives them
                return (np.asarray(pow_specified(x, e, np.sqrt, F32(1)), F32),)
        return (np.power(x, y).astype(x.dtype),)


def _reduce_axes(op: _FloatOp, x: np.ndarray, axes) -> tuple[int, ...] | None:
    """The axes a Reduce* op reduces (opset 13 attribute or opset 18 input); None: the identity."""
    if axes is None:
        axes = op._attr("axes")
    if axes is None or len(np.asarray(axes).ravel()) == 0:
        return None if int(op._attr("noop_with_empty_axes", 0)) else tuple(range(x.ndim))
    return tuple(int(a) % x.ndim for a in np.asarray(axes).ravel())


class _Reduce(_FloatOp):
    """ReduceSum / ReduceMean: ``fn`` (the specified one) on float32, ``np_fn`` (numpy's) on other types."""
    fn: staticmethod
    np_fn: staticmethod

    def _run(self, x, axes=None, **_):
        keep = bool(int(self._attr("keepdims", 1)))
        ax = _reduce_axes(self, x, axes)
        if ax is None:
            return (x,)
        if not _is_f32(x):
            return (np.asarray(self.np_fn(x, axis=ax, keepdims=keep)).astype(x.dtype),)
        return (self.fn(x, ax, keep),)


class ReduceSum(_Reduce):
    fn = staticmethod(reduce_sum)
    np_fn = staticmethod(np.sum)


class ReduceMean(_Reduce):
    fn = staticmethod(reduce_mean)
    np_fn = staticmethod(np.mean)


class GlobalAveragePool(_FloatOp):
    """The mean over every spatial axis (2 onwards), kept as size-1 axes: :func:`reduce_mean` on float32 (what TVM's
    adaptive pool adds; onnx's reference op takes numpy's pairwise mean, up to an ulp away: Paddle's SqueezeNet ends
    in one, and 55 % of its float outputs differed from every target's in the last bit)."""

    def _run(self, x, **_):
        axes = tuple(range(2, np.ndim(x)))
        if not _is_f32(x):
            return (np.mean(x, axis=axes, keepdims=True).astype(x.dtype),)
        return (reduce_mean(x, axes, True),)


class AveragePool(_FloatOp):
    """:func:`average_pool` on float32 with explicit (or VALID) padding, unit dilations and ``ceil_mode`` 0; any other
    form is onnx's own reference op (its numpy means, not specified)."""

    def _run(self, x, auto_pad=None, ceil_mode=None, dilations=None, kernel_shape=None, pads=None, strides=None,
             count_include_pad=None):
        from onnx.reference.ops.op_average_pool import AveragePool_19

        nd = len(kernel_shape)
        pad = auto_pad if isinstance(auto_pad, str) else (auto_pad or b"NOTSET").decode()
        if (_is_f32(x) and pad in ("NOTSET", "VALID") and not ceil_mode and all(d == 1 for d in dilations or [1])):
            return (average_pool(x, tuple(kernel_shape), tuple(strides or [1] * nd),
                                 tuple(pads or [0] * 2 * nd) if pad == "NOTSET" else (0,) * 2 * nd,
                                 bool(count_include_pad)),)
        return AveragePool_19._run(self, x, auto_pad=auto_pad, ceil_mode=ceil_mode, dilations=dilations,
                                   kernel_shape=kernel_shape, pads=pads, strides=strides,
                                   count_include_pad=count_include_pad)


_RESIZE_COORDINATES = ("half_pixel", "pytorch_half_pixel", "asymmetric", "align_corners")


def resize_linear(x: np.ndarray, out_hw: tuple[int, int], coordinates: str) -> np.ndarray:
    """Bilinear resize of the last two axes of float32 ``x`` to ``out_hw`` as TVM's TOPI computes it on every
    target: the source coordinate from the ratio ``in / out`` in float32 (``(o + 0.5) * (in / out) - 0.5`` for
    half_pixel), its floor and fraction, the two neighbours' indices each clamped to the image, and
    ``a * (1 - t) + b * t`` along x on both rows, then along y; every operation rounded to float32."""
    x = np.asarray(x, F32)

    def taps(out: int, size: int):
        o = np.arange(out, dtype=F32)
        ratio = F32(size) / F32(out)
        if coordinates == "half_pixel" or (coordinates == "pytorch_half_pixel" and out > 1):
            c = (o + F32(0.5)) * ratio - F32(0.5)
        elif coordinates == "pytorch_half_pixel":
            c = np.zeros(out, F32)
        elif coordinates == "asymmetric":
            c = ratio * o
        else:  # align_corners
            c = (F32(size - 1) / F32(out - 1)) * o
        lo = np.floor(c).astype(np.int64)
        t = (c - lo.astype(F32)).astype(F32)
        return np.clip(lo, 0, size - 1), np.clip(lo + 1, 0, size - 1), t

    def lerp(a, b, t):
        return a * (F32(1) - t) + b * t

    (y0, y1, ty), (x0, x1, tx) = taps(out_hw[0], x.shape[-2]), taps(out_hw[1], x.shape[-1])
    rows0, rows1 = x[..., y0, :], x[..., y1, :]
    top = lerp(rows0[..., x0], rows0[..., x1], tx)
    bottom = lerp(rows1[..., x0], rows1[..., x1], tx)
    return lerp(top, bottom, ty[:, None]).astype(F32)


class Resize(_FloatOp):
    """:func:`resize_linear` for a float32 bilinear Resize of the last two axes (the coordinate modes of
    ``_RESIZE_COORDINATES``; no antialias, no axes, no aspect-ratio policy, ``align_corners`` to more than one
    pixel; output sizes given, or scales that make whole sizes); any other form is onnx's own reference op (nearest
    copies values: nothing to specify; with a scale like 9 x 0.5 TOPI's ``in / out`` is another mapping than
    ONNX's ``1 / scale``, and the report shows the difference)."""

    def _run(self, x, roi=None, scales=None, sizes=None, antialias=None, axes=None, coordinate_transformation_mode=None,
             cubic_coeff_a=None, exclude_outside=None, extrapolation_value=None, keep_aspect_ratio_policy=None,
             mode=None, nearest_mode=None):
        from onnx.reference.ops.op_resize import Resize as OnnxResize

        def text(v, default):
            return (v.decode() if isinstance(v, bytes) else v) or default

        coordinates = text(coordinate_transformation_mode, "half_pixel")
        x = np.asarray(x)
        if sizes is not None and np.size(sizes):
            out = tuple(int(d) for d in np.asarray(sizes).reshape(-1))
        elif scales is not None and np.size(scales):
            exact = np.asarray(scales, np.float64).reshape(-1) * np.array(x.shape)
            # ONNX maps coordinates with the scale, TOPI with in / out: the same only when in * scale is whole
            out = tuple(exact.astype(int)) if np.all(exact == np.floor(exact)) else None
        else:
            out = None
        if (_is_f32(x) and text(mode, "nearest") == "linear" and coordinates in _RESIZE_COORDINATES
                and not antialias and axes is None and text(keep_aspect_ratio_policy, "stretch") == "stretch"
                and out is not None and len(out) == x.ndim == 4 and out[:2] == x.shape[:2]
                and not (coordinates == "align_corners" and min(out[2:]) < 2)):
            return (resize_linear(x, out[2:], coordinates),)
        return OnnxResize._run(self, x, roi, scales=scales, sizes=sizes, antialias=antialias, axes=axes,
                               coordinate_transformation_mode=coordinate_transformation_mode,
                               cubic_coeff_a=cubic_coeff_a, exclude_outside=exclude_outside,
                               extrapolation_value=extrapolation_value,
                               keep_aspect_ratio_policy=keep_aspect_ratio_policy, mode=mode, nearest_mode=nearest_mode)


class ConvTranspose(_FloatOp):
    """onnx's own reference ConvTranspose, one group at a time: with ``group > 1`` it fails outright ("cannot
    reshape array"), which left the integer reference unable to run any model with a grouped transposed conv kept
    float. Not specified arithmetic (float convs are each engine's own)."""

    def _run(self, x, w, b=None, auto_pad=None, dilations=None, group=None, kernel_shape=None, output_padding=None,
             output_shape=None, pads=None, strides=None):
        from onnx.reference.ops.op_conv_transpose import ConvTranspose as OnnxConvTranspose

        attrs = dict(auto_pad=auto_pad, dilations=dilations, kernel_shape=kernel_shape, output_padding=output_padding,
                     output_shape=output_shape, pads=pads, strides=strides)
        g = int(group or 1)
        if g == 1:
            return OnnxConvTranspose._run(self, x, w, b, group=1, **attrs)
        cin, cout = x.shape[1] // g, w.shape[1]
        parts = [OnnxConvTranspose._run(self, x[:, i * cin:(i + 1) * cin], w[i * cin:(i + 1) * cin],
                                        None if b is None else b[i * cout:(i + 1) * cout], group=1, **attrs)[0]
                 for i in range(g)]
        return (np.concatenate(parts, axis=1),)


class MatMul(_FloatOp):
    def _run(self, a, b, **_):
        return (matmul(a, b) if _is_f32(a, b) else np.matmul(a, b),)


def layer_norm(x: np.ndarray, scale: np.ndarray | None, bias: np.ndarray | None, axis: int, epsilon: float
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ONNX LayerNormalization as its function body defines it (mean, ``D = X − mean``, ``mean(D·D)``, ``+ ε``,
    sqrt, reciprocal, ``D·inv·scale + bias``) with :func:`reduce_mean` for both means: Y, Mean, InvStdDev."""
    x = np.asarray(x, F32)
    axes = tuple(range(axis % x.ndim, x.ndim))
    mean = reduce_mean(x, axes, True)
    d = x - mean
    inv = F32(1.0) / np.sqrt(reduce_mean(d * d, axes, True) + F32(epsilon))
    y = (d * inv).astype(F32)
    if scale is not None:
        y = y * np.asarray(scale, F32)
    if bias is not None:
        y = y + np.asarray(bias, F32)
    return y.astype(F32), mean, inv.astype(F32)


class LayerNormalization(_FloatOp):
    def _run(self, x, scale, bias=None, **_):
        if not _is_f32(x, scale):
            raise NotImplementedError("LayerNormalization: only float32 is specified (qcompile.floatspec)")
        return layer_norm(x, scale, bias, int(self._attr("axis", -1)), float(self._attr("epsilon", 1e-5)))


def batch_norm(x: np.ndarray, scale: np.ndarray, bias: np.ndarray, mean: np.ndarray, var: np.ndarray,
               epsilon: float) -> np.ndarray:
    """ONNX BatchNormalization at inference: ``((X − mean) / sqrt(var + ε)) · scale + bias`` over axis 1, in X's
    float type, each operation rounded once, in the order TVM's legalization (TOPI) computes it."""
    dt = np.asarray(x).dtype
    shape = (-1,) + (1,) * (np.ndim(x) - 2)

    def per_channel(v: np.ndarray) -> np.ndarray:
        return np.asarray(v, dt).reshape(shape)

    y = (x - per_channel(mean)) / np.sqrt(per_channel(var) + dt.type(epsilon))
    return (y * per_channel(scale) + per_channel(bias)).astype(dt)


class BatchNormalization(_FloatOp):
    """Inference only. onnx's own reference op takes a ``momentum`` attribute (opsets 9 to 13, which Paddle2ONNX and
    older torch exports write on every BatchNormalization) to mean training mode and normalizes with the batch's own
    statistics: a Paddle DenseNet's unfused BatchNorms (after a pool, a concat) were up to 3 steps off in 12 % of
    the outputs, and the integer comparison of every target with them."""

    def _run(self, x, scale, bias, mean, var, **_):
        if self._attr("training_mode", 0):
            raise NotImplementedError("BatchNormalization with training_mode=1 is not an inference op")
        return (batch_norm(x, scale, bias, mean, var, float(self._attr("epsilon", 1e-5))),)


def group_norm(x: np.ndarray, scale: np.ndarray | None, bias: np.ndarray | None, groups: int, epsilon: float
               ) -> np.ndarray:
    """GroupNormalization as its ONNX function body computes it (``D = X − mean``, ``D / sqrt(mean(D·D) + ε)`` per
    sample and group of channels, then ``· scale + bias`` per channel), with :func:`reduce_mean`'s in-order means over
    the group's channels and the spatial axes, row-major. InstanceNormalization is the case of one channel per
    group."""
    x = np.asarray(x, F32)
    n, c = x.shape[:2]
    g = x.reshape(n, groups, -1)
    mean = reduce_mean(g, (2,), True)
    d = g - mean
    y = (d / np.sqrt(reduce_mean(d * d, (2,), True) + F32(epsilon))).reshape(x.shape)
    shape = (-1,) + (1,) * (x.ndim - 2)
    if scale is not None:
        y = y * np.asarray(scale, F32).reshape(shape)
    if bias is not None:
        y = y + np.asarray(bias, F32).reshape(shape)
    return y.astype(F32)


def instance_norm(x: np.ndarray, scale: np.ndarray, bias: np.ndarray, epsilon: float) -> np.ndarray:
    """ONNX InstanceNormalization (PyTorch's GroupNorm export: a reshape to one instance per group around it) as TVM's
    importer writes it: :func:`group_norm` with a group per channel (onnx's reference takes numpy's pairwise mean and
    var and multiplies by the scale before dividing: 1 ulp apart in a quarter of a BiT's outputs)."""
    return group_norm(x, scale, bias, np.shape(x)[1], epsilon)


class InstanceNormalization(_FloatOp):
    def _run(self, x, scale, bias, **_):
        if not _is_f32(x, scale, bias):
            raise NotImplementedError("InstanceNormalization: only float32 is specified (qcompile.floatspec)")
        return (instance_norm(x, scale, bias, float(self._attr("epsilon", 1e-5))),)


class GroupNormalization(_FloatOp):
    """Opset 18 (a scale and bias per group) and 21 (per channel); float32 computation (``stash_type`` 1)."""

    def _run(self, x, scale, bias, **_):
        if not _is_f32(x, scale, bias) or int(self._attr("stash_type", 1)) != 1:
            raise NotImplementedError("GroupNormalization: only float32 is specified (qcompile.floatspec)")
        groups, channels = int(self._attr("num_groups")), x.shape[1]
        if np.size(scale) == groups != channels:  # opset 18: per group, the same for each of its channels
            scale, bias = (np.repeat(np.asarray(v, F32).reshape(-1), channels // groups) for v in (scale, bias))
        return (group_norm(x, scale, bias, groups, float(self._attr("epsilon", 1e-5))),)


FLOAT_OPS = [Exp, Log, Sin, Cos, Softplus, Mish, Sigmoid, Tanh, Softmax, LogSoftmax, Pow, ReduceSum,
             ReduceMean, GlobalAveragePool, AveragePool, MatMul, LayerNormalization, BatchNormalization,
             InstanceNormalization, GroupNormalization, Resize, ConvTranspose]

__all__ = ["FLOAT_OPS", "average_pool", "batch_norm", "cos", "exp", "group_norm", "instance_norm", "layer_norm", "log",
           "log_softmax", "matmul", "mish", "reduce_mean", "reduce_sum", "resize_linear", "sigmoid", "sin",
           "softmax", "softplus", "tanh"]
