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


def host_target() -> dict:
    from qcompile.targets.tvm.vnni import host_mcpu

    return {"kind": "llvm", "mcpu": host_mcpu()}


class TvmX86Target:
    name = "tvm-x86"

    def __init__(self, target: dict | None = None, fast_math: bool = False, schedules: str = "qcompile") -> None:
        """`schedules`: "qcompile" (VNNI kernels + epilogue schedules) or "tvm" (TVM's own CPU pipeline, the
        benchmark's untuned baseline)."""
        if schedules not in ("qcompile", "tvm"):
            raise ConfigError(f"schedules must be 'qcompile' or 'tvm', not {schedules!r}")
        self.target = target or host_target()
        self.fast_math = fast_math
        self.schedules = schedules

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
                ex = tvm.compile(mod, tgt, relax_pipeline=host_pipeline(tgt, fast_math=self.fast_math))
        except Exception as exc:  # noqa: BLE001 - a compiler failure is one clear line
            raise TargetError(f"TVM could not build the model for {self.target}: {type(exc).__name__}: "
                              f"{str(exc).strip().splitlines()[-1][:300] if str(exc).strip() else ''}") from None
        build_s = time.perf_counter() - t0
        sub = Path(out_dir) / SUBDIR
        sub.mkdir(parents=True, exist_ok=True)
        ex.export_library(str(sub / LIB))
        common.write_meta(sub, prog, {"target": self.target, "tvm": tvm.__version__, "vnni": target_has_vnni(tgt),
                                      "fast_math": self.fast_math, "schedules": self.schedules,
                                      "import_s": round(prog.import_s, 3), "build_s": round(build_s, 3)})
        files.update({"tvm_lib": f"{SUBDIR}/{LIB}", "tvm_meta": f"{SUBDIR}/{common.META_FILE}"})
        return files

    def runner(self, out_dir: Path) -> common.VmRunner:
        sub = Path(out_dir) / SUBDIR
        meta = common.read_meta(sub)
        if not (sub / LIB).is_file():
            raise TargetError(f"{sub / LIB} not found: compile with --target {self.name} first")
        return common.VmRunner(sub / LIB, meta)

    def run(self, out_dir: Path, samples: Sequence[dict[str, np.ndarray]], threads: int = 1
            ) -> list[dict[str, np.ndarray]]:
        return common.run_all(self.runner(out_dir), samples)
