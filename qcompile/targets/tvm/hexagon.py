"""tvm-hexagon: the integer Relax module for the Hexagon DSP (v66, HVX 128-byte vectors), run under qemu-hexagon.

TVM's LLVM back end writes the kernels (int8 conv2d / matmul on ``vrmpy``: :mod:`.kernels.hexagon_hvx`; the rest
through LLVM's HVX vectorizer); the static C executor adds the call sequence over one planned arena and a batch
runner (``hexagon_main.c``), linked freestanding by Debian's clang/lld: no libc, its own start-up code, syscalls
through ``trap0`` and the few string / division helpers LLVM calls (``runtime/hexagon/hexrt.c``). ``run`` executes a
whole batch in one ``qemu-hexagon`` start (QEMU 7.2 runs v66/v67 ELFs with HVX; v68 is refused). Two builds:
``tvm-hexagon/main`` and ``tvm-hexagon/probe`` (every integer tensor too, for the report's LSB comparison).

``hvx=False`` builds the same model without HVX (scalar Hexagon code, the same kernels otherwise): the baseline
of :func:`packets_per_inference`, which counts executed packets (Hexagon's VLIW bundles) with a small QEMU TCG plugin
(``runtime/hexagon/hexcount.c``, built here with the host C compiler: Debian ships qemu-hexagon with plugin
support but no plugins).
"""
from __future__ import annotations

import logging
import re
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np
import onnx

from qcompile.errors import TargetError
from qcompile.targets.base import CompiledTarget, require_tools, run_tool
from qcompile.targets.tvm.executors import static_c
from qcompile.targets.tvm.frontend import program as frontend

logger = logging.getLogger(__name__)

SUBDIR = "tvm-hexagon"
TRIPLE = "hexagon-unknown-linux-musl"
TARGET = {"kind": "llvm", "mtriple": TRIPLE, "mcpu": "hexagonv66", "mattr": ["+hvxv66", "+hvx-length128b"]}
SCALAR_TARGET = {"kind": "llvm", "mtriple": TRIPLE, "mcpu": "hexagonv66", "mattr": ["-hvx"]}
CC = ["clang", f"--target={TRIPLE}", "-mv66", "-O2", "-ffreestanding", "-nostdlib", "-fno-builtin", "-static",
      "-fuse-ld=lld", "-Wl,-e,_start"]
HVX_FLAGS = ["-mhvx", "-mhvx-length=128b"]
TOOLS = ("clang", "ld.lld", "qemu-hexagon")
PLUGIN_SRC = static_c.RUNTIME_DIR / "hexagon" / "hexcount.c"
_COUNT = re.compile(r"hexcount: packets (\d+) words (\d+)")


class TvmHexagonTarget(CompiledTarget):
    """``tvm-hexagon``; ``hvx`` (default on): the int8 kernels on ``vrmpy`` and LLVM's HVX vectorizer; off: the
    same model as scalar Hexagon code (the instruction-count baseline)."""

    name = "tvm-hexagon"

    def __init__(self, hvx: bool = True) -> None:
        self.hvx = bool(hvx)
        self.target = TARGET if self.hvx else SCALAR_TARGET

    def pipeline(self, spec: dict | None = None) -> list:
        from qcompile.targets.tvm.pipeline import hexagon_phases

        return hexagon_phases()

    def build(self, model: onnx.ModelProto, out_dir: Path, example: dict[str, np.ndarray] | None = None
              ) -> dict[str, str]:
        import tvm

        from qcompile.targets.tvm.kernels.hexagon_hvx import hvx_transform

        require_tools(TOOLS, self.name)
        prog = frontend.lower_to_relax(model, example)
        stats: dict = {"rewritten": 0, "declined": []}
        mod = hvx_transform(prog.mod, tvm.target.Target(self.target), stats) if self.hvx else prog.mod
        sub = Path(out_dir) / SUBDIR
        cc = CC + (HVX_FLAGS if self.hvx else [])
        facts = static_c.build_entries(prog, sub, self.target, cc=cc, entry="hexagon", schedule=self.pipeline(),
                                       mod=mod)
        frontend.write_meta(sub, prog, {"target": self.target, "tvm": tvm.__version__, "hvx": self.hvx,
                                        "vrmpy_kernels": stats["rewritten"],
                                        "generic_int8_kernels": stats["declined"],
                                        **static_c.memory_facts(facts["main"])})
        return {"tvm_runner": f"{SUBDIR}/main/runner", "tvm_meta": f"{SUBDIR}/{frontend.META_FILE}"}

    def runner(self, out_dir: Path) -> static_c.ProcessRunner:
        require_tools(TOOLS, self.name)
        sub = Path(out_dir) / SUBDIR
        return static_c.ProcessRunner(sub, frontend.read_meta(sub))


def _plugin(folder: Path) -> Path:
    """The packet-counting TCG plugin, built with the host C compiler into ``folder``."""
    lib = folder / "libhexcount.so"
    run_tool(["gcc", "-O2", "-shared", "-fPIC", PLUGIN_SRC, "-o", lib], "tvm-hexagon: count plugin", text=True)
    return lib


def packets(build: Path, samples: Sequence[dict[str, np.ndarray]]) -> int:
    """Hexagon packets executed by one qemu-hexagon run of ``build`` (a ``main`` or ``probe`` folder) over
    ``samples``."""
    with tempfile.TemporaryDirectory(prefix="qc-hexcount-") as tmp:
        out = Path(tmp) / "count.txt"
        static_c.run_static(build, list(samples), emulator_args=["-plugin", f"{_plugin(Path(tmp))},outfile={out}"])
        match = _COUNT.search(out.read_text() if out.is_file() else "")
    if match is None:
        raise TargetError(f"tvm-hexagon: the count plugin wrote no count for {build}")
    return int(match.group(1))


def packets_per_inference(out_dir: Path, sample: dict[str, np.ndarray]) -> int:
    """Packets one inference takes: a run over two copies of ``sample`` minus a run over one (start-up, I/O and
    exit cancel out)."""
    build = Path(out_dir) / SUBDIR / "main"
    return packets(build, [sample, sample]) - packets(build, [sample])
