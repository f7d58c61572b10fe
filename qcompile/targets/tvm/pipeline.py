"""Pipelines, one per target family, in the style of TVM's ``relax/backend/<target>/pipeline.py``: every TVM target
runs the same front end (:mod:`.frontend`), fusion passes (:func:`~.schedules.rules.fusion_passes`) and executor;
a back end differs from another by the schedule phase below and the kernels it calls.

- :func:`x86_phases`: a MetaSchedule database where one exists, then the rule (parallel outer loops on N threads);
  the VNNI kernels come in before fusion (:func:`~.kernels.x86_vnni.vnni_transform`) and are already scheduled.
- :func:`generic_phases`: the rule (AArch64: NEON/dotprod through LLVM's vectorizer), after a tuning database.
- :func:`mcu_phases`: the Cortex-M DSP kernels (``SMLAD``), then the rule without vector loops.
- :func:`hexagon_phases`: the rule on HVX vectors; the ``vrmpy`` kernels come in before fusion.
- :func:`gpu_phases`: TVM's dlight GPU rules (thread bindings, workgroup tiling in local memory) for OpenCL / CUDA.
- :func:`host_pipeline`: TVM's whole CPU pipeline around the x86 phases, for the Relax VM executor.

The CPU phase lists but Hexagon's end with :func:`~.kernels.floatspec.separate_multiply_add_pass` (LLVM would
otherwise fuse a float multiply and add into an FMA, which the reference does not); GPU code is compiled without
contraction.
"""
from __future__ import annotations

import logging
from pathlib import Path

import tvm

from qcompile.targets.tvm.kernels.floatspec import separate_multiply_add_pass
from qcompile.targets.tvm.schedules.rules import fusion_passes, schedule_pass

logger = logging.getLogger(__name__)


def x86_phases(parallel: bool, database_dir: Path | None = None) -> list[tvm.transform.Pass]:
    """Tuned kernels from ``database_dir`` (a MetaSchedule JSON database, :func:`~.schedules.tune.tune`), the
    :class:`~.schedules.rules.Epilogue` rule for the rest (parallel outer loops when ``parallel``)."""
    tuned = []
    if database_dir is not None:
        from qcompile.targets.tvm.schedules.tune import apply_database

        tuned = [apply_database(database_dir)]
    return tuned + [schedule_pass(parallel=parallel), separate_multiply_add_pass()]


def generic_phases(database_dir: Path | None = None) -> list[tvm.transform.Pass]:
    """The rule, serial (cross-compiled CPUs run by the static executor's single-threaded runtime), after the
    tuned kernels of ``database_dir`` where one is given (:func:`x86_phases` without parallel loops)."""
    return x86_phases(False, database_dir)


