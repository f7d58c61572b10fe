"""GELU-style epilogues with a float32 ``erf`` whose every output is certified equal to the reference's.

The reference rounds ``math.erf`` (double) to float32; :func:`.mathfns.erf_f64` reproduces that in float64 with
two long Chebyshev expansions, both evaluated for every element (vector code cannot branch per lane). That
exactness costs: MiniLM's six GELU kernels took 1.37 of its 4.6 ms, more than all of its matmuls but one kind.

Here a fused kernel whose one non-elementwise piece is that erf (an erf between an integer accumulator and a
QuantizeLinear, typically) is rebuilt by hand. Per chunk of 16 outputs:

1. ``e = erf32(x)``: short Chebyshev expansions in float32 (degrees 5 and 11), within ``ERR = 2^-20`` of the
   reference's float32 erf (the largest error on a 2^23-point grid over [-4.5, 4.5] is 6.6e-7; a test checks
   the bound on 2^21 points);
2. the rest of the epilogue ``E`` (the ``(1 + e) * x * 0.5 / scale``, round, clamp, cast chain) evaluated at
   ``e - DELTA`` and ``e + DELTA`` (``DELTA = 4 * ERR``, ~6x the largest error seen). ``E`` is monotone in
   ``e`` (checked on the expression: only additions, subtractions, products and quotients by ``e``-free factors,
   casts, rounding and clamps lie on the path from ``e`` to the output) and float32 rounding is monotone, so when
   both ends give the same integer, the exact erf, which lies between them, gives it too: that integer is stored;
3. only if some lane's two ends differ (its value lies within ~1e-6 of a rounding tie: a few in 10^4 elements) is
   the chunk recomputed with the float64 erf.

The certificate makes the fast path exact by construction, not by tuning: whatever the model, its scales or its
inputs, every stored integer equals the one the float64 expression gives, as long as ``DELTA`` bounds the float32
erf's error (a measured bound with a 6x margin, not a proof: a polynomial's error curve is smooth, and the grid
is ~1e-6 fine). ``|x| >= 4`` (erf is exactly +-1 in
float32) and NaN need no interval (NaN propagates through both ends alike).
"""
from __future__ import annotations

import logging
from functools import lru_cache

import numpy as np
import tvm
from tvm import s_tir, tirx
from tvm.s_tir import dlight as dl

from qcompile.targets.tvm.kernels.mathfns import MID_HI, MID_LO, clenshaw, clenshaw_tir, fit
from qcompile.targets.tvm.kernels.rowloop import CHUNK, chunks, finish, row_indices, row_loop

logger = logging.getLogger(__name__)

ODD_DEGREE32, MID_DEGREE32 = 5, 11
ERR = 2.0 ** -20  # bound on |erf32(x) - float32(math.erf(x))| (measured maximum 6.6e-7)
DELTA = 4 * ERR  # the interval's half width: 4x the bound, ~6x the measured error

_LOAD = tvm.ir.expr.TensorLoad
_ROUNDING = {"tirx.nearbyint", "tirx.round", "tirx.floor", "tirx.ceil", "tirx.trunc"}


@lru_cache(maxsize=1)
def coefficients32() -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The float32 expansions' coefficients (same bases as :func:`.mathfns.coefficients`, fewer terms)."""
    return fit(ODD_DEGREE32, MID_DEGREE32)


def erf32_numpy(x: np.ndarray) -> np.ndarray:
    """What :func:`erf32` computes, in numpy float32 arithmetic (for the error bound's test)."""
    odd, mid = coefficients32()
    x = np.asarray(x, np.float32)
    a = np.abs(x)
    c = np.float32
    with np.errstate(invalid="ignore", over="ignore"):
        p0 = a * clenshaw(odd, c(2) * a * a - c(1), c)
        p1 = clenshaw(mid, (a - c((MID_LO + MID_HI) / 2)) * c(2.0 / (MID_HI - MID_LO)), c)
        r = np.where(a >= MID_HI, c(1), np.where(a < MID_LO, p0, p1)).astype(np.float32)
    return np.copysign(r, x)


