"""tvm-aarch64: the integer Relax module cross-compiled for AArch64 Linux (NEON + dotprod), no TVM runtime.

TVM's LLVM back end writes the kernels as an AArch64 object; ``static_c`` adds the generated call sequence with one
planned arena and a batch runner, linked statically by Debian's ``aarch64-linux-gnu-gcc``. ``run`` executes it
under ``qemu-aarch64`` (or natively on an AArch64 host). Two builds: ``tvm-aarch64/main`` (the model) and
``tvm-aarch64/probe`` (the same graph also returning every integer tensor, for the report's LSB comparison).
"""
from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Sequence

import numpy as np
import onnx

from qcompile.errors import TargetError
from qcompile.targets.onnxruntime import OnnxRuntimeTarget
from qcompile.targets.tvm import common, static_c

logger = logging.getLogger(__name__)

SUBDIR = "tvm-aarch64"
TARGET = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon", "+dotprod"]}
CC = ["aarch64-linux-gnu-gcc", "-O2", "-static"]
TOOLS = {"aarch64-linux-gnu-gcc": "gcc-aarch64-linux-gnu", "qemu-aarch64": "qemu-user"}


def require_tools() -> None:
    """One clear error naming the Debian packages when the cross compiler or QEMU is missing."""
    missing = [pkg for tool, pkg in TOOLS.items() if shutil.which(tool) is None]
    if missing:
        raise TargetError(f"target tvm-aarch64 needs the AArch64 cross compiler and QEMU: "
                          f"apt-get install -y {' '.join(missing)} (or run tools/setup)")


class _StaticRunner:
    def __init__(self, sub: Path, meta: dict) -> None:
        self.sub, self.meta = sub, meta

    def __call__(self, sample: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.run([sample])[0]

    def run(self, samples: Sequence[dict[str, np.ndarray]], which: str = "main") -> list[dict[str, np.ndarray]]:
        for s in samples:
            common.check_inputs(self.meta, s)
        return static_c.run_static(self.sub / which, list(samples))

    def probe(self, sample: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.run([sample], "probe")[0]


class TvmAarch64Target:
    name = "tvm-aarch64"
    target = TARGET

    def pipeline(self, spec: dict | None = None) -> list[str]:
        return []

    def build(self, model: onnx.ModelProto, out_dir: Path, example: dict[str, np.ndarray] | None = None
              ) -> dict[str, str]:
        import tvm

        require_tools()
        files = OnnxRuntimeTarget().build(model, out_dir)
        prog = common.lower_to_relax(model, example)
        sub = Path(out_dir) / SUBDIR
        facts = {}
        for which, names in (("main", prog.outputs), ("probe", prog.outputs + prog.probe)):
            program = static_c.lower_static(common.entry_module(prog.mod, which), self.target,
                                            output_names=names)
            facts[which] = static_c.emit(program, sub / which, self.target, cc=CC, entry="runner")
        main = facts["main"]
        common.write_meta(sub, prog, {"target": self.target, "tvm": tvm.__version__,
                                      "arena_bytes": main["arena_bytes"],
                                      "arena_lower_bound": main["arena_lower_bound"],
                                      "const_bytes": main["const_bytes"]})
        files.update({"tvm_runner": f"{SUBDIR}/main/runner", "tvm_meta": f"{SUBDIR}/{common.META_FILE}"})
        return files

    def runner(self, out_dir: Path) -> _StaticRunner:
        require_tools()
        sub = Path(out_dir) / SUBDIR
        return _StaticRunner(sub, common.read_meta(sub))

    def run(self, out_dir: Path, samples: Sequence[dict[str, np.ndarray]], threads: int = 1
            ) -> list[dict[str, np.ndarray]]:
        return self.runner(out_dir).run(samples)
