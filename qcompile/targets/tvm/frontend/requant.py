"""Requantization as integer Relax expressions, bit-exact with ``qcompile/reference.py``: gemmlowp's
SaturatingRoundingDoublingHighMul then RoundingDivideByPOT with per-channel Q31 multipliers, in closed forms
(:func:`requantize_expr`, which proves them): one ``int32 x int32 -> int64`` product plus a 64-bit rounding constant,
the rest in int32."""
from __future__ import annotations

import logging

import numpy as np
import tvm
from tvm import relax

from qcompile.errors import TargetError

logger = logging.getLogger(__name__)


I64 = "int64"


def _np(e: relax.Expr, what: str) -> np.ndarray:
    if not isinstance(e, tvm.ir.GenericConst):
        raise TargetError(f"{what} must be a constant for the TVM lowering")
    return e.value.numpy()


def _c(v, dtype: str) -> relax.Constant:
    return relax.const(np.asarray(v).astype(dtype), dtype)


def _ndim(e: relax.Expr) -> int:
    return int(e.ty.ndim)


def _shape(e: relax.Expr) -> list[int]:
    return [int(d) for d in e.ty.shape.values]


def _dtype(e: relax.Expr) -> str:
    return str(e.ty.dtype)


def _per_axis(v: np.ndarray, axis: int, ndim: int) -> np.ndarray:
    v = np.asarray(v)
    if v.size == 1:
        return v.reshape(())
    shape = [1] * ndim
    shape[axis % ndim] = -1
    return v.reshape(shape)


I32_MIN, I32_MAX = -(1 << 31), (1 << 31) - 1
_INT32_EXACT = ("int8", "uint8", "int16", "uint16", "int32")  # input dtypes int32 holds exactly
_ZP_FOLD_MAX = 1 << 60  # |y_zp|·2^(31+n) up to this goes into the rounding constant (argument 8.)


def _zero_channels(m0: np.ndarray, shift: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(m0, shift)`` broadcast together, channels with ``M0 = 0`` (a multiplier under 2^-32: MBQM is 0 for every
    input) given another channel's right shift: every form below gives 0 for ``M0 = 0`` whatever ``n`` (argument
    3. for "right"), and one zero channel then no longer turns a "right" kernel into "mixed"."""
    m0, shift = (np.array(v, np.int64) for v in np.broadcast_arrays(np.asarray(m0, np.int64),
                                                                       np.asarray(shift, np.int64)))
    zero = m0 == 0
    if np.any(zero) and not np.all(zero):
        shift[zero] = min(int(shift[~zero].reshape(-1)[0]), 0)
    return m0, shift


POT_M0 = 1 << 30  # M = 2^(shift−31+30): a power of two


def _pot_fits(right: np.ndarray, x_bound: int | None) -> bool:
    """Every channel's ``|d| + 1 + 2^n`` (the "pot" form's int32 numerator, argument 11.) fits int32."""
    return x_bound is not None and int(right.max(initial=0)) <= 30 and \
        int(x_bound) + 1 + (1 << int(right.max(initial=0))) <= I32_MAX


def mbqm_form(m0: np.ndarray, shift: np.ndarray, pre: int = 0, x_bound: int | None = None) -> str:
    """The closed form :func:`requantize_expr` uses for ``MBQM(d·2^pre, M0·2^(shift−31))``, one for all channels:

    - ``"pot"``: ``M`` a power of two ``2^−(n+1)`` on every channel (``M0 = 2^30``, no pre or left shift) and the
      input's promised bound ``|d| ≤ x_bound`` small enough: int32 only (Add's one rounding,
      ``lowering.add_multipliers``);
    - ``"exact"``: no channel shifts right and every ``M0·2^(pre+left)`` is a multiple of 2^31 (TFLite's Add:
      ``M = 0.5`` after the 2^20 pre-shift): an int32 product;
    - ``"left"``: no channel shifts right (``M ≥ 0.5``): ``int32((a·M0 + 2^30) >> 31)``;
    - ``"right"``: every channel shifts right (the usual conv / matmul case): ``int32(q >> 32) >> (n − 1)``;
    - ``"mixed"``: both kinds of channels, or ``pre + left > 30``: one int64 shift by ``31 + n`` per channel.
    """
    m0, shift = _zero_channels(m0, shift)
    left, right = np.maximum(shift, 0), np.maximum(-shift, 0)
    if pre + int(left.max(initial=0)) > 30:
        return "mixed"
    if not pre and not np.any(left) and np.all(m0 == POT_M0) and _pot_fits(right, x_bound):
        return "pot"
    if not np.any(right):
        scaled = m0 << (pre + left)
        return "exact" if np.all(scaled % (1 << 31) == 0) and np.all(scaled >> 31 <= I32_MAX) else "left"
    return "right" if np.all(right > 0) else "mixed"


def _k(value, dtype: str) -> relax.Constant:
    """A requantization constant: a scalar where every element is equal (Relax legalizes a scalar constant to an
    immediate: no load), else the per-channel array; checked against ``dtype``."""
    v = np.asarray(value, np.int64)
    info = np.iinfo(dtype)
    if v.size and (v.min() < info.min or v.max() > info.max):
        raise TargetError(f"requantization constant out of {dtype} range")  # excluded by the forms' choice
    if v.size and np.all(v == v.reshape(-1)[0]):
        v = v.reshape(-1)[0]
    return _c(v, dtype)


def _multiplier(d: relax.Expr, m0: np.ndarray, leaf: bool) -> relax.Expr:
    """``M0`` as the int64 factor of ``int64(d)·M0``, in a form where LLVM sees that it has 32 bits, so that the
    product is one 32x32->64 multiply (SMULL on Thumb, vpmuldq on x86) rather than a 64x64 one (UMULL + two MLA;
    vpmullq). One value: an immediate. Per channel: an int32 constant widened inside the kernel, which needs a data
    dependence, ``astype(m0 + d·0)`` (FoldConstant would fold ``astype(constant)`` into an int64 constant, and
    ``zeros_like`` into a full-size one); only where ``d`` is a ``leaf`` (a value read from memory: the
    accumulator), since the inlined epilogue repeats ``d``'s expression for each use. Otherwise an int64 array."""
    op = relax.op
    k = _k(m0, "int32")
    if not k.ty.ndim:
        return _k(m0, I64)
    if leaf:
        return op.astype(op.add(k, op.multiply(d, _c(0, "int32"))), I64)
    return _k(m0, I64)


