"""The Relax VM executor (x86 host builds): TVM's runtime runs the compiled executable, one call per sample."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from qcompile.targets.base import BatchRunner, check_inputs


class VmRunner(BatchRunner):
    """Runs a Relax VM library on per-sample feeds (``main``, or ``probe``: every integer tensor too)."""

    def __init__(self, lib_path: Path, meta: dict) -> None:
        import tvm
        from tvm import relax

        super().__init__(meta)
        self._tvm = tvm
        self.vm = relax.VirtualMachine(tvm.runtime.load_module(str(lib_path)), tvm.cpu())

    def _one(self, sample: dict[str, np.ndarray], which: str) -> dict[str, np.ndarray]:
        args = [self._tvm.runtime.tensor(v) for v in check_inputs(self.meta, sample)]
        res = self.vm[which](*args)
        vals = [res.numpy()] if hasattr(res, "numpy") else [r.numpy() for r in res]
        names = self.meta["outputs"] + (self.meta["probe"] if which == "probe" else [])
        return dict(zip(names, vals))

    def _run(self, samples: list[dict[str, np.ndarray]], which: str) -> list[dict[str, np.ndarray]]:
        return [self._one(s, which) for s in samples]
