"""Inlining that stops where it would copy a large expression (:func:`bounded_inline`), for the CPU schedule rule
(:mod:`.rules`) and the VNNI epilogue fusion (:mod:`..kernels.x86_epilogue`)."""
from __future__ import annotations

import tvm
from tvm import s_tir, tirx

INLINE_COPY_LIMIT = 32  # buffer reads inlining may copy (a block's reads times its extra consumers)


def _loads(stmt, buf=None) -> int:
    """BufferLoads in ``stmt`` (of ``buf`` only, when given)."""
    import tvm_ffi

    count = [0]

    def on_load(load) -> None:
        if buf is None or load.source.same_as(buf):
            count[0] += 1
    tvm_ffi.structural_walk(stmt, [(tvm.ir.expr.TensorLoad, on_load)])
    return count[0]


def copies_too_much(sch: s_tir.Schedule, block_rv) -> bool:
    """Whether inlining ``block_rv`` would copy a large expression: its value is read at several places (each gets
    a copy) and its reads (a measure of its size: each copied subtree reads something) times the extra places pass
    :data:`INLINE_COPY_LIMIT`. The requantization reads its input twice (the product and the rounding's sign), so a
    chain of them inlined into one loop nest -- ONNX Runtime's quantizer puts a Q/DQ pair after every Add and Mul --
    doubled per link: four links of Mul and Add took the tvm-x86 build from 11 s to beyond 300 s."""
    block = sch.get(block_rv)
    if len(block.writes) != 1:
        return False
    buf = block.writes[0].source
    places = sum(_loads(sch.get(c).body, buf) for c in sch.get_consumers(block_rv))
    return places > 1 and (_loads(block.body) * (places - 1) > INLINE_COPY_LIMIT or _has_let(block.body))


def _has_let(stmt) -> bool:
    """A ``Let`` in ``stmt`` (the specified float functions bind their steps): copied to two places, the same
    variable would be bound to two values in one kernel, which TVM rejects ("Let cannot bind the same var to two
    different values": ONNX Runtime's quantized ViT, its Erf read twice)."""
    import tvm_ffi

    found = []
    tvm_ffi.structural_walk(stmt, [(tirx.Let, lambda _e: found.append(1))])
    return bool(found)


def _reverse_copies_too_much(sch: s_tir.Schedule, block_rv) -> bool:
    """:func:`copies_too_much` for inlining ``block_rv`` into its producer: the producer's value is copied once per
    place ``block_rv`` reads it."""
    block = sch.get(block_rv)
    for p in sch.get_producers(block_rv):
        prod = sch.get(p)
        places = sum(_loads(block.body, w.source) for w in prod.writes)
        if places > 1 and (_loads(prod.body) * (places - 1) > INLINE_COPY_LIMIT or _has_let(prod.body)):
            return True
    return False


def bounded_inline(sch: s_tir.Schedule, blocks: list) -> list:
    """dlight's ``try_inline`` (every block it can inline into its consumers, or a consumer into its producer),
    except where that :func:`copies_too_much` (or :func:`_reverse_copies_too_much`): those blocks stay as their own
    loop nests. Returns the blocks left."""
    def trial(fn, too_much):
        for i, info in enumerate(blocks):
            if too_much(sch, info.block_rv):
                continue
            try:
                fn(info.block_rv)
            except Exception:  # noqa: BLE001 - a block that cannot be inlined stays (dlight's way)
                continue
            return i
        return None

    while True:
        i = trial(sch.compute_inline, copies_too_much)
        if i is None:
            i = trial(sch.reverse_compute_inline, _reverse_copies_too_much)
        if i is None:
            return blocks
        blocks.pop(i)


__all__ = ["INLINE_COPY_LIMIT", "bounded_inline", "copies_too_much"]