def requantize_expr(x: relax.Expr, m0: np.ndarray, shift: np.ndarray, *, x_zp: int = 0, pre: int = 0,
                    y_zp: int = 0, lo: int = I32_MIN, hi: int = I32_MAX, to: str = "int32",
                    bias: np.ndarray | None = None, leaf: bool = False, x_bound: int | None = None) -> relax.Expr:
    """``clamp(y_zp + MBQM((x − x_zp)·2^pre, M), lo, hi)`` cast to ``to``, equal to ``qcompile.reference`` for
    every input the reference accepts. ``m0`` (Q31 in ``{0} ∪ [2^30, 2^31)``, ``lowering.quantize_multiplier``)
    and ``shift`` broadcast against ``x``. ``bias`` (int32 constant; ``x_zp = 0``, ``pre = 0``, no left shift):
    the input is ``x + bias`` (a QLinear's ``acc + (b − z_x·Σw)``, which the reference checks to fit int32),
    folded into the 64-bit rounding constant.

    Why this shape: the requantization runs once per output element of every conv / matmul; in int64 it was ~50
    Thumb instructions per element (64-bit variable shifts, compares and clamps on register pairs; no SMULL,
    since an int64 constant hides that the multiplier has 32 bits). Here the only 64-bit work is one
    ``int32 × int32 -> int64`` product (SMULL / SMLAL on Thumb, vpmuldq on x86) and one 64-bit constant add;
    everything after is int32, and the zero point usually rides in the rounding constant.

    Notation: ``d = x − x_zp``, ``a = d·2^(pre+left)`` (the reference checks both fit int32, so int32 arithmetic
    computes them exactly), ``P = a·M0`` (``|P| < 2^62``), ``n`` the right shift. gemmlowp's two steps, in closed
    form (docs/integer.md): ``h = SRDHM(a, M0) = floor((P + 2^30) / 2^31)`` (its saturating case needs
    ``a = M0 = INT32_MIN``, impossible since ``M0 ≥ 0``) and ``RDBPOT(h, n) = floor((h + 2^(n−1) − [h<0]) / 2^n)``
    for ``n ≥ 1``.

    1. ``h`` fits int32: ``|P| ≤ 2^31·(2^31−1)`` gives ``h ∈ [−2^31+1, 2^31−2]``.
    2. One division: for an integer ``c``, ``h + c = floor((P + 2^30 + c·2^31) / 2^31)``, and
       ``floor(floor(X / 2^31) / 2^n) = floor(X / 2^(31+n))``; hence
       ``RDBPOT(h, n) = floor((P + 2^30 + 2^(30+n) − [h<0]·2^31) / 2^(31+n))``.
    3. ``[h<0] = [P + 2^30 < 0]`` may be replaced by ``[a<0]``: they differ only where ``a < 0 ≤ P + 2^30``,
       i.e. ``M0 = 0`` or (``a = −1``, ``M0 = 2^30``); there ``P + 2^30 ∈ [0, 2^30]`` and both numerators lie in
       ``[0, 2^(31+n))`` (``n ≥ 1``), so both quotients are 0.
    4. "right" (every ``n ≥ 1``, so no left shift): ``q = P + K − [a<0]·2^31``, ``K = 2^30 + 2^(30+n)``, fits
       int64 (``|q| < 2^62 + 2^61 + 2^30``), and ``floor(q / 2^(31+n)) = floor(floor(q / 2^32) / 2^(n−1))``:
       the high word of ``q`` (``|q >> 32| < 2^31``), then an int32 shift by ``n − 1``. ``|result| ≤ 2^30``
       (``|h| < 2^31``, halved at least, rounded).
    5. "left" (every ``n = 0``): ``h = int32((P + 2^30) >> 31)`` (1.).
    6. "exact": ``M0·2^(pre+left) = c·2^31`` with an integer ``c < 2^31`` makes ``P + 2^30 = d·c·2^31 + 2^30``,
       so ``h = d·c``: an int32 product that equals ``h`` and therefore does not overflow.
    7. Bias: ``(acc + b)·M0 + K = acc·M0 + (b·M0 + K)``; each term and the sum fit int64 (``|b·M0| < 2^62``; the
       sum is ``q``), and ``[acc + b < 0] = [acc ≤ ~b]`` (``~b = −b − 1`` always fits int32).
    8. Zero point in "right": ``y + z = floor((q + z·2^(31+n)) / 2^(31+n))`` (an integer added to the quotient),
       used when ``|z|·2^(31+n) ≤ 2^60``: then ``|q + z·2^(31+n)| < 2^62 + 2^61 + 2^60 + 2^30 < 2^63`` and its high
       word still fits int32 (4.). The clamp then applies to the final value (``usat`` on Thumb for [0, 255]).
    9. "mixed": ``int32((P + K_c − [a<0]·C_c) >> (31 + n_c))`` in int64, ``K_c = 2^30 (+ 2^(30+n) if n ≥ 1)``,
       ``C_c = 2^31·[n_c ≥ 1]``: 2. and 3. per channel (``a`` in int64: also inputs wider than int32).
    10. Otherwise ``clamp(y + z, lo, hi)``: ``y + z`` first when ``|y| + |z|`` fits int32, else the bounds move:
        ``clamp(y + z, lo, hi) = clamp(y, lo − z, hi − z) + z`` with the moved bounds cut to int32 (``y`` is
        int32, so a bound beyond int32 never binds). A clamp that cannot bind is left out.
    11. "pot" (``M0 = 2^30`` and ``n ≥ 0`` on every channel, no left shift, ``|d| ≤ x_bound`` as promised by the
        lowering and checked by the reference): ``h = SRDHM(d, 2^30) = floor((d + 1) / 2)``, and for ``n ≥ 1``
        (2.) ``RDBPOT(h, n) = floor((d + 1 + 2^n − 2·[h<0]) / 2^(n+1))``; ``[h<0] = [d ≤ −2]`` may be replaced by
        ``[d<0]``: at ``d = −1`` both numerators (``2^n``, ``2^n − 2``) give 0. With ``K = 1 + 2^n``, ``C = 2``
        (``n ≥ 1``) or ``K = 1``, ``C = 0`` (``n = 0``, ``h`` itself): ``y = (d + K − C·[d<0]) >> (n + 1)`` in int32
        when ``x_bound + 1 + 2^n`` fits it; ``−C·[d<0]`` is ``(d >> 31)·C``. The zero point rides in ``K``
        (``+ z·2^(n+1)``) when that still fits; ``|y| ≤ (x_bound + K) / 2 + 1``.
    """
    op = relax.op
    i32 = "int32"
    m0, shift = _zero_channels(m0, shift)
    left, right = np.maximum(shift, 0), np.maximum(-shift, 0)
    xdt = _dtype(x)
    form = mbqm_form(m0, shift, pre, x_bound) if xdt in _INT32_EXACT else "mixed"
    if bias is not None and (x_zp or pre or np.any(left) or form not in ("left", "right") or xdt != i32):
        raise ValueError("a bias folds into the 'left' / 'right' forms only (int32 input, x_zp = 0, pre = 0)")
    if pre + int(left.max(initial=0)) > 62:
        raise TargetError("requantization pre-shift + multiplier exponent over 62 bits")
    b = np.int64(0) if bias is None else np.asarray(bias, np.int64)
    dt = I64 if form == "mixed" else i32
    d = x if xdt == dt else op.astype(x, dt)
    if x_zp:
        d = op.subtract(d, _c(x_zp, dt))
    if form != "exact" and (pre or np.any(left)):
        d = op.left_shift(d, _k(pre + left, dt))
    zp_done = False
    if form == "pot":
        one = right > 0
        k = 1 + np.where(one, np.left_shift(np.int64(1), right), 0)
        top = int(x_bound) + int(k.max())
        if y_zp and top + abs(y_zp) * (1 << (int(right.max()) + 1)) <= I32_MAX:
            k, zp_done = k + np.int64(y_zp) * np.left_shift(np.int64(1), right + 1), True
        y = op.add(d, _k(k, i32))
        if np.any(one):
            y = op.add(y, op.multiply(op.right_shift(d, _c(31, i32)), _k(np.where(one, 2, 0), i32)))
        y, bound = op.right_shift(y, _k(right + 1, i32)), top // 2 + 1
    elif form == "exact":
        y, bound = op.multiply(d, _k((m0 << (pre + left)) >> 31, i32)), I32_MAX
    elif form == "mixed":
        kpos = (1 << 30) + np.where(right > 0, np.left_shift(np.int64(1), 30 + right), 0)
        corr = op.multiply(op.astype(op.less(d, _c(0, I64)), I64), _k(np.where(right > 0, 1 << 31, 0), I64))
        q = op.subtract(op.add(op.multiply(d, _k(m0, I64)), _k(kpos, I64)), corr)
        y, bound = op.astype(op.right_shift(q, _k(31 + right, I64)), i32), I32_MAX
    else:
        prod = op.multiply(op.astype(d, I64), _multiplier(d, m0, leaf))
        if form == "left":
            y = op.astype(op.right_shift(op.add(prod, _k(b * m0 + (1 << 30), I64)), _c(31, I64)), i32)
            bound = I32_MAX
        else:
            kpos = b * m0 + (1 << 30) + np.left_shift(np.int64(1), 30 + right)
            if y_zp and abs(y_zp) << (31 + int(right.max())) <= _ZP_FOLD_MAX:
                kpos, zp_done = kpos + np.int64(y_zp) * np.left_shift(np.int64(1), 31 + right), True
            neg = op.less(d, _c(0, i32)) if bias is None else op.less_equal(d, _k(~b, i32))
            q = op.subtract(op.add(prod, _k(kpos, I64)), op.multiply(op.astype(neg, I64), _c(1 << 31, I64)))
            y = op.astype(op.right_shift(q, _c(32, I64)), i32)
            if np.any(right > 1):
                y = op.right_shift(y, _k(right - 1, i32))
            bound = 1 << 30
    if zp_done or bound + abs(y_zp) <= I32_MAX:
        if y_zp and not zp_done:
            y = op.add(y, _c(y_zp, i32))
        if lo > max(I32_MIN, y_zp - bound):
            y = op.maximum(y, _c(lo, i32))
        if hi < min(I32_MAX, y_zp + bound):
            y = op.minimum(y, _c(hi, i32))
    else:
        lo_s, hi_s = max(lo - y_zp, I32_MIN), min(hi - y_zp, I32_MAX)
        if lo_s > I32_MIN:
            y = op.maximum(y, _c(lo_s, i32))
        if hi_s < I32_MAX:
            y = op.minimum(y, _c(hi_s, i32))
        if y_zp:
            y = op.add(y, _c(y_zp, i32))
    return y if to == i32 else op.astype(y, to)


def mbqm(x: relax.Expr, m0: np.ndarray, shift: np.ndarray, *, leaf: bool = False) -> relax.Expr:
    """MultiplyByQuantizedMultiplier of an int32 expression (int32 result): :func:`requantize_expr` without zero
    points or clamp."""
    return requantize_expr(x, m0, shift, leaf=leaf)
