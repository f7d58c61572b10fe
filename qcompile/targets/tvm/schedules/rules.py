"""Default (untuned) schedules for the kernels the integer lowering produces, and the fusion passes before them.

After ``FuseOps``/``FuseTIR`` a kernel is typically a reduction (conv2d, depthwise conv, matmul, sum) followed by
the requantization epilogue (a dozen int64 elementwise ops), or an elementwise chain alone. Unscheduled, TIR
materializes every intermediate as a full tensor: slow, and on a microcontroller each one is RAM (kernel
workspace). The rule here, in dlight's style, inlines every injective block it can (padding into the convolution's
reads, elementwise chains into one loop nest), moves the remaining epilogue under the reduction's spatial loops
(``reverse_compute_at``), so that intermediates shrink to one element, and vectorizes the innermost spatial loop
of elementwise nests. Two refinements, each measured on MobileNetV2-digits (tools/tvm_bench.py profile):
a padded output (the epilogue inlined into the next conv's zero padding) has its rows split border | interior |
border, so that the interior loses its "inside?" test and vectorizes (TVM scalarizes a vector loop with a
per-lane condition: that kernel went 0.025 -> 0.004 ms); and a short reduction (depthwise 3x3) read at unit stride
is vectorized across neighbouring outputs instead of computing one output at a time. An epilogue is moved only
where it keeps every point of its domain (:func:`reverse_compute_at_whole`): one that ends in the next conv's
zero-point pad has more points than the reduction has outputs, and runs as its own loop nest. Kernels already
scheduled (``tirx.is_scheduled``: the VNNI kernels) are left alone; a kernel the rule cannot handle keeps TVM's
default lowering (never an error).

Targets differ only in whether loops may run in parallel (hosted CPUs) or not (static C / microcontrollers).
"""
from __future__ import annotations

import logging

import numpy as np
import tvm
import tvm.sym
from tvm import relax, s_tir, tirx
from tvm.s_tir import dlight as dl
from tvm.s_tir.dlight.cpu.base import CPUScheduleRule

from qcompile.targets.tvm.schedules.compute_at import reverse_compute_at_whole
from qcompile.targets.tvm.schedules.inline import bounded_inline

logger = logging.getLogger(__name__)

SHORT_REDUCTION = 64  # products per output below which outputs, not the reduction, are vectorized
MIN_VECTOR = 4  # fewest outputs worth a vector (an 8x8 feature map row: 8 lanes)


def _leading_spatial(sch: s_tir.Schedule, info) -> list:
    loops = sch.get_loops(info.block_rv)
    n = len(info.dom_kind()) - len(info.dom_kind().lstrip("S"))
    return list(loops[:n])


