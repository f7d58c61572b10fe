"""Softmax over the last axis as one vectorized row loop, with an exp that vectorizes.

TVM legalizes ``softmax`` into four blocks (row max, exp, row sum, divide) that the epilogue rule leaves to TVM's
default lowering: one element at a time, and ``exp`` as a call to libm's scalar ``expf``. MiniLM's six attention
softmaxes took 0.41-0.57 ms of its ~4 ms that way (tools/tvm_bench.py profile).

:func:`rebuild` replaces such a kernel by one loop over rows: the row maximum, ``exp(x - max)`` 16 lanes at a time
into a row buffer, the row sum (sequential, in the order the default lowering adds), and the division. The exp is
:func:`exp_f64`: float64 range reduction (``k ln 2`` in two parts) and a degree-11 Taylor polynomial, ``2^k`` put
in the exponent bits, rounded once to float32: relative error ~1e-15 before that rounding, so the float32 result
is the correctly rounded exp except within ~1e-15 of a rounding midpoint. (libm's ``expf`` is within 0.502 ulp,
not always correctly rounded; the reference's numpy exp is its own implementation: float regions between
QuantizeLinear borders are compared, not bit-identical, see ``lsb_vs_reference``.)
"""
from __future__ import annotations

import logging
import math

import numpy as np
from tvm import s_tir, tirx
from tvm.s_tir import dlight as dl

from qcompile.targets.tvm.kernels.rowloop import chunks, finish, row_indices, row_loop

logger = logging.getLogger(__name__)

BLOCKS = ("T_softmax_maxelem", "T_softmax_exp", "T_softmax_expsum", "T_softmax_norm")
MAX_ROW = 8192  # row buffer on the stack: 32 KiB of float32 at most
TAYLOR = 11
LN2_HI = float(np.float64(math.log(2.0)).astype(np.float32))  # exact in a few bits: k * LN2_HI is exact
LN2_LO = math.log(2.0) - LN2_HI


def exp_f64(x: tirx.PrimExpr) -> tirx.PrimExpr:
    """float32 ``exp(x)`` for ``x <= 0`` (softmax's shifted inputs; ``x < -104`` underflows to 0), via float64."""
    def c(v: float):
        return tirx.const(v, "float64")

    xd = tirx.Var("xd", "float64")
    k = tirx.Var("k", "float64")
    r = tirx.Var("r", "float64")
    poly = c(1.0 / math.factorial(TAYLOR))
    for n in range(TAYLOR - 1, -1, -1):
        poly = poly * r + c(1.0 / math.factorial(n))
    bits = tirx.shift_left(tirx.Cast("int64", k) + tirx.const(1023, "int64"), tirx.const(52, "int64"))
    scaled = poly * tirx.reinterpret("float64", bits)
    body = tirx.Select(xd < c(-104.0), c(0.0), scaled)
    return tirx.Cast("float32", tirx.Let(xd, tirx.Cast("float64", x), tirx.Let(
        k, tirx.floor(tirx.max(xd, c(-104.0)) * c(1.0 / math.log(2.0)) + c(0.5)), tirx.Let(
            r, (xd - k * c(LN2_HI)) - k * c(LN2_LO), body))))


def exp_numpy(x: np.ndarray) -> np.ndarray:
    """What :func:`exp_f64` computes, in numpy (for tests)."""
    xd = np.asarray(x, np.float32).astype(np.float64)
    k = np.floor(np.maximum(xd, -104.0) * (1.0 / math.log(2.0)) + 0.5)
    r = (xd - k * LN2_HI) - k * LN2_LO
    poly = np.full_like(r, 1.0 / math.factorial(TAYLOR))
    for n in range(TAYLOR - 1, -1, -1):
        poly = poly * r + 1.0 / math.factorial(n)
    return np.where(xd < -104.0, 0.0, np.ldexp(poly, k.astype(np.int64))).astype(np.float32)


def rebuild(func: tirx.PrimFunc, parallel: bool) -> tirx.PrimFunc | None:
    """The row-loop form of a legalized last-axis float32 softmax kernel, or None for any other kernel."""
    if func.attrs is not None and func.attrs.get("tirx.is_scheduled", False):
        return None
    if len(func.params) != 2:
        return None
    sch = s_tir.Schedule(func)
    infos = dl.normalize_prim_func(sch)
    if infos is None or tuple(sch.get(i.block_rv).name_hint for i in infos) != BLOCKS:
        return None
    src, dst = func.params
    shape = [d for d in src.shape]
    if (str(src.dtype) != "float32" or str(dst.dtype) != "float32" or len(shape) != len(dst.shape)
            or not all(isinstance(d, tirx.IntImm) for d in shape)
            or [int(d) for d in shape] != [int(d) for d in dst.shape]):
        return None
    norm = sch.get(infos[-1].block_rv)
    if norm.annotations.get("axis") is not None and int(norm.annotations["axis"]) != len(shape) - 1:
        return None
    dims = [int(d) for d in shape]
    n, rows = dims[-1], int(np.prod(dims[:-1]))
    if n > MAX_ROW or n < 1:
        return None
    itype = str(shape[0].ty) if hasattr(shape[0], "ty") else "int64"
    return finish(func, _build(src, dst, dims, rows, n, itype, parallel))


def _build(src, dst, dims, rows: int, n: int, itype: str, parallel: bool):
    from tvm.script.ir_builder import tirx as T

    def vector_loop(body) -> None:
        """``body(k)`` over the row, CHUNK lanes at a time, then the tail."""
        def part(base, length: int) -> None:
            with T.vectorized(tirx.const(0, itype), tirx.const(length, itype)) as v:
                body(base + v)
        chunks(n, itype, part)

    def row(r) -> None:
        lead = row_indices(r, dims, itype)
        mx = T.alloc_local((1,), "float32")
        total = T.alloc_local((1,), "float32")
        e = T.alloc_local((n,), "float32")
        T.buffer_store(mx, tirx.const(-3.4028234663852886e38, "float32"), [0])
        with T.serial(tirx.const(0, itype), tirx.const(n, itype)) as k:
            T.buffer_store(mx, tirx.max(tirx.BufferLoad(mx, [0]), tirx.BufferLoad(src, [*lead, k])), [0])
        vector_loop(lambda k: T.buffer_store(
            e, exp_f64(tirx.BufferLoad(src, [*lead, k]) - tirx.BufferLoad(mx, [0])), [k]))
        T.buffer_store(total, tirx.const(0.0, "float32"), [0])
        with T.serial(tirx.const(0, itype), tirx.const(n, itype)) as k:
            T.buffer_store(total, tirx.BufferLoad(total, [0]) + tirx.BufferLoad(e, [k]), [0])
        vector_loop(lambda k: T.buffer_store(
            dst, tirx.BufferLoad(e, [k]) / tirx.BufferLoad(total, [0]), [*lead, k]))

    return row_loop(rows, itype, parallel, row)


__all__ = ["exp_f64", "exp_numpy", "rebuild"]
