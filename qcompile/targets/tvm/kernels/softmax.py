"""Softmax over the last axis as one vectorized row loop, with an exp that vectorizes.

TVM legalizes ``softmax`` into four blocks (row max, exp, row sum, divide) that the epilogue rule leaves to TVM's
default lowering: one element at a time, and ``exp`` as a call to libm's scalar ``expf``. MiniLM's six attention
softmaxes took 0.41-0.57 ms of its ~4 ms that way (tools/tvm_bench.py profile).

:func:`rebuild` replaces such a kernel by one loop over rows: the row maximum, ``exp(x - max)`` 16 lanes at a time
into a row buffer, the row sum (sequential, in the order the default lowering adds), and the division: the
arithmetic :func:`qcompile.floatspec.softmax` specifies, with its float32 exp (:func:`.floatspec.exp`, vectorizable:
no libm call).
"""
from __future__ import annotations

import logging

import numpy as np
from tvm import s_tir, tirx
from tvm.s_tir import dlight as dl

from qcompile.targets.tvm.kernels.floatspec import exp
from qcompile.targets.tvm.kernels.rowloop import chunks, finish, row_indices, row_loop

logger = logging.getLogger(__name__)

BLOCKS = ("T_softmax_maxelem", "T_softmax_exp", "T_softmax_expsum", "T_softmax_norm")
MAX_ROW = 8192  # row buffer on the stack: 32 KiB of float32 at most


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
            e, exp(tirx.BufferLoad(src, [*lead, k]) - tirx.BufferLoad(mx, [0])), [k]))
        T.buffer_store(total, tirx.const(0.0, "float32"), [0])
        with T.serial(tirx.const(0, itype), tirx.const(n, itype)) as k:
            T.buffer_store(total, tirx.BufferLoad(total, [0]) + tirx.BufferLoad(e, [k]), [0])
        vector_loop(lambda k: T.buffer_store(
            dst, tirx.BufferLoad(e, [k]) / tirx.BufferLoad(total, [0]), [*lead, k]))

    return row_loop(rows, itype, parallel, row)


__all__ = ["rebuild"]
