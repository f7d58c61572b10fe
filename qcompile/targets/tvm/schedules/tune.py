"""MetaSchedule tuning of the kernels :func:`.schedule.host_pipeline` would schedule with the Epilogue rule.

``tune`` runs the same pre-schedule passes as the pipeline (:func:`.schedule.fusion_passes`: dispatch, legalize,
FuseOps/FuseTIR), takes every fused PrimFunc not already scheduled (the VNNI kernels carry ``tirx.is_scheduled``
and are skipped), and tunes them with MetaSchedule into a JSON database in ``work_dir``
(``database_workload.json`` + ``database_tuning_record.json``; MetaSchedule's own logs go to ``work_dir/logs``).
``apply_database`` (used by ``host_pipeline(..., database_dir=...)``) replaces each kernel that has a record by its
best tuned schedule; kernels without one fall through to the Epilogue rule. Applying a database is deterministic:
the best record's trace is replayed, so the same database gives the same library.

Reuse: a kernel whose workload already has a valid record in the database counts as tuned and is not tuned again,
so a rebuild with the same database (or ``trials=0``) costs no trials, and a database shared between models only
tunes kernels it has not seen.

Budget: every new kernel's Epilogue schedule is measured and committed first (a record the search must beat, so
a short search never makes a kernel slower than untuned, as measured); the trials then go to the most expensive
kernels (measured latency x calls), in proportion to their cost, at least 16 each. Elementwise requantization
chains have a tiny search space (MetaSchedule stops them after 1-2 candidates); convolutions not on the VNNI path
(depthwise) and softmax / layer-norm style reductions are where tuning pays.

Builder and runner run in this process (:class:`InProcessBuilder`, :class:`InProcessRunner`). TVM's
``LocalBuilder``/``LocalRunner`` work here but start a ``PopenPoolExecutor`` of fresh Python workers for every
batch of candidates (each worker imports TVM and registers its tensor intrinsics: ~25 s measured on this 2-core
machine for one trivial kernel) and round-trip every candidate through ``export_library`` (compiler + linker).
In-process, a candidate is built with ``tvm.compile`` (LLVM: runnable without linking) and timed with
``time_evaluator``. The price: a crashing candidate takes the process down and there is no per-candidate timeout.
One crash seen: ``take`` timed on random int64 indices reads out of bounds, hence integer inputs are all ones.
"""
from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import time
from pathlib import Path

import tvm
import tvm_ffi
from tvm.ir.utils import derived_object
from tvm.s_tir import meta_schedule as ms
from tvm.s_tir.meta_schedule.builder import BuilderInput, BuilderResult, PyBuilder
from tvm.s_tir.meta_schedule.measure_callback import PyMeasureCallback
from tvm.s_tir.meta_schedule.runner import EvaluatorConfig, PyRunner, RunnerFuture, RunnerInput
from tvm.s_tir.meta_schedule.runner.local_runner import LocalRunnerFuture
from tvm.s_tir.meta_schedule.runner.utils import run_evaluator_common

from qcompile.errors import TargetError
from qcompile.targets.tvm.kernels.let_buffers import tir_pipeline
from qcompile.targets.tvm.schedules import remote

logger = logging.getLogger(__name__)

WORKLOADS = "database_workload.json"
RECORDS = "database_tuning_record.json"

# Built candidates live here between the builder and the runner (keyed by a pseudo artifact path).
_BUILT: dict[str, tvm.runtime.Module] = {}


@derived_object
class InProcessBuilder(PyBuilder):
    """Builds each candidate with ``tvm.compile`` in this process; the artifact is kept in memory."""

    def build(self, build_inputs: list[BuilderInput]) -> list[BuilderResult]:
        from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

        results = []
        for inp in build_inputs:
            try:
                mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(inp.mod)
                key = f"inproc://{id(mod)}-{len(_BUILT)}-{time.monotonic_ns()}"
                built = tvm.compile(mod, target=inp.target, tir_pipeline=tir_pipeline(inp.target))
                _BUILT[key] = built.jit() if hasattr(built, "jit") else built  # LLVM: runnable as is, no linker
                results.append(BuilderResult(key, None))
            except Exception as exc:  # noqa: BLE001 - a candidate that fails to build is a failed trial
                results.append(BuilderResult(None, f"InProcessBuilder: {type(exc).__name__}: {exc}"))
        return results