class Epilogue(CPUScheduleRule):
    """Inline injective blocks; one reduction + epilogue -> the epilogue under the reduction's spatial loops."""

    def __init__(self, parallel: bool, vector_lanes: int = 16) -> None:
        self.parallel = parallel
        self.lanes = vector_lanes

    def apply(self, func: tirx.PrimFunc, target, tunable: bool):
        if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
            return None
        try:
            sch = s_tir.Schedule(func)
            infos = dl.normalize_prim_func(sch)
            if infos is None:
                return None
            rest = bounded_inline(sch, list(infos))
            if len(rest) == 1 and rest[0].is_injective():
                trial = sch.copy()
                if _attempt(lambda: self._spatial(trial, rest[0], partition=True)):
                    sch = trial
                else:
                    self._spatial(sch, rest[0], partition=False)
            elif len(rest) == 2 and not rest[0].is_injective() and rest[1].is_injective():
                red, epi = rest
                spatial = _leading_spatial(sch, red)
                if not spatial:
                    return None
                trial = sch.copy()
                if _attempt(lambda: self._vectorize_outputs(trial, red, epi, spatial)):
                    sch = trial
                else:
                    trial = sch.copy()
                    if _attempt(lambda: reverse_compute_at_whole(trial, epi.block_rv, spatial[-1]) is None):
                        sch = trial
                    else:  # an epilogue bigger than the reduction (a pad): its own loop nest after the reduction
                        trial = sch.copy()
                        if _attempt(lambda: self._spatial(trial, epi, partition=True)):
                            sch = trial
                        else:
                            self._spatial(sch, epi, partition=False)
                    if self.parallel:
                        _parallelize(sch, spatial, len(spatial) - 1)
            elif len(rest) == 1:  # a reduction alone (max pooling): short windows -> outputs innermost
                spatial = _leading_spatial(sch, rest[0])
                if spatial:
                    trial = sch.copy()
                    if _attempt(lambda: self._vectorize_outputs(trial, rest[0], None, spatial)):
                        sch = trial
                    elif self.parallel:
                        _parallelize(sch, spatial, len(spatial) - 1)
            elif len(rest) <= 2:
                pass  # inlining alone already helps (e.g. two reductions): keep it
            else:
                return None
            return sch
        except Exception as exc:  # noqa: BLE001 - a kernel we cannot schedule keeps TVM's default lowering
            logger.debug("epilogue rule declined %s: %s", func.attrs.get("global_symbol", "?") if func.attrs else "?",
                         exc)
            return None

    def _vectorize_outputs(self, sch: s_tir.Schedule, red, epi, spatial: list) -> bool:
        """A short reduction (depthwise conv: 3x3 = 9 products per output) is too short for a vector, and one
        output at a time leaves the SIMD unit idle: vectorize across `lanes` neighbouring outputs instead (the
        innermost spatial loop moved inside the reduction loops, the epilogue computed per vector of outputs).
        Only where the reduction has at most SHORT_REDUCTION elements: a long one (a matmul) would reload and
        store the accumulator vector once per reduction element. `epi` is None for a reduction alone (a max pool)."""
        loops = sch.get_loops(red.block_rv)
        reduction = loops[len(spatial):]
        extents = [fused_extent(sch, lp) for lp in reduction]
        inner = fused_extent(sch, spatial[-1])
        if (not self.lanes or not reduction or None in extents or int(np.prod(extents)) > SHORT_REDUCTION
                or inner is None or inner < MIN_VECTOR):
            return False
        if not _unit_stride(sch, red.block_rv, len(spatial) - 1):
            # a strided read (stride-2 conv or pooling): an explicit vector would be a gather, but one output at a
            # time re-walks the window per output; a row of outputs innermost, with the window loops around it,
            # is what LLVM's own vectorizer turns into strided loads (resnet18's 3x3/2 max pool: 1.36 -> 0.25 ms)
            # Serial even in threaded builds: inside TVM's outlined parallel body (buffer pointers read from a
            # closure, no longer noalias) LLVM no longer vectorizes these strided loads; ResNet-18's max pool
            # took 0.71 ms on 2 threads that way, 0.23 ms on one.
            if len(spatial) < 2:
                return False
            sch.reorder(*reduction, spatial[-1])
            if epi is not None:
                reverse_compute_at_whole(sch, epi.block_rv, spatial[-2])
            sch.decompose_reduction(red.block_rv, reduction[0])
            return True
        split = self._vector_split(sch, spatial[-1], inner)
        if split is None:
            return False
        outer, vec = split
        outer = outer if outer is not None else (spatial[-2] if len(spatial) > 1 else None)
        if outer is None:
            return False
        # vectorize and move the epilogue while the reduction block still has its init (a decomposed update
        # block is no longer a "reduction block" to the schedule's dataflow checks)
        if self.parallel:  # the loops outside `outer` (a split of the last spatial loop, or the one before it)
            _parallelize(sch, spatial, len(spatial) - (1 if split[0] is not None else 2))
        sch.reorder(*reduction, vec)
        sch.vectorize(vec)
        if epi is not None:
            reverse_compute_at_whole(sch, epi.block_rv, outer)
            sch.vectorize(sch.get_loops(epi.block_rv)[-1])
        init = sch.decompose_reduction(red.block_rv, reduction[0])
        init_loop = sch.get_loops(init)[-1]
        if sch.get(init_loop).kind != tirx.ForKind.VECTORIZED:
            sch.vectorize(init_loop)
        return True

    def _spatial(self, sch: s_tir.Schedule, info, partition: bool = True) -> bool:
        """Keep the loop nest (fusing it costs a div/mod per element and breaks vector loads): vectorize the
        innermost loop, parallelize the outermost."""
        loops = sch.get_loops(info.block_rv)
        if not loops:
            return True
        if self.parallel:
            _parallelize(sch, loops, len(loops) - 1)
        inner = loops[-1]
        interior = _pad_interior(sch, info.block_rv, len(loops) - 1) if self.lanes and partition else None
        if interior is not None:
            # a padded output (the next conv's zero padding, with the epilogue inlined into it): the per-element
            # "inside?" test makes TVM's vectorizer scalarize the whole row. Split the row into border | interior |
            # border: in the interior the test simplifies away and the row vectorizes.
            lo, hi = interior
            extent = fused_extent(sch, inner)
            parts = [n for n in (lo, hi - lo, extent - hi) if n > 0]
            pieces = sch.loop_partition(inner, [*parts[:-1], None])  # like split: the last part is the rest
            inner = pieces[1 if lo > 0 else 0]
        extent = fused_extent(sch, inner)
        if self.lanes and extent is not None and extent >= (MIN_VECTOR if interior else self.lanes):
            split = self._vector_split(sch, inner, extent)
            if split is not None:
                sch.vectorize(split[1])
        return True

    def _vector_split(self, sch: s_tir.Schedule, loop, extent: int):
        """``(outer, vector loop)``: `lanes`-wide vectors when they divide the loop, else the whole loop as one
        vector (outer None) when it is at most 4 vectors long; None otherwise."""
        if extent % self.lanes == 0 and extent > self.lanes:
            return tuple(sch.split(loop, [None, self.lanes]))
        if extent <= 4 * self.lanes:
            return None, loop
        return None


