"""Float-region math that equals the integer reference's: ``erf`` as a double-precision polynomial.

The reference evaluates ONNX ``Erf`` (GELU's) as Python's ``math.erf`` in double, rounded to float32. TVM's own
``erf`` on CPU calls libm's ``erff``: scalar (it blocks vectorization of the whole GELU epilogue: MiniLM's six
GELU kernels were ~60% of its TVM latency) and not correctly rounded (glibc's erff differs from the rounded
double in ~2.5% of inputs by 1 ulp, which moves a GELU output across a QuantizeLinear rounding tie now and then).

:func:`erf_f64` computes erf in float64 with two Chebyshev expansions evaluated by Clenshaw's recurrence,
fitted here once at import from ``math.erf`` (numpy), then rounds to float32:

- ``|x| < 1``: ``erf(a) = a * q(2a^2 - 1)``, q of degree 10 (odd form: relative error ~3e-15, so tiny inputs
  keep full relative precision);
- ``1 <= |x| < 4``: degree 24 on ``t = (a - 2.5) / 1.5`` (absolute error ~4e-15);
- ``|x| >= 4``: 1 (``erf(4) = 1 - 1.5e-8`` already rounds to 1.0f); NaN stays NaN; the sign is copied.

With an error ~1e-15 the float32 result equals ``float32(math.erf(x))`` except for inputs whose erf lies within
~1e-15 of a float32 rounding midpoint (~1e-8 of them): the GELU regions then compute what the reference computes
and no longer flip borders by themselves. Straight-line arithmetic and selects, so TVM vectorizes it.
Cores without a double-precision FPU (Cortex-M4) keep libm's ``erff``: double arithmetic is software there.
"""
from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

ODD_DEGREE = 10
MID_DEGREE = 24
MID_LO, MID_HI = 1.0, 4.0


def _cheb_nodes(lo: float, hi: float, n: int = 4000) -> np.ndarray:
    return np.cos(np.linspace(0.0, np.pi, n)) * (hi - lo) / 2 + (hi + lo) / 2


def fit(odd_degree: int, mid_degree: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(odd-part coefficients in u = 2a^2 - 1, middle-part coefficients in t), Chebyshev basis, least squares
    on Chebyshev nodes against ``math.erf``."""
    from numpy.polynomial import chebyshev as cheb

    erf = np.vectorize(math.erf)
    a = _cheb_nodes(0.0, 1.0)
    a = a[a > 1e-4]
    odd = cheb.chebfit(2 * a * a - 1, erf(a) / a, odd_degree)
    m = _cheb_nodes(MID_LO, MID_HI)
    mid = cheb.chebfit((m - (MID_LO + MID_HI) / 2) / ((MID_HI - MID_LO) / 2), erf(m), mid_degree)
    return tuple(float(c) for c in odd), tuple(float(c) for c in mid)


@lru_cache(maxsize=1)
def coefficients() -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The float64 expansions' coefficients (degrees ODD_DEGREE, MID_DEGREE)."""
    return fit(ODD_DEGREE, MID_DEGREE)


def clenshaw(coef, t, const):
    """sum_k coef[k] T_k(t) for a scalar-expression ``t`` (numpy array or TIR expr); ``const(c)`` makes a constant."""
    b1 = b2 = None
    for c in reversed(coef[1:]):
        b = const(c) if b1 is None else (const(c) + const(2.0) * t * b1 - (b2 if b2 is not None else const(0.0)))
        b1, b2 = b, b1
    if b1 is None:
        return const(coef[0])
    return const(coef[0]) + t * b1 - (b2 if b2 is not None else const(0.0))


def erf_numpy(x: np.ndarray) -> np.ndarray:
    """The same formula in numpy (float64, then float32): what :func:`erf_f64` computes, for tests."""
    odd, mid = coefficients()
    xd = np.asarray(x, np.float64)
    a = np.abs(xd)
    c = np.float64
    with np.errstate(invalid="ignore", over="ignore"):  # inf/NaN lanes: discarded by the selects below
        p0 = a * clenshaw(odd, 2 * a * a - 1, c)
        p1 = clenshaw(mid, (a - (MID_LO + MID_HI) / 2) * (2.0 / (MID_HI - MID_LO)), c)
        r = np.where(a >= MID_HI, 1.0, np.where(a < MID_LO, p0, p1))
    return np.copysign(r, xd).astype(np.float32)


def clenshaw_tir(coef, t, dtype: str = "float64"):
    """Clenshaw's recurrence as nested ``Let`` bindings: each b_k is computed once (written as a plain expression
    the b_{k+1}, b_{k+2} references would duplicate whole subtrees, Fibonacci-fashion)."""
    from tvm import tirx

    def const(v: float):
        return tirx.const(v, dtype)

    tv = tirx.Var("t", dtype)
    bs = [tirx.Var(f"b{k}", dtype) for k in range(len(coef) + 2)]  # bs[k] = b_k; b_{n+1} = b_{n+2} = 0
    n = len(coef) - 1
    expr = const(coef[0]) + tv * bs[1] - bs[2]
    for k in range(1, n + 1):  # wrap b_1 innermost ... b_n outermost (defined first)
        nxt = bs[k + 1] if k + 1 <= n else const(0.0)
        nxt2 = bs[k + 2] if k + 2 <= n else const(0.0)
        expr = tirx.Let(bs[k], const(coef[k]) + const(2.0) * tv * nxt - nxt2, expr)
    return tirx.Let(tv, t, expr)


def erf_f64(x):
    """TE compute: float32 erf through the float64 expansions (same shape and dtype as ``x``)."""
    from tvm import te, tirx

    odd, mid = coefficients()

    def const(v: float):
        return tirx.const(v, "float64")

    def body(*idx):
        xd = x(*idx).astype("float64")
        a = tirx.abs(xd)
        p0 = a * clenshaw_tir(odd, const(2.0) * a * a - const(1.0))
        p1 = clenshaw_tir(mid, (a - const((MID_LO + MID_HI) / 2)) * const(2.0 / (MID_HI - MID_LO)))
        r = tirx.Select(a >= const(MID_HI), const(1.0), tirx.Select(a < const(MID_LO), p0, p1))
        return tirx.copysign(r, xd).astype(x.dtype)

    return te.compute(x.shape, body, name="erf_f64", tag="elemwise")


def has_double_fpu(target) -> bool:
    """Hosted 64-bit CPUs (x86-64, AArch64) do double arithmetic in vector hardware; Arm M-profile does not."""
    triple = str(target.attrs.get("mtriple", "")) if hasattr(target, "attrs") else ""
    return not triple.startswith(("thumb", "arm"))


def erf_pass():
    """Relax module pass: every float32 ``relax.erf`` -> :func:`erf_f64` (run before legalization)."""
    import tvm
    from tvm.relax import PyExprMutator, expr_functor

    from qcompile.targets.tvm.schedules.rewrite import relax_rewrite

    @expr_functor.mutator
    class _Erf(PyExprMutator):
        def visit_call_(self, call):  # noqa: D102 - mutator hook
            call = super().visit_call_(call)
            if (isinstance(call.op, tvm.ir.Op) and call.op.name == "relax.erf"
                    and getattr(call.args[0].ty, "dtype", None) == "float32"):
                return self.builder_.call_te(erf_f64, call.args[0], primfunc_name_hint="erf_f64")
            return call

    return relax_rewrite("QcompileErfF64", _Erf)


__all__ = ["clenshaw", "clenshaw_tir", "coefficients", "fit", "erf_f64", "erf_numpy", "erf_pass", "has_double_fpu"]