@derived_object
class InProcessRunner(PyRunner):
    """Times each built candidate with ``time_evaluator`` on random inputs, in this process."""

    def __init__(self, config: EvaluatorConfig | None = None) -> None:
        super().__init__()
        self.config = config or EvaluatorConfig(number=3, repeat=1, min_repeat_ms=40, enable_cpu_cache_flush=False)

    def run(self, runner_inputs: list[RunnerInput]) -> list[RunnerFuture]:
        fill = tvm.get_global_func("tvm.contrib.random.random_fill_for_measure", allow_missing=True) \
            or tvm.get_global_func("tvm.contrib.random.random_fill")
        futures = []
        for inp in runner_inputs:
            rt_mod = _BUILT.pop(inp.artifact_path, None)
            try:
                if rt_mod is None:
                    raise TargetError(f"no built module for {inp.artifact_path}")
                dev = tvm.runtime.device(inp.device_type, 0)
                args = [remote.alloc_measure_args(dev, [info.as_json() for info in inp.args_info], fill)]
                costs = run_evaluator_common(rt_mod, dev, self.config, args)
                futures.append(LocalRunnerFuture(res=costs))
            except Exception as exc:  # noqa: BLE001 - a candidate that fails to run is a failed trial
                futures.append(LocalRunnerFuture(error_message=f"InProcessRunner: {type(exc).__name__}: {exc}"))
        return futures


@derived_object
class _Progress(PyMeasureCallback):
    """Advances a tqdm bar by the number of measured candidates."""

    def __init__(self, bar, name: str = "", busy=None) -> None:
        super().__init__()
        self.bar, self.name, self.busy = bar, name, busy

    def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results) -> None:
        self.bar.update(len(measure_candidates))
        if self.busy is not None:  # remote devices: how many are measuring now
            self.bar.set_postfix_str(f"{self.name} {self.busy()}".strip())


def tuning_target(target: tvm.target.Target, num_cores: int | None = None) -> tvm.target.Target:
    """MetaSchedule's CPU rules need ``num-cores``; default: ``TVM_NUM_THREADS`` or the CPU count."""
    if "num-cores" in target.attrs and int(target.attrs["num-cores"]) > 0:
        return target
    n = num_cores or int(os.environ.get("TVM_NUM_THREADS", "0") or 0) or os.cpu_count() or 1
    cfg = dict(target.export())
    cfg["num-cores"] = n
    return tvm.target.Target(cfg)


def fused_module(mod: tvm.IRModule, target: tvm.target.Target, fast_math: bool = False) -> tvm.IRModule:
    """``mod`` after the passes ``host_pipeline`` runs before scheduling."""
    from qcompile.targets.tvm.schedules.rules import fusion_passes

    with target:
        return tvm.transform.Sequential(fusion_passes(target, fast_math))(mod)


def _is_scheduled(func: tvm.tirx.PrimFunc) -> bool:
    return bool(func.attrs is not None and "tirx.is_scheduled" in func.attrs
                and int(func.attrs["tirx.is_scheduled"]) == 1)


def _has_valid_record(db: ms.database.Database, func_mod: tvm.IRModule) -> bool:
    if not db.has_workload(func_mod):
        return False
    recs = db.get_top_k(db.commit_workload(func_mod), 1)
    return bool(recs) and recs[0].run_secs is not None and len(recs[0].run_secs) > 0 \
        and float(recs[0].run_secs[0]) < 1e9


def open_database(work_dir: Path) -> ms.database.JSONDatabase:
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    return ms.database.JSONDatabase(str(work_dir / WORKLOADS), str(work_dir / RECORDS), allow_missing=True,
                                    module_equality="structural")


