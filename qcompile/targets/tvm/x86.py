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

from qcompile.errors import TargetError
from qcompile.targets.onnxruntime import OnnxRuntimeTarget
from qcompile.targets.tvm import common

logger = logging.getLogger(__name__)

SUBDIR = "tvm-x86"
LIB = "lib.so"


def host_target() -> dict:
    from tvm.target.codegen import llvm_get_system_cpu

    return {"kind": "llvm", "mcpu": str(llvm_get_system_cpu()), "num-cores": 1}


class TvmX86Target:
    name = "tvm-x86"

    def __init__(self, target: dict | None = None) -> None:
        self.target = target or host_target()

    def pipeline(self, spec: dict | None = None) -> list[str]:
        return []

    def build(self, model: onnx.ModelProto, out_dir: Path, example: dict[str, np.ndarray] | None = None
              ) -> dict[str, str]:
        import tvm

        files = OnnxRuntimeTarget().build(model, out_dir)
        prog = common.lower_to_relax(model, example)
        t0 = time.perf_counter()
        try:
            ex = tvm.compile(prog.mod, tvm.target.Target(self.target))
        except Exception as exc:  # noqa: BLE001 - a compiler failure is one clear line
            raise TargetError(f"TVM could not build the model for {self.target}: {type(exc).__name__}: "
                              f"{str(exc).strip().splitlines()[-1][:300] if str(exc).strip() else ''}") from None
        build_s = time.perf_counter() - t0
        sub = Path(out_dir) / SUBDIR
        sub.mkdir(parents=True, exist_ok=True)
        ex.export_library(str(sub / LIB))
        common.write_meta(sub, prog, {"target": self.target, "tvm": tvm.__version__,
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
