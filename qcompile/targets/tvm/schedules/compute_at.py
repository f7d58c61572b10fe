"""Moving a block under a loop without losing any of its points: shared by the epilogue rule
(:mod:`.rules`), the VNNI and Cortex-M DSP kernels' epilogues and the GPU in-order float schedule. A module of its
own, importing nothing of qcompile, so that every kernel module can use it."""
from __future__ import annotations

import tvm
from tvm import s_tir


def reverse_compute_at_whole(sch: s_tir.Schedule, block_rv, loop_rv, preserve_unit_loops: bool = False) -> None:
    """``sch.reverse_compute_at(block_rv, loop_rv)`` that keeps every point of the block's domain, or ValueError.
    TVM sizes the moved block's loops by the region of its producer that one iteration of ``loop_rv`` writes, so
    points that read no element of that region are silently dropped: a zero-point pad at the end of a conv's
    epilogue (Keras' "same" padding of a stride-2 conv pads the bottom and right only) lost its border row and
    column, never written. After the move, the block's bindings over its loops (under its predicate, where a tile
    does not divide the output) must map onto its whole domain one to one. (The schedule is changed either way:
    call it on a copy where the caller has a fallback.)"""
    import tvm_ffi
    from tvm.sym.iter_affine_map import IterMapLevel

    name = sch.get(block_rv).name_hint
    sch.reverse_compute_at(block_rv, loop_rv, preserve_unit_loops=preserve_unit_loops)
    realizes = []

    def visit(realize):
        if realize.block.name_hint == name:
            realizes.append(realize)
        return realize
    tvm_ffi.structural_map(sch.mod["main"], [(s_tir.stmt.SBlockRealize, visit)])
    if len(realizes) != 1:
        raise ValueError(f"{name}: {len(realizes)} blocks of that name")
    realize = realizes[0]
    loops = [sch.get(lp) for lp in sch.get_loops(block_rv)]
    mapped = tvm.sym.detect_iter_map(list(realize.iter_values),
                                     {lp.loop_var: tvm.ir.Range.from_min_extent(lp.min, lp.extent) for lp in loops},
                                     realize.predicate, IterMapLevel.Bijective)
    domain = [iv.dom for iv in realize.block.iter_vars]
    if len(mapped.indices) != len(domain):
        raise ValueError(f"{name}: its bindings are not a one-to-one map of its loops ({list(mapped.errors)[:1]})")
    for index, dom in zip(mapped.indices, domain):
        covered = ((1, 1) if not index.args else
                   (int(index.args[0].extent), int(index.args[0].scale)) if len(index.args) == 1 else (None, None))
        if covered != (int(dom.extent), 1) or int(index.base) != int(dom.min):
            raise ValueError(f"{name}: moved under the loop, it covers {covered[0]} of {int(dom.extent)} points on "
                             "an axis")


__all__ = ["reverse_compute_at_whole"]