def tune(mod: tvm.IRModule, target: tvm.target.Target, trials: int, work_dir: Path, *, progress: bool = True,
         fast_math: bool = False, num_cores: int | None = None, seed: int = 0, min_task_trials: int = 16,
         float_reductions: bool = False, rpc: tuple[str, str] | None = None, fcompile=None) -> Path:
    """Tune the not-yet-scheduled fused kernels of ``mod`` (a Relax module before ``host_pipeline``) that have
    no record in ``work_dir`` yet, with about ``trials`` MetaSchedule trials in total.

    Each kernel's :class:`.schedule.Epilogue` schedule is measured first and committed as a record (so the best
    record is never the slower one, as measured). Trials go to the kernels by their share of the measured time
    (latency x calls in ``main``), at least ``min_task_trials`` each, most expensive first, until 95 % of the
    time is covered; cheaper kernels keep the Epilogue record. Kernels with a float reduction (softmax,
    layer-norm means) are left to the Epilogue rule unless ``float_reductions``: a tuned summation order changes
    float rounding, which flips float->integer borders (MiniLM: max 6 LSB instead of 0; integer ops stay exact),
    like ``fast_math``. Integer kernels are exact under any schedule. ``rpc`` = (tracker ``HOST:PORT``, device key):
    every candidate (the Epilogue seeds too) is measured on the devices behind that tracker
    (:mod:`.remote`), built and exported here (``fcompile``: TVM's ``export_library`` compiler for the device,
    e.g. a cross compiler; default: the host's). Returns ``work_dir`` (the database folder to hand to
    ``host_pipeline(..., database_dir=...)``)."""
    work_dir = Path(work_dir)
    db = open_database(work_dir)
    if trials <= 0:
        return work_dir
    tgt = tuning_target(target, num_cores)
    fused = fused_module(mod, tgt, fast_math)
    todo: list[tuple[str, tvm.tirx.PrimFunc, int]] = []
    seen: list[tvm.IRModule] = []
    calls = _call_counts(fused)
    for gv, func in fused.functions.items():
        if not isinstance(func, tvm.tirx.PrimFunc) or _is_scheduled(func):
            continue
        if not float_reductions and _has_float_reduction(func):
            continue
        func = func.with_attr("global_symbol", "main")
        fmod = tvm.IRModule({"main": func})
        if any(tvm_ffi.structural_equal(fmod, s) for s in seen) or _has_valid_record(db, fmod):
            continue
        seen.append(fmod)
        todo.append((gv.name_hint, func, max(1, calls.get(gv.name_hint, 1))))
    if not todo:
        logger.info("tuning: every kernel already has a record in %s", work_dir)
        return work_dir
    t0 = time.perf_counter()
    with _measurers(rpc, work_dir, fcompile) as (builder, runner, busy):
        _tune_todo(db, todo, tgt, trials, min_task_trials, seed, work_dir, progress, builder, runner, busy)
    logger.info("tuning took %.1f s", time.perf_counter() - t0)
    return work_dir


def tune_for_build(mod: tvm.IRModule, target: tvm.target.Target, trials: int, db: Path, *, fast_math: bool = False,
                   rpc: tuple[str, str] | None = None, fcompile=None, num_cores: int | None = None
                   ) -> tuple[Path | None, dict]:
    """What a target's build does with ``--tune-trials`` / ``--tune-db``: tune into ``db`` (if ``trials``), then
    (the database folder if it holds records, else None; the facts meta.json records). Float reductions are
    tuned only with ``fast_math`` (re-ordered sums flip float->int borders)."""
    t0 = time.perf_counter()
    before = records(db)
    if trials:
        tune(mod, target, trials, db, fast_math=fast_math, float_reductions=fast_math, rpc=rpc, fcompile=fcompile,
             num_cores=num_cores)
    after = records(db)
    return (db if after else None), {"tune_trials": trials, "tune_db": str(db) if after else None,
                                     "tune_s": round(time.perf_counter() - t0, 3), "tune_new_records": after - before}


@contextlib.contextmanager
def _measurers(rpc: tuple[str, str] | None, work_dir: Path, fcompile=None):
    """(builder, runner, busy-devices text or None) for this tuning run: in-process, or through the tracker."""
    if fcompile is not None and rpc is None:
        raise TargetError("tuning for another architecture measures on its devices: give --rpc and --key")
    if rpc is None:
        yield InProcessBuilder(), InProcessRunner(), None
        return
    address, key = rpc
    runner = remote.rpc_runner(address, key, InProcessRunner().config)
    try:
        with tempfile.TemporaryDirectory(prefix="qc-tune-rpc-", dir=work_dir) as folder:
            yield remote.ExportBuilder(folder, fcompile), runner, lambda: remote.busy_text(address, key)
    finally:
        runner.pool.shutdown()  # the runner's worker processes