def erf32(x: tirx.PrimExpr) -> tirx.PrimExpr:
    """float32 erf of the float32 expression ``x`` (straight-line, vectorizes)."""
    odd, mid = coefficients32()
    xv = tirx.Var("x_erf", "float32")
    a = tirx.Var("a_erf", "float32")

    def const(v: float):
        return tirx.const(v, "float32")

    p0 = a * clenshaw_tir(odd, const(2.0) * a * a - const(1.0), "float32")
    p1 = clenshaw_tir(mid, (a - const((MID_LO + MID_HI) / 2)) * const(2.0 / (MID_HI - MID_LO)), "float32")
    r = tirx.Select(a >= const(MID_HI), const(1.0), tirx.Select(a < const(MID_LO), p0, p1))
    return tirx.Let(xv, x, tirx.Let(a, tirx.abs(xv), tirx.copysign(r, xv)))


# ---- a small TIR expression rewriter (TVM 0.27 has no Python stmt_functor) ----

_BINARY = (tirx.Add, tirx.Sub, tirx.Mul, tirx.Div, tirx.Max, tirx.Min, tirx.FloorDiv, tirx.FloorMod, tirx.Mod,
           tirx.EQ, tirx.NE, tirx.LT, tirx.LE, tirx.GT, tirx.GE, tirx.And, tirx.Or)


def _dtype(expr) -> str:
    return str(expr.ty)


def rewrite(expr, fn):
    """``expr`` with every sub-expression ``s`` for which ``fn(s)`` is not None replaced by it (outermost first)."""
    new = fn(expr)
    if new is not None:
        return new
    if isinstance(expr, _BINARY):
        return type(expr)(rewrite(expr.a, fn), rewrite(expr.b, fn))
    if isinstance(expr, tirx.Cast):
        return tirx.Cast(_dtype(expr), rewrite(expr.value, fn))
    if isinstance(expr, tirx.Not):
        return tirx.Not(rewrite(expr.a, fn))
    if isinstance(expr, tirx.Select):
        return tirx.Select(rewrite(expr.condition, fn), rewrite(expr.true_value, fn), rewrite(expr.false_value, fn))
    if isinstance(expr, tirx.Let):
        return tirx.Let(expr.var, rewrite(expr.value, fn), rewrite(expr.body, fn))
    if isinstance(expr, tvm.ir.Call):
        return tvm.ir.Call(expr.op, [rewrite(a, fn) for a in expr.args], expr.attrs, expr.ty_args, None, expr.ty)
    if isinstance(expr, _LOAD):
        return tirx.BufferLoad(expr.source, [rewrite(i, fn) for i in expr.indices])
    if isinstance(expr, (tirx.Var, tirx.IntImm, tirx.FloatImm, tvm.ir.expr.Var)):
        return expr
    raise TypeError(f"unexpected TIR node {type(expr).__name__}")


def substitute(expr, mapping: dict):
    """Replace variables (``tirx.Var`` -> expression)."""
    return rewrite(expr, lambda e: mapping.get(e) if isinstance(e, tirx.Var) and e in mapping else None)


def loads_of(expr, buffer) -> list:
    found: list = []

    def visit(e):
        if isinstance(e, _LOAD) and e.source.same_as(buffer):
            found.append(e)
    rewrite(expr, visit)  # visit returns None: a walk
    return found


def buffers_read(expr) -> set:
    seen: dict = {}

    def visit(e):
        if isinstance(e, _LOAD):
            seen[e.source.name] = e.source
    rewrite(expr, visit)
    return set(seen.values())


