"""What every target on the static C executor does the same way: build ``main`` and ``probe`` (the entries of
:func:`~...frontend.program.entries`) into ``sub/main`` and ``sub/probe``, and run a runner process over a batch."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from qcompile.targets.base import BatchRunner
from qcompile.targets.tvm.executors.static_c.codegen import BuiltKernels
from qcompile.targets.tvm.executors.static_c.emit_c import emit
from qcompile.targets.tvm.executors.static_c.lower import lower_static
from qcompile.targets.tvm.executors.static_c.run import run_static
from qcompile.targets.tvm.frontend.program import Program, entries


def build_entries(prog: Program, sub: Path, target: dict, *, cc: list[str], entry: str, schedule: list,
                  mod=None, fast_math: bool = False, threads: int = 1) -> dict[str, dict]:
    """``main`` and ``probe`` of ``mod`` (default ``prog.mod``) lowered with ``schedule`` and emitted (linked with
    ``cc`` as ``entry``) into ``sub/main`` and ``sub/probe``; :func:`~.emit_c.emit`'s facts per build. The first
    build's kernels are reused by the next (LLVM compiles each distinct kernel once: a ViT's probe had 2 kernels of
    its 32 that main lacks)."""
    facts: dict[str, dict] = {}
    built: BuiltKernels | None = None
    for which, m, names in entries(prog, mod):
        program = lower_static(m, target, output_names=names, schedule=schedule, fast_math=fast_math)
        kernels = program.tir_mod
        facts[which] = emit(program, Path(sub) / which, target, cc=cc, entry=entry, threads=threads, reuse=built)
        if built is None:
            built = BuiltKernels(kernels, Path(sub) / which / "kernels.o", facts[which])
    return facts


def memory_facts(facts: dict) -> dict:
    """The arena and constant sizes of a build, as meta.json records them."""
    return {k: facts[k] for k in ("arena_bytes", "arena_lower_bound", "const_bytes")}


class ProcessRunner(BatchRunner):
    """A runner process per batch (``sub/<main|probe>/runner``; under QEMU user mode for another architecture)."""

    def __init__(self, sub: Path, meta: dict) -> None:
        super().__init__(meta)
        self.sub = Path(sub)

    def _run(self, samples: list[dict[str, np.ndarray]], which: str) -> list[dict[str, np.ndarray]]:
        # a fixed start-up allowance plus a per-sample one: a decoder's batch under POCL or QEMU takes minutes
        return run_static(self.sub / which, samples, timeout=300.0 + 20.0 * len(samples))
