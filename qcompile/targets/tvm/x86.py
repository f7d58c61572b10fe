"""tvm-x86: the integer Relax module compiled by TVM's LLVM back end for the host CPU (``mcpu`` detected).

Two executors for the same kernels (VNNI int8 kernels, epilogue schedules or a tuning database):

- ``static`` (default): :mod:`.executors.static_c` turns the model into one C function over one planned arena, linked
  with TVM's kernels into ``tvm-x86/main/model.so`` (and ``tvm-x86/probe/model.so``, every integer tensor as an
  output); ``run`` loads it with ctypes. No TVM runtime is needed to run it, and a call costs the kernels only.
  Why it is the default: on small models the Relax VM's per-inference work (~40 ``alloc_storage`` /
  ``alloc_tensor`` calls and ~80 instruction dispatches, 0.1-0.15 ms) cost more than the kernels
  (MobileNetV2-digits: 0.23 ms through the VM vs 0.07 ms for ONNX Runtime). ``threads`` N > 1: the kernels'
  outer loops are parallel and run on a pthread pool in the generated runtime (``qc_runtime.c``); N = 1 (default):
  serial kernels.
- ``vm``: a Relax VM executable ``tvm-x86/lib.so`` (``main`` and ``probe``), parallel loops on TVM's thread pool
  (``TVM_NUM_THREADS``); needs the TVM runtime to run.

``tvm-x86/meta.json`` holds the input shapes/dtypes it was built for, output names, target, fallbacks.
``model.qdq.onnx`` is written beside it, so the ONNX Runtime model and the integer reference are always available
for comparison.
"""
from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

import numpy as np
import onnx

from qcompile.errors import ConfigError, TargetError
from qcompile.targets.base import BatchRunner, CompiledTarget, require_tools
from qcompile.targets.tvm.executors import static_c
from qcompile.targets.tvm.executors.vm import VmRunner
from qcompile.targets.tvm.frontend import program as frontend

logger = logging.getLogger(__name__)

SUBDIR = "tvm-x86"
LIB = "lib.so"
TUNING = "tuning"
EXECUTORS = ("static", "vm")
X86_OPT_LEVEL = 3
HOST_CC = ["gcc", "-O2", "-shared", "-fPIC", "-Wl,-Bsymbolic", "-pthread", "-DQC_THREADS"]
MAX_THREADS = 64  # qc_runtime.c's pool


def host_target() -> dict:
    from qcompile.targets.tvm.kernels.x86_vnni import host_mcpu

    return {"kind": "llvm", "mcpu": host_mcpu()}