def monotone_in(expr, load) -> bool:
    """True when ``expr`` is a monotone (non-decreasing or non-increasing, per element) function of the value of
    ``load``: every node on the path from the root to it is +, - (either side), * or / (numerator) by a factor
    that does not depend on it, a cast, a rounding, max/min with an independent bound, or a select whose
    condition does not depend on it."""
    def has(e) -> bool:
        return bool(loads_of(e, load.source))

    if isinstance(expr, _LOAD) and expr.source.same_as(load.source):
        return True
    if not has(expr):
        return True
    if isinstance(expr, (tirx.Add, tirx.Sub, tirx.Mul, tirx.Max, tirx.Min)):
        if has(expr.a) and has(expr.b):
            return False
        return monotone_in(expr.a if has(expr.a) else expr.b, load)
    if isinstance(expr, tirx.Div):
        return not has(expr.b) and monotone_in(expr.a, load)
    if isinstance(expr, tirx.Cast):
        return monotone_in(expr.value, load)
    if isinstance(expr, tvm.ir.Call) and str(expr.op.name) in _ROUNDING and len(expr.args) == 1:
        return monotone_in(expr.args[0], load)
    if isinstance(expr, tirx.Select):
        return (not has(expr.condition) and monotone_in(expr.true_value, load)
                and monotone_in(expr.false_value, load))
    return False


# ---- the rewrite of one fused kernel ----

def _erf_input(value):
    """The float32 argument ``x`` of :func:`.mathfns.erf_f64`'s body ``Cast(f32, copysign(r, Cast(f64, x)))``."""
    if not (isinstance(value, tirx.Cast) and _dtype(value) == "float32" and isinstance(value.value, tvm.ir.Call)
            and str(value.value.op.name) == "tirx.copysign"):
        return None
    sign = value.value.args[1]
    if not (isinstance(sign, tirx.Cast) and _dtype(sign) == "float64" and _dtype(sign.value) == "float32"):
        return None
    return sign.value


def _inline_into_consumers(sch: s_tir.Schedule, blocks: list) -> list:
    """``compute_inline`` every block it can (never the reverse: that would fold the output into the erf block)."""
    blocks = list(blocks)
    progress = True
    while progress:
        progress = False
        for b in list(blocks):
            try:
                sch.compute_inline(b.block_rv)
            except Exception:  # noqa: BLE001 - not inlinable (the output block): it stays
                continue
            blocks.remove(b)
            progress = True
    return blocks


def _index_map(store_indices, block_vars, load_indices) -> dict | None:
    """The erf block's vars in terms of the output block's, from where the output reads the erf buffer: each
    store index must be one block var or a constant (normalized kernels store ``buf[0, 0, v0]``-style)."""
    at = {}
    for s_idx, l_idx in zip(store_indices, load_indices):
        if isinstance(s_idx, tirx.IntImm):
            continue
        match = [v for v in block_vars if s_idx.same_as(v)]
        if len(match) != 1:
            return None
        at[match[0]] = l_idx
    return at if len(at) == len(block_vars) else None


def certify(func: tirx.PrimFunc, parallel: bool) -> tirx.PrimFunc | None:
    """The hand-built certified kernel for ``func``, or None when ``func`` is not an all-elementwise kernel with
    one float64 erf, a monotone path from it to a single integer output, and no other buffer but its params."""
    if func.attrs is not None and func.attrs.get("tirx.is_scheduled", False):
        return None
    sch = s_tir.Schedule(func)
    infos = dl.normalize_prim_func(sch)
    if infos is None:
        return None
    erfs = [i for i in infos if sch.get(i.block_rv).name_hint.startswith("erf_f64")]
    if len(erfs) != 1 or not all(i.is_injective() for i in infos):
        return None
    rest = _inline_into_consumers(sch, [i for i in infos if i is not erfs[0]])
    if len(rest) != 1:
        return None
    erf_block, out_block = sch.get(erfs[0].block_rv), sch.get(rest[0].block_rv)
    if not (isinstance(erf_block.body, tirx.BufferStore) and isinstance(out_block.body, tirx.BufferStore)):
        return None
    erf_store, out_store = erf_block.body, out_block.body
    erf_vars = [iv.var for iv in erf_block.iter_vars]
    x = _erf_input(erf_store.value)
    loads = loads_of(out_store.value, erf_store.buffer)
    if (x is None or len(loads) != 1 or _dtype(out_store.value).startswith("float")
            or not monotone_in(out_store.value, loads[0])):
        return None
    at = _index_map(erf_store.indices, erf_vars, loads[0].indices)
    if at is None:
        return None
    x_out, slow_erf = substitute(x, at), substitute(erf_store.value, at)
    params = {b.name for b in func.params}
    read = {b.name for b in buffers_read(out_store.value) | buffers_read(x_out)} - {erf_store.buffer.name}
    if not read <= params:  # an intermediate left between them: not the one-loop kernel built here
        return None
    extents = [iv.dom.extent for iv in out_block.iter_vars]
    if not all(isinstance(n, tirx.IntImm) for n in extents) or any(
            not isinstance(iv.dom.min, tirx.IntImm) or int(iv.dom.min) != 0 for iv in out_block.iter_vars):
        return None
    extents = [int(n) for n in extents]
    body = _build(out_store, [iv.var for iv in out_block.iter_vars], extents, loads[0], x_out, slow_erf, parallel)
    logger.debug("certified erf epilogue: %s", func.attrs.get("global_symbol", "?") if func.attrs else "?")
    return finish(func, body)