def mcu_phases(target: dict | tvm.target.Target, vector_lanes: int = 0) -> list[tvm.transform.Pass]:
    """A Cortex-M with the DSP extension: the DSP kernels (:func:`~.kernels.arm_dsp.dsp_transform`), then the
    epilogue rule for everything else, by default without vector loops (the M4 has no SIMD registers: LLVM only
    scalarizes vector code there). A target without DSP gets the rule alone."""
    from qcompile.targets.tvm.kernels.arm_dsp import dsp_transform, target_has_dsp

    tgt = target if isinstance(target, tvm.target.Target) else tvm.target.Target(target)
    rest = [schedule_pass(parallel=False, vector_lanes=vector_lanes), separate_multiply_add_pass()]
    if not target_has_dsp(tgt):
        logger.info("dsp: %s has no DSP extension; default schedule only", tgt)
        return rest

    @tvm.transform.module_pass(opt_level=0, name="QcompileDspKernels")
    def _dsp(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        return dsp_transform(mod)
    return [_dsp, *rest]


def hexagon_phases() -> list[tvm.transform.Pass]:
    """The rule, serial, vectorized across a 128-byte HVX vector's 32 int32 lanes, with the float rebuilds (certified
    erf, row softmax: no libm call, none exists on the freestanding target); the ``vrmpy`` kernels come in before
    fusion (:func:`~.kernels.hexagon_hvx.hvx_transform`); every vector loop then on a width LLVM's HVX code computes
    right (:func:`~.kernels.hexagon_hvx.legal_vector_loops_pass`), and every float product rounded before its add
    (:func:`~.kernels.hexagon_hvx.separate_float_products_pass`, Hexagon's stand-in for the CPU targets' fence). A
    build without HVX runs the same phases: LLVM scalarizes the vectors, so both builds compute the same float
    regions."""
    from qcompile.targets.tvm.kernels.hexagon_hvx import legal_vector_loops_pass, separate_float_products_pass

    return [schedule_pass(parallel=False, vector_lanes=32), legal_vector_loops_pass(), separate_float_products_pass()]


def gpu_phases() -> list[tvm.transform.Pass]:
    """TVM's default GPU schedules (``dlight``): matmul-like kernels (int8 conv2d and matmul with their fused
    requantize epilogues) tiled over workgroups with operands staged in local memory, GEMV and reductions across
    threads, every other kernel on one thread per output element; kernels with a float reduction first go to
    :func:`~.kernels.floatspec.in_order_float_reduction` (one output per thread, the sum in the reference's order).
    Every kernel leaves bound to threads."""
    from tvm.s_tir import dlight as dl

    from qcompile.targets.tvm.kernels.floatspec import in_order_float_reduction

    rules = [in_order_float_reduction(), dl.gpu.Matmul(), dl.gpu.GEMV(), _reduction_rule(), dl.gpu.GeneralReduction(),
             dl.gpu.Fallback()]
    return [dl.ApplyDefaultSchedule(*[_next_on_error(r) for r in rules])]


def _reduction_rule():
    """dlight's Reduction rule, with one of its paths mended. Where the sums' spatial part goes to threads and an
    unrolled channel loop (``unroll_spatial_factor``: a grouped 1x1 conv, SqueezeBERT's grouped linear layers,
    ShuffleNet's grouped pointwise convs) and an elementwise epilogue follows, the rule writes each thread's sums
    to its private memory in one order and has the epilogue read them in another, so most outputs came from other
    threads' sums that were never there (1 in 8 equal on tvm-opencl). Here the sums of such a kernel go to shared
    memory, read by the epilogue's threads as the rule's broadcast-epilogue path does (TIR syncs the two)."""
    from tvm.s_tir import dlight as dl
    from tvm.s_tir.dlight.gpu import reduction as dl_reduction

    class Reduction(dl.gpu.Reduction):
        def _sch_inner_spatial(self, sch, target, block, s_factor, unroll_spatial_factor, epilogue_info, loop_order,
                               s_split_index):  # noqa: D102 - dlight hook
            if not unroll_spatial_factor or epilogue_info is None:
                return super()._sch_inner_spatial(sch, target, block, s_factor, unroll_spatial_factor,
                                                  epilogue_info, loop_order, s_split_index)
            super()._sch_inner_spatial(sch, target, block, s_factor, unroll_spatial_factor, None, loop_order,
                                       s_split_index)
            epilogue = epilogue_info.block_rv
            sch.reverse_compute_at(epilogue, sch.get_loops(block)[0], preserve_unit_loops=True)
            sch.set_scope(block, 0, "shared")
            _, *s = sch.get_loops(epilogue)
            _, tx, ty = sch.split(sch.fuse(*s), factors=[None, dl_reduction._suggest_inner_spatial_tx(s_factor), 16])
            sch.bind(tx, "threadIdx.x")
            sch.bind(ty, "threadIdx.y")
            return None
    return Reduction()


def _next_on_error(rule):
    """``rule``, except that where it raises on a kernel the next rule gets that kernel: dlight's rules raise on
    shapes they half match (the Matmul rule on a conv whose input pad is fused in, in transformers' MobileNetV2 and
    EfficientNet: "consumers of the cache-write stage that are not properly inlined"), and one such kernel failed
    the whole build; or that TIR's cross-thread reduction lowering then refuses (checked here). Each rule schedules its
    own copy of the kernel, so a failed attempt leaves nothing behind."""
    from tvm.s_tir import dlight as dl

    class NextOnError(dl.ScheduleRule):
        def apply(self, func, target, tunable):  # noqa: D102 - dlight hook
            try:
                space = rule.apply(func, target, tunable)
                for sch in space if isinstance(space, list) else [] if space is None else [space]:
                    # a cross-thread reduction the rule set up that TIR cannot lower (dlight's Reduction rule on a
                    # grouped conv with its pad fused in: RegNet, wav2vec2's positional conv) fails here, not later
                    tvm.s_tir.transform.LowerCrossThreadReduction()(sch.mod)
                return space
            except Exception as exc:  # noqa: BLE001 - TVM raises its own error types from C++
                logger.info("dlight %s declined a kernel (%s); the next rule schedules it", type(rule).__name__,
                            str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__)
                return None
    return NextOnError()


def host_pipeline(target: tvm.target.Target, parallel: bool = True, fast_math: bool = False,
                  database_dir: Path | None = None) -> tvm.transform.Pass:
    """TVM's CPU pipeline (dispatch, legalize + FuseOps/FuseTIR, lower, finalize) with :func:`x86_phases` after
    fusion. (``tvm.compile``'s "default" pipeline does not fuse at all.)"""
    from tvm.relax.backend import cpu_generic
    from tvm.relax.backend.cpu_generic import pipeline as cpu

    phases = x86_phases(parallel, database_dir)

    @tvm.transform.module_pass(opt_level=0, name="QcompileHostPipeline")
    def _pipeline(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        with target:
            seq = (fusion_passes(target, fast_math) + phases
                   + cpu.dataflow_lower_passes(target) + cpu_generic.finalize_passes(target))
            return tvm.transform.Sequential(seq)(mod)
    return _pipeline
