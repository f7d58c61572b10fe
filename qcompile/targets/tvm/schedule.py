"""Default (untuned) schedules for the kernels the integer lowering produces, and the Relax pipeline around them.

After ``FuseOps``/``FuseTIR`` a kernel is typically a reduction (conv2d, depthwise conv, matmul, sum) followed by
the requantization epilogue (a dozen int64 elementwise ops), or an elementwise chain alone. Unscheduled, TIR
materializes every intermediate as a full tensor: slow, and on a microcontroller each one is RAM (kernel
workspace). The rule here, in dlight's style, inlines every injective block it can (padding into the convolution's
reads, elementwise chains into one loop nest), moves the remaining epilogue under the reduction's spatial loops
(``reverse_compute_at``), so that intermediates shrink to one element, and vectorizes the innermost spatial loop
of elementwise nests. Kernels already scheduled (``tirx.is_scheduled``: the VNNI kernels) are left alone; a kernel
the rule cannot handle keeps TVM's default lowering (never an error).

Targets differ only in whether loops may run in parallel (hosted CPUs) or not (static C / microcontrollers).
"""
from __future__ import annotations

import logging
from pathlib import Path

import tvm
from tvm import relax, s_tir, tirx
from tvm.s_tir import dlight as dl
from tvm.s_tir.dlight.cpu.base import CPUScheduleRule

logger = logging.getLogger(__name__)


def _leading_spatial(sch: s_tir.Schedule, info) -> list:
    loops = sch.get_loops(info.block_rv)
    n = len(info.dom_kind()) - len(info.dom_kind().lstrip("S"))
    return list(loops[:n])


class Epilogue(CPUScheduleRule):
    """Inline injective blocks; one reduction + epilogue -> the epilogue under the reduction's spatial loops."""

    def __init__(self, parallel: bool, vector_lanes: int = 16) -> None:
        self.parallel = parallel
        self.lanes = vector_lanes

    def apply(self, func: tirx.PrimFunc, target, tunable: bool):  # noqa: D102 - dlight rule hook
        if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
            return None
        try:
            sch = s_tir.Schedule(func)
            infos = dl.normalize_prim_func(sch)
            if infos is None:
                return None
            rest = dl.try_inline(sch, list(infos))
            if len(rest) == 1 and rest[0].is_injective():
                self._spatial(sch, rest[0])
            elif len(rest) == 2 and not rest[0].is_injective() and rest[1].is_injective():
                red, epi = rest
                spatial = _leading_spatial(sch, red)
                if not spatial:
                    return None
                sch.reverse_compute_at(epi.block_rv, spatial[-1])
                if self.parallel and len(spatial) > 1:
                    sch.parallel(spatial[0])
            elif len(rest) <= 2:
                pass  # inlining alone already helps (e.g. two reductions): keep it
            else:
                return None
            return sch
        except Exception as exc:  # noqa: BLE001 - a kernel we cannot schedule keeps TVM's default lowering
            logger.debug("epilogue rule declined %s: %s", func.attrs.get("global_symbol", "?") if func.attrs else "?",
                         exc)
            return None

    def _spatial(self, sch: s_tir.Schedule, info) -> None:
        """Keep the loop nest (fusing it costs a div/mod per element and breaks vector loads): vectorize the
        innermost loop, parallelize the outermost."""
        loops = sch.get_loops(info.block_rv)
        if not loops:
            return
        extent = fused_extent(sch, loops[-1])
        if self.lanes and extent is not None and extent >= self.lanes:
            if extent % self.lanes == 0 and extent > self.lanes:
                _, inner = sch.split(loops[-1], [None, self.lanes])
                sch.vectorize(inner)
            elif extent <= 4 * self.lanes:
                sch.vectorize(loops[-1])
        if self.parallel and len(loops) > 1:
            sch.parallel(loops[0])


def fused_extent(sch: s_tir.Schedule, loop) -> int | None:
    ext = sch.get(loop).extent
    return int(ext) if isinstance(ext, tirx.IntImm) else None


def schedule_pass(parallel: bool, vector_lanes: int = 16) -> tvm.transform.Pass:
    """``vector_lanes=0`` for cores without SIMD registers (Cortex-M4): vector code is scalarized there, only bigger."""
    return dl.ApplyDefaultSchedule(Epilogue(parallel, vector_lanes))


def fusion_passes(target: tvm.target.Target, fast_math: bool = False) -> list[tvm.transform.Pass]:
    """Everything :func:`host_pipeline` runs before scheduling: the kernels after these passes are the ones the
    :class:`Epilogue` rule (or a MetaSchedule database, :mod:`.tune`) schedules. Run them inside ``with target``."""
    from tvm.relax.backend import cpu_generic

    fast = [relax.transform.FastMathTransform()] if fast_math else []
    return fast + cpu_generic.library_dispatch_passes(target) + cpu_generic.legalize_passes(target)


def host_pipeline(target: tvm.target.Target, parallel: bool = True, fast_math: bool = False,
                  database_dir: Path | None = None) -> tvm.transform.Pass:
    """TVM's CPU pipeline (dispatch, legalize + FuseOps/FuseTIR, lower, finalize) with :class:`Epilogue` after
    fusion. (``tvm.compile``'s "default" pipeline does not fuse at all.) With ``database_dir`` (a MetaSchedule
    JSON database written by :func:`qcompile.targets.tvm.tune.tune`), kernels with a tuning record get the tuned
    schedule and the rule schedules the rest."""
    from tvm.relax.backend import cpu_generic
    from tvm.relax.backend.cpu_generic import pipeline as cpu

    tuned = []
    if database_dir is not None:
        from qcompile.targets.tvm.tune import apply_database

        tuned = [apply_database(database_dir)]

    @tvm.transform.module_pass(opt_level=0, name="QcompileHostPipeline")
    def _pipeline(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        with target:
            seq = (fusion_passes(target, fast_math) + tuned + [schedule_pass(parallel)]
                   + cpu.dataflow_lower_passes(target) + cpu_generic.finalize_passes(target))
            return tvm.transform.Sequential(seq)(mod)
    return _pipeline


__all__ = ["Epilogue", "fusion_passes", "host_pipeline", "schedule_pass"]
