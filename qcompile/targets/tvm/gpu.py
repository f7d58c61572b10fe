"""What the GPU targets (:mod:`.opencl`, :mod:`.cuda`) share: TVM's dlight GPU schedules on the common front end,
``main`` and ``probe`` each lowered to the static program and handed to the target's host-program emitter, a
runner process per batch."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import onnx

from qcompile.targets.base import CompiledTarget, require_tools
from qcompile.targets.tvm.executors import static_c
from qcompile.targets.tvm.frontend import program as frontend
from qcompile.targets.tvm.pipeline import gpu_phases


class GpuTarget(CompiledTarget):
    """Subclasses set ``name``, ``subdir``, ``target``, ``tools`` and ``emit(program, folder, target) -> facts``;
    ``meta_facts(main_facts)`` adds what meta.json records beside the kernel and launch counts."""

    subdir: str
    tools: tuple[str, ...]
    emit: Callable[..., dict]

    def pipeline(self, spec: dict | None = None) -> list:
        return gpu_phases()

    def meta_facts(self, main: dict) -> dict:
        return {}

    def build(self, model: onnx.ModelProto, out_dir: Path, example: dict[str, np.ndarray] | None = None
              ) -> dict[str, str]:
        import tvm

        require_tools(self.tools, self.name)
        prog = frontend.lower_to_relax(model, example)
        sub = Path(out_dir) / self.subdir
        facts = {which: self.emit(static_c.lower_static(m, self.target, output_names=names,
                                                              schedule=self.pipeline()), sub / which, self.target)
                 for which, m, names in frontend.entries(prog)}
        main = facts["main"]
        frontend.write_meta(sub, prog, {"target": self.target, "tvm": tvm.__version__,
                                        "kernels": len(main["kernels"]), "launches": main["launches"],
                                        **self.meta_facts(main), **static_c.memory_facts(main)})
        return {"tvm_runner": f"{self.subdir}/main/runner", "tvm_meta": f"{self.subdir}/{frontend.META_FILE}"}

    def runner(self, out_dir: Path) -> static_c.ProcessRunner:
        sub = Path(out_dir) / self.subdir
        return static_c.ProcessRunner(sub, frontend.read_meta(sub))