PARALLEL_MIN = 8  # iterations a parallel loop needs to keep a few threads busy


def _parallelize(sch: s_tir.Schedule, loops: list, upto: int) -> None:
    """One parallel loop: the fewest leading ``loops[:k]`` (``k <= upto``), fused, with at least PARALLEL_MIN
    iterations (all ``upto`` of them when they never reach it). An NCHW kernel's outermost loop is the batch, 1."""
    k, total = 0, 1
    while k < upto and total < PARALLEL_MIN:
        extent = fused_extent(sch, loops[k])
        if extent is None:
            break
        total *= extent
        k += 1
    if k:
        sch.parallel(sch.fuse(*loops[:k]) if k > 1 else loops[0])


def _attempt(step) -> bool:
    """Run an optional schedule step (on a copy of the schedule); False, logged, when TVM rejects it."""
    try:
        return bool(step())
    except Exception as exc:  # noqa: BLE001 - the rule then keeps its plain schedule
        logger.debug("optional schedule step declined: %s", str(exc).strip().splitlines()[-1:] or exc)
        return False


def _unit_stride(sch: s_tir.Schedule, block_rv, axis: int) -> bool:
    """True when every buffer the block reads or writes is indexed by its block var number ``axis`` only in the
    last dimension, with coefficient 0 or 1 (neighbouring outputs read neighbouring elements: vector loads)."""
    block = sch.get(block_rv)
    if axis >= len(block.iter_vars):
        return False
    var = block.iter_vars[axis].var
    for region in list(block.reads) + list(block.writes):
        dims = list(region.region)
        for d, rng in enumerate(dims):
            coeff = tvm.sym.detect_linear_equation(rng.min, [var])
            if len(coeff) != 2 or not isinstance(coeff[0], tirx.IntImm):
                return False
            c = int(coeff[0].value)
            if c != 0 and (d != len(dims) - 1 or c != 1):
                return False
    return True


def _pad_interior(sch: s_tir.Schedule, block_rv, axis: int) -> tuple[int, int] | None:
    """``(lo, hi)`` when the block stores ``if_then_else(... lo <= v and v < hi ..., x, pad)`` with ``v`` its
    block var number ``axis`` (bound to the loop of the same position), constant bounds and 0 <= lo < hi <= extent;
    else None."""
    block = sch.get(block_rv)
    store = block.body
    value = getattr(store, "value", None)
    if not (isinstance(value, tvm.ir.Call) and str(getattr(value.op, "name", "")).endswith("if_then_else")):
        return None
    if axis >= len(block.iter_vars):
        return None
    var = block.iter_vars[axis].var
    extent = block.iter_vars[axis].dom.extent
    if not isinstance(extent, tirx.IntImm):
        return None
    lo, hi = 0, int(extent)
    stack = [value.args[0]]
    while stack:
        cond = stack.pop()
        if isinstance(cond, tirx.And):
            stack += [cond.a, cond.b]
        elif isinstance(cond, tirx.LE) and cond.b.same_as(var) and isinstance(cond.a, tirx.IntImm):
            lo = max(lo, int(cond.a.value))
        elif isinstance(cond, tirx.LT) and cond.a.same_as(var) and isinstance(cond.b, tirx.IntImm):
            hi = min(hi, int(cond.b.value))
    if (lo, hi) == (0, int(extent)) or lo >= hi:
        return None
    return lo, hi