def _tune_todo(db, todo: list, tgt, trials: int, min_task_trials: int, seed: int, work_dir: Path, progress: bool,
               builder, runner, busy) -> None:
    base = [_seed_with_rule(db, func, tgt, builder, runner) * n for _, func, n in todo]
    budgets = _allocate(base, trials, min_task_trials)
    chosen = [k for k, b in enumerate(budgets) if b > 0]
    logger.info("tuning %d of %d new kernels (%.0f %% of their measured time), %d trials, into %s", len(chosen),
                len(todo), 100 * sum(base[k] for k in chosen) / max(sum(base), 1e-12), sum(budgets), work_dir)
    from tqdm import tqdm

    rands = ms.utils.fork_seed(seed, n=len(todo))
    with tqdm(total=sum(budgets), desc="tune", unit="trial", disable=not progress, leave=False) as bar:
        for k in chosen:
            name, func, _ = todo[k]
            bar.set_postfix_str(name[:40])
            done = bar.n
            _tune_one(db, name, func, tgt, budgets[k], rands[k], work_dir, bar, builder, runner, busy)
            bar.update(max(0, budgets[k] - (bar.n - done)))  # a small search space ends early


def _has_float_reduction(func: tvm.tirx.PrimFunc) -> bool:
    """Whether a block of ``func`` reduces into a float buffer (when in doubt: yes)."""
    from tvm import s_tir
    from tvm.s_tir import dlight as dl

    def is_float(dtype) -> bool:
        return str(dtype).startswith(("float", "bfloat"))
    try:
        sch = s_tir.Schedule(func)
        infos = dl.normalize_prim_func(sch)
    except Exception:  # noqa: BLE001 - unknown structure: decide by the buffers below
        infos = None
    if infos is None:
        return True  # unknown structure: leave it to the Epilogue rule

    def reduces_float(block) -> bool:
        return (any(int(iv.iter_type) == 2 for iv in block.iter_vars)  # IterVar.CommReduce
                and any(is_float(getattr(w.source, "dtype", "")) for w in block.writes))
    return any(reduces_float(sch.get(info.block_rv)) for info in infos)


def _allocate(costs: list[float], trials: int, min_trials: int) -> list[int]:
    """Trials per kernel in proportion to its cost, most expensive first, each at least ``min_trials``,
    stopping once 95 % of the total cost is covered or the budget is spent."""
    order = sorted(range(len(costs)), key=lambda k: -costs[k])
    total = sum(costs) or 1.0
    budgets = [0] * len(costs)
    covered, left = 0.0, trials
    chosen = []
    for k in order:
        if covered >= 0.95 * total or left < min(min_trials, trials):
            break
        chosen.append(k)
        covered += costs[k]
        left -= min_trials
    floor = min(min_trials, trials)
    share = sum(costs[k] for k in chosen) or 1.0
    spare = max(0, trials - floor * len(chosen))
    for k in chosen:
        budgets[k] = floor + int(spare * costs[k] / share)
    return budgets


