"""tvm-aarch64: the integer Relax module cross-compiled for AArch64 Linux (NEON + dotprod), no TVM runtime.

TVM's LLVM back end writes the kernels as an AArch64 object; ``static_c`` adds the generated call sequence with one
planned arena and a batch runner, linked statically by Debian's ``aarch64-linux-gnu-gcc``. ``run`` executes it
under ``qemu-aarch64`` (or natively on an AArch64 host). Two builds: ``tvm-aarch64/main`` (the model) and
``tvm-aarch64/probe`` (the same graph also returning every integer tensor, for the report's LSB comparison).
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx

from qcompile.targets.base import CompiledTarget, require_tools
from qcompile.targets.tvm.executors import static_c
from qcompile.targets.tvm.frontend import program as frontend
from qcompile.targets.tvm.pipeline import generic_phases

logger = logging.getLogger(__name__)

SUBDIR = "tvm-aarch64"
TARGET = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon", "+dotprod"]}
CC = ["aarch64-linux-gnu-gcc", "-O2", "-static"]
TOOLS = ("aarch64-linux-gnu-gcc", "qemu-aarch64")


class TvmAarch64Target(CompiledTarget):
    name = "tvm-aarch64"
    target = TARGET

    def pipeline(self, spec: dict | None = None) -> list:
        return generic_phases()

    def build(self, model: onnx.ModelProto, out_dir: Path, example: dict[str, np.ndarray] | None = None
              ) -> dict[str, str]:
        import tvm

        require_tools(TOOLS, self.name)
        prog = frontend.lower_to_relax(model, example)
        sub = Path(out_dir) / SUBDIR
        facts = static_c.build_entries(prog, sub, self.target, cc=CC, entry="runner", schedule=self.pipeline())
        frontend.write_meta(sub, prog, {"target": self.target, "tvm": tvm.__version__,
                                        **static_c.memory_facts(facts["main"])})
        return {"tvm_runner": f"{SUBDIR}/main/runner", "tvm_meta": f"{SUBDIR}/{frontend.META_FILE}"}

    def runner(self, out_dir: Path) -> static_c.ProcessRunner:
        require_tools(TOOLS, self.name)
        sub = Path(out_dir) / SUBDIR
        return static_c.ProcessRunner(sub, frontend.read_meta(sub))
