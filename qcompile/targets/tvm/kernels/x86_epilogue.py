"""The requantize epilogue of a VNNI conv2d / matmul, computed inside the kernel's output-tile loop.

The VNNI kernels (:mod:`.x86_vnni`) declare themselves ``kOutEWiseFusable``, so ``FuseOps`` groups each with the
elementwise chain after it (int32 -> int64 fixed-point requantize, the residual add, the clamp, the cast to
uint8) and ``FuseTIR`` concatenates the two into one PrimFunc. Left there, that PrimFunc would still write the
whole int32 result and read it back: the chain runs after the last output tile is done. :func:`fuse_epilogue`
inlines the chain into one block and moves it (``reverse_compute_at``) under the loop that finishes one output
tile, where the kernel's own ``out`` block copies the accumulators; the int32 tile is still in cache when the
epilogue reads it, and the full-size int32 tensor shrinks to one tile (``CompactBufferAllocation``). The epilogue's
innermost loop (an output row, or a row of channels) is vectorized.

Measured on ResNet-18 @224 (1 thread, tools/tvm_bench.py profile): the separate epilogue kernels took 0.95 ms of
11.0 ms.

A fused PrimFunc this cannot schedule is left unscheduled (logged): the default rule, and failing that TVM's
default lowering, still compile it correctly, only slower.
"""
from __future__ import annotations

import logging

import tvm
from tvm import s_tir, tirx

from qcompile.targets.tvm.kernels.x86_vnni import vector_rows
from qcompile.targets.tvm.schedules.compute_at import reverse_compute_at_whole
from qcompile.targets.tvm.schedules.inline import copies_too_much

logger = logging.getLogger(__name__)

OUT_BLOCK = "out"  # the VNNI kernels' accumulator -> output copy (x86_vnni/kernels.py)
ACC_PREFIX = "acc"  # their accumulator blocks: acc_init, acc_update_o (tensorized)


def fuse_epilogue(func: tirx.PrimFunc) -> tirx.PrimFunc | None:
    """The fused VNNI kernel + epilogue ``func`` with the epilogue in the kernel's tile loop (scheduled), or None
    when ``func`` is not one (or the chain cannot be inlined into a single block)."""
    if not isinstance(func, tirx.PrimFunc) or (func.attrs is not None and "tirx.is_scheduled" in func.attrs):
        return None
    sch = s_tir.Schedule(func)
    blocks = list(sch.get_child_blocks(sch.get_sblock("root")))
    names = [sch.get(b).name_hint for b in blocks]
    updates = [b for b, n in zip(blocks, names) if n.startswith(ACC_PREFIX + "_update")]
    if OUT_BLOCK not in names or not updates:
        return None
    epilogue = blocks[names.index(OUT_BLOCK) + 1:]
    if not epilogue:
        return None  # the kernel alone (it is scheduled already; FuseTIR only dropped the attribute)
    # int64 fixed-point math: 8 lanes fill a zmm register; a wider vector of a whole row made LLVM rebuild the
    # per-channel broadcasts from scalars (ResNet-18 @224: 10.88 -> 10.69 ms, interleaved A/B of two builds)
    wide = any(tvm.DataType(str(r.source.dtype)).bits > 32 for b in epilogue for r in sch.get(b).writes)
    lanes = 8 if wide else 16
    kept = []
    for blk in epilogue[:-1]:
        if copies_too_much(sch, blk):  # a long chain of requantizations: its own loop nest, not a copy per read
            kept.append(blk)
            continue
        try:
            sch.compute_inline(blk)
        except Exception:  # noqa: BLE001 - TVM raises its own error types
            kept.append(blk)  # it writes a second output of the group (a value also used outside it)
    kept.append(epilogue[-1])
    out = sch.get_sblock(OUT_BLOCK)
    out_loops, acc_loops = sch.get_loops(out), sch.get_loops(updates[0])
    common = 0
    while (common < min(len(out_loops), len(acc_loops))
           and sch.get(out_loops[common]).same_as(sch.get(acc_loops[common]))):
        common += 1
    if not common:
        return None
    anchor = out_loops[common - 1]  # the loop whose body finishes one output tile and copies it out
    for blk in kept:
        trial = sch.copy()
        try:
            reverse_compute_at_whole(trial, blk, anchor)
            sch = trial
        except Exception as exc:  # noqa: BLE001 - ValueError, or TVM's own; a pad after the chain runs after the kernel
            logger.debug("vnni epilogue: %s stays after the kernel (%s)", sch.get(blk).name_hint, exc)
        inner = sch.get_loops(blk)[-1]
        extent = sch.get(inner).extent
        if isinstance(extent, tirx.IntImm):
            vector_rows(sch, inner, int(extent), lanes)
    try:  # the epilogue then reads the accumulators themselves: one copy of the tile less
        sch.compute_inline(out)
    except Exception:  # noqa: BLE001 - TVM raises its own error types; the copy stays
        logger.debug("vnni epilogue: the accumulator copy stays")
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)


__all__ = ["fuse_epilogue"]
