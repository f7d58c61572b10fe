"""The frame the hand-built kernels share (:mod:`.certified`'s GELU epilogues, :mod:`.softmax`): one loop over the
rows of an output (its leading dimensions flattened; parallel in threaded builds), the last dimension walked in
chunks of ``CHUNK`` lanes and a shorter tail, written with TVMScript's IR builder under a root block (every
Relax-side pass expects one), and the result marked scheduled so that no rule touches it again."""
from __future__ import annotations

from collections.abc import Callable

import tvm
from tvm import tirx

CHUNK = 16  # lanes per vector step: one AVX-512 register of float32


def row_indices(r, dims: list[int], itype: str) -> list:
    """Indices of the leading ``dims[:-1]`` for flat row ``r``."""
    out, stride = [], 1
    for ext in dims[:-1]:
        stride *= ext
    for ext in dims[:-1]:
        stride //= ext
        out.append(tirx.floormod(tirx.floordiv(r, tirx.const(stride, itype)), tirx.const(ext, itype)))
    return out


def chunks(n: int, itype: str, body: Callable) -> None:
    """``body(base, length)`` for every chunk of a row of ``n``: a loop over the full chunks, then the tail."""
    from tvm.script.ir_builder import tirx as T

    if n >= CHUNK:
        with T.serial(tirx.const(0, itype), tirx.const(n // CHUNK, itype)) as c:
            body(c * tirx.const(CHUNK, itype), CHUNK)
    if n % CHUNK:
        body(tirx.const(n - n % CHUNK, itype), n % CHUNK)


def row_loop(rows: int, itype: str, parallel: bool, body: Callable) -> tirx.Stmt:
    """The kernel body: ``body(r)`` inside the loop over ``rows`` (parallel when asked and there is more than one)."""
    from tvm.script.ir_builder import IRBuilder
    from tvm.script.ir_builder import tirx as T

    with IRBuilder() as ib:
        with T.prim_func(s_tir=True), T.sblock("root"):
            loop = T.parallel if parallel and rows > 1 else T.serial
            with loop(tirx.const(0, itype), tirx.const(rows, itype)) as r:
                body(r)
    return ib.get().body


def finish(func: tirx.PrimFunc, body: tirx.Stmt) -> tirx.PrimFunc:
    """``func`` with the hand-built ``body``, marked scheduled, in SSA form (an expression copied into several
    chunks carries the same Let variables: ConvertSSA renames them)."""
    new = func.with_body(body).with_attr("tirx.is_scheduled", True)
    return tvm.tirx.transform.ConvertSSA()(tvm.IRModule({"main": new}))["main"]


__all__ = ["CHUNK", "chunks", "finish", "row_indices", "row_loop"]