def _tune_one(db, name: str, func: tvm.tirx.PrimFunc, tgt: tvm.target.Target, budget: int, rand: int,
              work_dir: Path, bar, builder, runner, busy=None) -> None:
    pop = min(512, max(64, 4 * budget))  # MetaSchedule's 512 costs seconds per iteration on 2 cores
    strategy = ms.search_strategy.EvolutionarySearch(population_size=pop, init_min_unmeasured=min(50, pop // 2))
    ctx = ms.TuneContext(mod=func, target=tgt, space_generator="post-order-apply", search_strategy=strategy,
                         task_name=name, rand_state=rand, num_threads=max(1, int(tgt.attrs["num-cores"])),
                         logger=_task_logger(name)).clone()
    # the default callbacks minus RemoveBuildArtifact (in memory, or files in a folder removed after tuning)
    callbacks = [ms.measure_callback.AddToDatabase(), ms.measure_callback.UpdateCostModel(),
                 _Progress(bar, name[:40], busy)]
    try:
        ms.tune_tasks(tasks=[ctx], task_weights=[1.0], work_dir=str(work_dir), max_trials_global=budget,
                      max_trials_per_task=budget, num_trials_per_iter=min(32, budget), builder=builder,
                      runner=runner, database=db, measure_callbacks=callbacks,
                      task_scheduler="round-robin")
    finally:
        _BUILT.clear()


def _seed_with_rule(db: ms.database.Database, func: tvm.tirx.PrimFunc, target: tvm.target.Target,
                    builder=None, runner=None, attempts: int | None = None) -> float:
    """Measure the :class:`.schedule.Epilogue` schedule of ``func`` (TVM's default lowering where the rule
    declines) and commit it as a tuning record, so the database's best record is never slower (as measured)
    than the untuned build. Returns the measured seconds (0.0 if it could not be measured).

    A failed measurement is tried again ``attempts`` times in all (default: 1 in this process, where a failure is
    the candidate's own; 3 on remote devices, where it may be a device lost mid-measurement: the next try goes
    to a device that is left). Without its seed a kernel has no record and no measured cost, so it would get no
    trials and be tuned again by the next build with the same database."""
    from tvm.s_tir.meta_schedule.arg_info import ArgInfo
    from tvm.s_tir.meta_schedule.builder import BuilderInput

    from qcompile.targets.tvm.schedules.rules import Epilogue

    with target:
        sch = Epilogue(parallel=True).apply(func, target, False)
    if sch is None:
        sch = tvm.s_tir.Schedule(func)
    built = (builder or InProcessBuilder()).build([BuilderInput(sch.mod, target)])[0]
    if built.error_msg:
        logger.debug("seed schedule does not build: %s", built.error_msg)
        return 0.0
    args = ArgInfo.from_prim_func(func)
    runner = runner or InProcessRunner()
    if attempts is None:
        attempts = 1 if isinstance(runner, InProcessRunner) else 3
    for attempt in range(attempts):
        res = runner.run([RunnerInput(built.artifact_path, "cpu", args)])[0].result()
        if not res.error_msg and res.run_secs:
            break
        logger.warning("measuring a kernel's seed schedule failed (try %d of %d): %s", attempt + 1, attempts,
                       (res.error_msg or "no time").strip().splitlines()[-1][:200])
    else:
        return 0.0
    wl = db.commit_workload(tvm.IRModule({"main": func}))
    secs = [float(x) for x in res.run_secs]
    db.commit_tuning_record(ms.database.TuningRecord(sch.trace, wl, secs, target, args))
    return sum(secs) / len(secs)


def _task_logger(name: str) -> logging.Logger:
    """MetaSchedule logs every evolution step at INFO: keep that at DEBUG level of this module only."""
    lg = logging.getLogger(f"{__name__}.ms.{name}")
    if not logger.isEnabledFor(logging.DEBUG):
        lg.setLevel(logging.WARNING)
    return lg


def _call_counts(mod: tvm.IRModule) -> dict[str, int]:
    counts: dict[str, int] = {}

    def visit(e) -> None:
        if isinstance(e, tvm.relax.Call) and len(e.args) and isinstance(e.args[0], tvm.ir.GlobalVar):
            counts[e.args[0].name_hint] = counts.get(e.args[0].name_hint, 0) + 1
    for gv, func in mod.functions.items():
        if isinstance(func, tvm.relax.Function) and gv.name_hint == "main":
            tvm.relax.analysis.post_order_visit(func, visit)
    return counts


def apply_database(work_dir: Path) -> tvm.transform.Pass:
    """Replace every PrimFunc with a record in the JSON database at ``work_dir`` by its best tuned schedule
    (marked ``tirx.is_scheduled``, so later schedule rules leave it alone). Run inside ``with target``."""
    work_dir = Path(work_dir)

    @tvm.transform.module_pass(opt_level=0, name="QcompileApplyTuningDatabase")
    def _apply(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        if not (work_dir / RECORDS).is_file():
            return mod
        with open_database(work_dir):
            return tvm.relax.transform.MetaScheduleApplyDatabase()(mod)
    return _apply


def records(work_dir: Path) -> int:
    """Number of tuning records in the database (0 when there is none)."""
    path = Path(work_dir) / RECORDS
    if not path.is_file():
        return 0
    with open(path, encoding="utf-8") as f:
        return sum(1 for line in f if line.strip())


__all__ = ["InProcessBuilder", "InProcessRunner", "apply_database", "fused_module", "records",
           "tune", "tune_for_build", "tuning_target"]
