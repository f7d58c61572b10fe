"""Moving a block under a loop without losing any of its points: shared by the epilogue rule
(:mod:`.rules`), the VNNI and Cortex-M DSP kernels' epilogues and the GPU in-order float schedule. A module of its
own, importing nothing of qcompile, so that every kernel module can use it."""
from __future__ import annotations

import functools

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
        # the affine analysis misses some equal forms (a fused GPU thread index that TVM simplified per axis:
        # bx // 9, (bx % 9 * 64 + tx) // 24, (bx * 64 + tx) % 24 for a [64, 24, 24] max pool's epilogue): count
        if _covers_by_enumeration(realize, loops, domain):
            return
        raise ValueError(f"{name}: its bindings are not a one-to-one map of its loops ({list(mapped.errors)[:1]})")
    for index, dom in zip(mapped.indices, domain):
        covered = ((1, 1) if not index.args else
                   (int(index.args[0].extent), int(index.args[0].scale)) if len(index.args) == 1 else (None, None))
        if covered != (int(dom.extent), 1) or int(index.base) != int(dom.min):
            raise ValueError(f"{name}: moved under the loop, it covers {covered[0]} of {int(dom.extent)} points on "
                             "an axis")


ENUMERATION_MAX = 1 << 22  # loop iterations a binding is evaluated at, at most (numpy, a few MB a binding)


def _covers_by_enumeration(realize, loops, domain) -> bool:
    """Whether the block's bindings, evaluated at every iteration of its loops (under its predicate), hit every
    point of its domain exactly once. False where the loops are not constant, there are more than ENUMERATION_MAX
    iterations, or an expression is not integer arithmetic this evaluates."""
    import numpy as np

    try:
        extents = [int(lp.extent) for lp in loops]
        mins = [int(lp.min) for lp in loops]
    except TypeError:
        return False
    n = int(np.prod(extents, dtype=np.int64))
    if n > ENUMERATION_MAX:
        return False
    grids = np.meshgrid(*[np.arange(m, m + e, dtype=np.int64) for m, e in zip(mins, extents)], indexing="ij")
    env = {lp.loop_var.__chandle__(): g.ravel() for lp, g in zip(loops, grids)}
    try:
        keep = np.broadcast_to(_evaluate(realize.predicate, env), (n,))
        values = [np.broadcast_to(_evaluate(v, env), (n,))[keep] for v in realize.iter_values]
    except (NotImplementedError, TypeError, ValueError):
        return False
    flat, total = np.zeros(int(keep.sum()), np.int64), 1
    for v, dom in zip(values, domain):
        lo, ext = int(dom.min), int(dom.extent)
        if v.size and (v.min() < lo or v.max() >= lo + ext):
            return False
        flat, total = flat * ext + (v - lo), total * ext
    return flat.size == total and np.unique(flat).size == total


@functools.cache
def _binary_ops() -> dict:
    """TIR's integer binary expression classes -> the numpy function that computes them (floor semantics)."""
    import numpy as np
    from tvm.ir.prim import expr as E

    return {E.Add: np.add, E.Sub: np.subtract, E.Mul: np.multiply, E.FloorDiv: np.floor_divide, E.FloorMod: np.mod,
            E.Min: np.minimum, E.Max: np.maximum, E.LT: np.less, E.LE: np.less_equal, E.GT: np.greater,
            E.GE: np.greater_equal, E.EQ: np.equal, E.NE: np.not_equal, E.And: np.logical_and, E.Or: np.logical_or}


def _evaluate(e, env: dict):
    """An integer TIR expression over numpy arrays of its variables' values (``env`` by variable handle)."""
    import numpy as np
    from tvm.ir.prim import expr as E

    if isinstance(e, E.IntImm):
        return np.int64(e.value) if str(e.ty) != "bool" else bool(e.value)
    if isinstance(e, tvm.ir.expr.Var):
        return env[e.__chandle__()]
    if isinstance(e, E.Cast):
        return _evaluate(e.value, env)
    fn = _binary_ops().get(type(e))
    if fn is None:
        raise NotImplementedError(type(e).__name__)
    return fn(_evaluate(e.a, env), _evaluate(e.b, env))


__all__ = ["reverse_compute_at_whole"]