class TvmX86Target(CompiledTarget):
    name = "tvm-x86"

    def __init__(self, target: dict | None = None, fast_math: bool = False, schedules: str = "qcompile",
                 tune_trials: int = 0, tune_db: Path | str | None = None, executor: str | None = None,
                 threads: int = 1, rpc: str | None = None, key: str | None = None) -> None:
        """`schedules`: "qcompile" (VNNI kernels + epilogue schedules) or "tvm" (TVM's own CPU pipeline, the
        benchmark's untuned baseline). `tune_trials` > 0: MetaSchedule-tune the fused kernels
        (:mod:`.schedules.tune`) into `tune_db` (default ``OUT/tvm-x86/tuning/``; a given folder is reused and
        updated); a database that exists is applied even with `tune_trials` = 0. `executor`: "static" (one C call
        over a planned arena) or "vm" (the Relax VM; the only executor for schedules="tvm"); default: static, and
        the VM where the static executor cannot run the model (a value-dependent shape such as NonZero's, a
        runtime library call), with the reason
        in meta.json ("executor_note"). `threads` (static executor): the kernels get parallel outer loops, run on a
        pthread pool of that many threads in the generated runtime (1: serial kernels, no pool). `rpc` (tracker
        ``HOST:PORT``) and `key`: tuning candidates are measured on the devices with that key behind the tracker
        (:mod:`.schedules.remote`); the build itself stays here."""
        if isinstance(threads, bool) or not isinstance(threads, int) or not 1 <= threads <= MAX_THREADS:
            raise ConfigError(f"threads must be an integer in 1..{MAX_THREADS}, not {threads!r}")
        if threads > 1 and executor == "vm":
            raise ConfigError("threads is an option of the static executor; the Relax VM takes TVM_NUM_THREADS")
        if executor is not None and executor not in EXECUTORS:
            raise ConfigError(f"executor must be one of {', '.join(EXECUTORS)}, not {executor!r}")
        if schedules not in ("qcompile", "tvm"):
            raise ConfigError(f"schedules must be 'qcompile' or 'tvm', not {schedules!r}")
        if tune_trials and schedules != "qcompile":
            raise ConfigError("tuning needs schedules='qcompile'")
        from qcompile.targets.tvm.rpc import tuning_options

        self.tune_trials, self.rpc = tuning_options(tune_trials, rpc, key)
        self.tune_db = Path(tune_db) if tune_db is not None else None
        self.target = target or host_target()
        self.fast_math = fast_math
        self.schedules = schedules
        self.executor = "vm" if schedules == "tvm" else executor  # None: static, else the VM
        self._tune_meta: dict = {}
        self.threads = threads

    def pipeline(self, spec: dict | None = None) -> list:
        """The schedule phase after fusion (:func:`~.pipeline.x86_phases`); ``spec``: ``{"database": folder}``."""
        from qcompile.targets.tvm.pipeline import x86_phases

        return x86_phases(self.threads > 1, (spec or {}).get("database"))

    def build(self, model: onnx.ModelProto, out_dir: Path, example: dict[str, np.ndarray] | None = None
              ) -> dict[str, str]:
        import tvm
        from tvm import relax

        files: dict[str, str] = {}
        from qcompile.targets.tvm.kernels.let_buffers import tir_pipeline
        from qcompile.targets.tvm.kernels.x86_vnni import target_has_vnni, vnni_transform
        from qcompile.targets.tvm.pipeline import host_pipeline

        prog = frontend.lower_to_relax(model, example)
        t0 = time.perf_counter()
        tgt = tvm.target.Target(self.target)
        sub = Path(out_dir) / SUBDIR
        extra: dict = {}
        executor = self.executor or "static"
        try:
            if executor == "static":
                try:
                    extra = self._build_static(prog, tgt, sub)
                except TargetError as exc:
                    if self.executor == "static" or not str(exc).startswith("static C:"):
                        raise
                    logger.warning("tvm-x86: the static executor cannot run this model (%s); building for the "
                                   "Relax VM", exc)
                    for which in ("main", "probe"):
                        shutil.rmtree(sub / which, ignore_errors=True)
                    executor, extra = "vm", {"executor_note": str(exc)[:500]}
            if self.schedules == "tvm":
                ex = tvm.compile(prog.mod, tgt, relax_pipeline=relax.get_default_pipeline(tgt),
                                 tir_pipeline=tir_pipeline(tgt))
            elif executor == "vm":
                mod = vnni_transform(prog.mod, tgt)  # u8 x s8 conv2d / matmul -> VNNI kernels, weights pre-packed
                db = self._tune(mod, tgt, sub / TUNING)
                ex = tvm.compile(mod, tgt, relax_pipeline=host_pipeline(tgt, fast_math=self.fast_math,
                                                                        database_dir=db),
                                 tir_pipeline=tir_pipeline(tgt))
        except TargetError:
            raise
        except Exception as exc:  # noqa: BLE001 - a compiler failure is one clear line
            raise TargetError(f"TVM could not build the model for {self.target}: {type(exc).__name__}: "
                              f"{str(exc).strip().splitlines()[-1][:300] if str(exc).strip() else ''}") from None
        build_s = time.perf_counter() - t0 - self._tune_meta.get("tune_s", 0.0)
        sub.mkdir(parents=True, exist_ok=True)
        if executor == "vm":
            ex.export_library(str(sub / LIB))
            files["tvm_lib"] = f"{SUBDIR}/{LIB}"
        else:
            files["tvm_lib"] = f"{SUBDIR}/main/{static_c.ENTRIES['shared'][1]}"
        frontend.write_meta(sub, prog, {"target": self.target, "tvm": tvm.__version__, "vnni": target_has_vnni(tgt),
                                      "fast_math": self.fast_math, "schedules": self.schedules,
                                      "executor": executor, "threads": self.threads if executor == "static" else None,
                                      "import_s": round(prog.import_s, 3),
                                      "build_s": round(build_s, 3), **extra, **self._tune_meta})
        files["tvm_meta"] = f"{SUBDIR}/{frontend.META_FILE}"
        return files

    def _build_static(self, prog: frontend.Program, tgt, sub: Path) -> dict:
        """``main`` and ``probe`` each through the static C executor into a host shared library."""
        from qcompile.targets.tvm.kernels.x86_vnni import vnni_transform

        require_tools([HOST_CC[0]], self.name)
        stats: dict = {}
        parallel = self.threads > 1
        vmod = vnni_transform(prog.mod, tgt, parallel=parallel, stats=stats)  # main + probe share kernels, tuning
        db = self._tune(vmod, tgt, sub / TUNING)
        target = dict(tgt.export()) if not isinstance(self.target, dict) else self.target
        # LLVM -O3 as TVM's own x86 build uses (static_c defaults to 2 for cross builds, see KERNEL_OPT_LEVEL):
        # MobileNetV2-digits 0.159 -> 0.135 ms before the pad-interior schedule
        target = {**target, "opt-level": target.get("opt-level", X86_OPT_LEVEL)}
        facts = static_c.build_entries(prog, sub, target, cc=HOST_CC, entry="shared",
                                       schedule=self.pipeline({"database": db}), mod=vmod, fast_math=self.fast_math,
                                       threads=self.threads)
        main = facts["main"]
        return {**static_c.memory_facts(main), "workspace_bytes": main["workspace_bytes"],
                "vnni_kernels": stats["rewritten"], "generic_int8_kernels": stats["declined"]}

    def _tune(self, mod, tgt, default_db: Path) -> Path | None:
        """Tune into the database folder (if trials were asked for); return it if it holds records."""
        from qcompile.targets.tvm.schedules import tune

        db, self._tune_meta = tune.tune_for_build(mod, tgt, self.tune_trials, self.tune_db or default_db,
                                                  fast_math=self.fast_math, rpc=self.rpc)
        return db

    def runner(self, out_dir: Path, rpc: str | None = None, key: str | None = None) -> BatchRunner:
        """In this process, or (``rpc`` = tracker ``HOST:PORT``, ``key``) on a device behind a TVM RPC tracker."""
        sub = Path(out_dir) / SUBDIR
        meta = frontend.read_meta(sub)
        if rpc is not None:
            from qcompile.targets.tvm.rpc import RemoteStaticRunner

            return RemoteStaticRunner(sub, meta, rpc, key or "", HOST_CC)
        if meta.get("executor", "vm") == "static":
            return StaticRunner(sub, meta)
        if not (sub / LIB).is_file():
            raise TargetError(f"{sub / LIB} not found: compile with --target {self.name} first")
        return VmRunner(sub / LIB, meta)


class StaticRunner(BatchRunner):
    """Runs the static executor's ``main`` / ``probe`` shared libraries in this process, one call per sample."""

    def __init__(self, sub: Path, meta: dict) -> None:
        super().__init__(meta)
        self.sub = Path(sub)
        self._models: dict[str, static_c.SharedModel] = {}

    def _model(self, which: str) -> static_c.SharedModel:
        if which not in self._models:
            self._models[which] = static_c.SharedModel(self.sub / which, threads=int(self.meta.get("threads") or 1))
        return self._models[which]

    def _run(self, samples: list[dict[str, np.ndarray]], which: str) -> list[dict[str, np.ndarray]]:
        model = self._model(which)
        return [model(s) for s in samples]