def _build(out_store, out_vars, extents, erf_load, x, slow_erf, parallel: bool):
    from tvm.script.ir_builder import tirx as T

    value, out_buf = out_store.value, out_store.buffer
    dtype = _dtype(out_vars[0])
    rows = int(np.prod(extents[:-1])) if len(extents) > 1 else 1
    n = extents[-1]

    def at_erf(e):
        return rewrite(value, lambda s: e if isinstance(s, _LOAD) and s.same_as(erf_load) else None)

    def chunk(mapping: dict, base, length: int) -> None:
        """Outputs ``base .. base + length`` of the row (``mapping``: its leading output vars): the certified fast path, then the rare exact redo."""
        flag = T.alloc_local((length,), "int8")
        erf = T.alloc_local((length,), "float32")
        d = T.alloc_local((length,), "float32")
        with T.vectorized(tirx.const(0, dtype), tirx.const(length, dtype)) as v:
            m = {**mapping, out_vars[-1]: base + v}
            xv = tirx.Var("x", "float32")
            T.buffer_store(erf, tirx.Let(xv, substitute(x, m), erf32(xv)), [v])
            xv = tirx.Var("x", "float32")
            T.buffer_store(d, tirx.Let(xv, substitute(x, m), tirx.Select(
                tirx.abs(xv) >= tirx.const(MID_HI, "float32"), tirx.const(0.0, "float32"),
                tirx.const(DELTA, "float32"))), [v])
            e, dv = tirx.BufferLoad(erf, [v]), tirx.BufferLoad(d, [v])
            lo, hi = substitute(at_erf(e - dv), m), substitute(at_erf(e + dv), m)
            T.buffer_store(flag, tirx.Cast("int8", tirx.NE(lo, hi)), [v])
            T.buffer_store(out_buf, lo, [substitute(i, m) for i in out_store.indices])
        anyf = T.alloc_local((1,), "int8")
        T.buffer_store(anyf, tirx.const(0, "int8"), [0])
        with T.serial(0, length) as j:
            T.buffer_store(anyf, tirx.BitwiseOr(tirx.BufferLoad(anyf, [0]), tirx.BufferLoad(flag, [j])), [0])
        with T.If(tirx.BufferLoad(anyf, [0]) != tirx.const(0, "int8")):
            with T.Then():
                with T.vectorized(tirx.const(0, dtype), tirx.const(length, dtype)) as v:
                    m = {**mapping, out_vars[-1]: base + v}
                    T.buffer_store(out_buf, substitute(at_erf(slow_erf), m),
                                   [substitute(i, m) for i in out_store.indices])

    def row(r) -> None:
        mapping = dict(zip(out_vars[:-1], row_indices(r, extents, dtype)))
        chunks(n, dtype, lambda base, length: chunk(mapping, base, length))

    return row_loop(rows, dtype, parallel, row)


__all__ = ["CHUNK", "DELTA", "ERR", "certify", "erf32", "erf32_numpy", "monotone_in"]