def fused_extent(sch: s_tir.Schedule, loop) -> int | None:
    ext = sch.get(loop).extent
    return int(ext) if isinstance(ext, tirx.IntImm) else None


def schedule_pass(parallel: bool, vector_lanes: int = 16) -> tvm.transform.Pass:
    """``vector_lanes=0`` for cores without SIMD registers (Cortex-M4): vector code is scalarized there, only bigger.
    Where vectors exist, two kinds of float kernel are first rebuilt by hand: those around a float64 erf (GELU
    between an accumulator and a QuantizeLinear) with a certified float32 erf (:mod:`~..kernels.certified`), and
    last-axis softmaxes as one vectorized row loop (:mod:`~..kernels.softmax`)."""
    from qcompile.targets.tvm.kernels.certified import certify
    from qcompile.targets.tvm.kernels.softmax import rebuild

    rule = dl.ApplyDefaultSchedule(Epilogue(parallel, vector_lanes))
    if not vector_lanes:
        return rule
    return tvm.transform.Sequential([replace_kernels("QcompileCertifiedErf", lambda f: certify(f, parallel)),
                                     replace_kernels("QcompileRowSoftmax", lambda f: rebuild(f, parallel)), rule])


def replace_kernels(name: str, rebuild) -> tvm.transform.Pass:
    """Module pass: every kernel for which ``rebuild(func)`` returns a PrimFunc is replaced by it (the hand-built
    kernels mark themselves scheduled); None, or an exception (logged), keeps the kernel for the rule."""
    @tvm.transform.module_pass(opt_level=0, name=name)
    def _pass(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        updates = {}
        for gv, func in mod.functions_items():
            if isinstance(func, tirx.PrimFunc):
                try:
                    new = rebuild(func)
                except Exception as exc:  # noqa: BLE001 - a kernel we cannot rebuild keeps the default path
                    logger.debug("%s declined %s: %s", name, gv.name_hint, exc)
                    new = None
                if new is not None:
                    updates[gv] = new
        if not updates:
            return mod
        mod = mod.clone()  # a pass returns a new module; the caller's stays as it was
        for gv, new in updates.items():
            mod.update_func(gv, new)
        return mod
    return _pass


GPU_KINDS = ("cuda", "opencl")


def fusion_passes(target: tvm.target.Target, fast_math: bool = False) -> list[tvm.transform.Pass]:
    """Everything every TVM pipeline (:mod:`..pipeline`) runs before scheduling: the kernels after these passes are
    the ones the :class:`Epilogue` rule (or a MetaSchedule database, :mod:`.tune`) schedules. Run them inside
    ``with target``."""
    from tvm.relax.backend import cpu_generic

    from qcompile.targets.tvm.kernels import floatspec
    from qcompile.targets.tvm.kernels.mathfns import erf_pass, has_double_fpu

    if fast_math:
        math = [relax.transform.FastMathTransform()]
    else:  # erf as the reference computes it, vectorized (mathfns); libm's erff on cores without a double FPU
        math = [erf_pass()] if has_double_fpu(target) else []
    from qcompile.targets.tvm.kernels.x86_epilogue import fuse_epilogue
    from qcompile.targets.tvm.schedules.rewrite import (cumsum_as_reduction, scalar_constants_as_tensors,
                                                        topk_as_ranks, unit_reductions_as_spatial)

    # GPU kernels share their code across layers (CPU kernels keep their constants as immediates: the x86 tuning
    # records and the vector code of the CPU targets are made for those); scans as reductions (no host workspace,
    # no host loop of launches). TopK as ranks on every target: TVM's GPU TopK has the scan's needs, its CPU one is
    # a sort in TVM's C++ runtime, which firmware and the static executor do not have
    shared = [scalar_constants_as_tensors(), cumsum_as_reduction()] if target.kind.name in GPU_KINDS else []
    shared.append(topk_as_ranks())
    # float32 exp / sigmoid / tanh / softmax / x^2 as the reference computes them (kernels.floatspec), every other op
    # as TVM legalizes it
    legalize = [floatspec.legalize_pass()] + cpu_generic.legalize_passes(target)[1:]
    return (shared + math + cpu_generic.library_dispatch_passes(target) + legalize
            + [replace_kernels("QcompileVnniEpilogue", fuse_epilogue), unit_reductions_as_spatial()])


__all__ = ["Epilogue", "GPU_KINDS", "fusion_passes", "replace_kernels", "schedule_pass"]
