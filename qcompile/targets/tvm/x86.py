"""tvm-x86: the integer Relax module compiled by TVM's LLVM back end for the host CPU (``mcpu`` detected).

Output: ``tvm-x86/lib.so`` (a Relax VM executable: ``main`` and ``probe``) and ``tvm-x86/meta.json``
(input shapes/dtypes it was built for, output names, target, fallbacks). ``model.qdq.onnx`` is written beside it,
so the ONNX Runtime model and the integer reference are always available for comparison.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import onnx

from qcompile.errors import ConfigError, TargetError
from qcompile.targets.onnxruntime import OnnxRuntimeTarget
from qcompile.targets.tvm import common

logger = logging.getLogger(__name__)

SUBDIR = "tvm-x86"
LIB = "lib.so"
TUNING = "tuning"


def host_target() -> dict:
    from qcompile.targets.tvm.vnni import host_mcpu

    return {"kind": "llvm", "mcpu": host_mcpu()}


class TvmX86Target:
    name = "tvm-x86"

    def __init__(self, target: dict | None = None, fast_math: bool = False, schedules: str = "qcompile",
                 tune_trials: int = 0, tune_db: Path | str | None = None) -> None:
        """`schedules`: "qcompile" (VNNI kernels + epilogue schedules) or "tvm" (TVM's own CPU pipeline, the
        benchmark's untuned baseline). `tune_trials` > 0: MetaSchedule-tune the fused kernels (:mod:`.tune`) into
        `tune_db` (default ``OUT/tvm-x86/tuning/``; a given folder is reused and updated); a database that exists
        is applied even with `tune_trials` = 0."""
        if schedules not in ("qcompile", "tvm"):
            raise ConfigError(f"schedules must be 'qcompile' or 'tvm', not {schedules!r}")
        if int(tune_trials) < 0:
            raise ConfigError(f"tune_trials must be >= 0, not {tune_trials}")
        if tune_trials and schedules != "qcompile":
            raise ConfigError("tuning needs schedules='qcompile'")
        self.tune_trials = int(tune_trials)
        self.tune_db = Path(tune_db) if tune_db is not None else None
        self.target = target or host_target()
        self.fast_math = fast_math
        self.schedules = schedules
        self._tune_meta: dict = {}

    def pipeline(self, spec: dict | None = None) -> list[str]:
        return []

    def build(self, model: onnx.ModelProto, out_dir: Path, example: dict[str, np.ndarray] | None = None
              ) -> dict[str, str]:
        import tvm
        from tvm import relax

        files = OnnxRuntimeTarget().build(model, out_dir)
        from qcompile.targets.tvm.schedule import host_pipeline
        from qcompile.targets.tvm.vnni import target_has_vnni, vnni_transform

        prog = common.lower_to_relax(model, example)
        t0 = time.perf_counter()
        tgt = tvm.target.Target(self.target)
        try:
            if self.schedules == "tvm":
                ex = tvm.compile(prog.mod, tgt, relax_pipeline=relax.get_default_pipeline(tgt))
            else:
                mod = vnni_transform(prog.mod, tgt)  # u8 x s8 conv2d / matmul -> VNNI kernels, weights pre-packed
                db = self._tune(mod, tgt, Path(out_dir) / SUBDIR / TUNING)
                ex = tvm.compile(mod, tgt, relax_pipeline=host_pipeline(tgt, fast_math=self.fast_math,
                                                                        database_dir=db))
        except Exception as exc:  # noqa: BLE001 - a compiler failure is one clear line
            raise TargetError(f"TVM could not build the model for {self.target}: {type(exc).__name__}: "
                              f"{str(exc).strip().splitlines()[-1][:300] if str(exc).strip() else ''}") from None
        build_s = time.perf_counter() - t0 - self._tune_meta.get("tune_s", 0.0)
        sub = Path(out_dir) / SUBDIR
        sub.mkdir(parents=True, exist_ok=True)
        ex.export_library(str(sub / LIB))
        common.write_meta(sub, prog, {"target": self.target, "tvm": tvm.__version__, "vnni": target_has_vnni(tgt),
                                      "fast_math": self.fast_math, "schedules": self.schedules,
                                      "import_s": round(prog.import_s, 3), "build_s": round(build_s, 3),
                                      **self._tune_meta})
        files.update({"tvm_lib": f"{SUBDIR}/{LIB}", "tvm_meta": f"{SUBDIR}/{common.META_FILE}"})
        return files

    def _tune(self, mod, tgt, default_db: Path) -> Path | None:
        """Tune into the database folder (if trials were asked for); return it if it holds records."""
        from qcompile.targets.tvm import tune

        db = self.tune_db or default_db
        t0 = time.perf_counter()
        before = tune.records(db)
        if self.tune_trials:
            # float reductions re-ordered by tuning flip float->int borders: only where fast_math allows as much
            tune.tune(mod, tgt, self.tune_trials, db, fast_math=self.fast_math, float_reductions=self.fast_math)
        after = tune.records(db)
        self._tune_meta = {"tune_trials": self.tune_trials, "tune_db": str(db) if after else None,
                           "tune_s": round(time.perf_counter() - t0, 3), "tune_new_records": after - before}
        return db if after else None

    def runner(self, out_dir: Path) -> common.VmRunner:
        sub = Path(out_dir) / SUBDIR
        meta = common.read_meta(sub)
        if not (sub / LIB).is_file():
            raise TargetError(f"{sub / LIB} not found: compile with --target {self.name} first")
        return common.VmRunner(sub / LIB, meta)

    def run(self, out_dir: Path, samples: Sequence[dict[str, np.ndarray]], threads: int = 1
            ) -> list[dict[str, np.ndarray]]:
        return common.run_all(self.runner(out_dir), samples)
