"""What every target shares: the Target and Runner protocols, the QDQ model every build folder holds, the external
tools a build or a run starts (one clear error naming the Debian package when one is missing) and the runner base.

A target turns the quantized QDQ model into something that runs: ``pipeline(spec)`` (its phases, TVM-style),
``build(model, out_dir, example)`` (files written under ``out_dir``, keyed by role) and ``runner(out_dir)`` (a
:class:`Runner` over that build). The driver writes ``model.qdq.onnx`` once for every target (:func:`write_model`)
before calling ``build``, so each build folder can always be compared with ONNX Runtime and the integer reference.
"""
from __future__ import annotations

import logging
import shutil
import subprocess
from pathlib import Path
from typing import Protocol, Sequence, runtime_checkable

import numpy as np
import onnx

from qcompile.errors import TargetError

logger = logging.getLogger(__name__)

MODEL_FILE = "model.qdq.onnx"

# The Debian/Ubuntu package of every external tool a target starts (tools/setup installs them all).
DEBIAN_PACKAGES = {
    "gcc": "gcc",
    "make": "make",
    "aarch64-linux-gnu-gcc": "gcc-aarch64-linux-gnu",
    "qemu-aarch64": "qemu-user",
    "arm-none-eabi-gcc": "gcc-arm-none-eabi libnewlib-arm-none-eabi",
    "arm-none-eabi-objdump": "binutils-arm-none-eabi",
    "arm-none-eabi-size": "binutils-arm-none-eabi",
    "qemu-system-arm": "qemu-system-arm",
}


@runtime_checkable
class Runner(Protocol):
    """Runs one build: float samples in, outputs by name out (``probe``: every integer tensor too)."""

    meta: dict

    def __call__(self, sample: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def probe(self, sample: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def run(self, samples: Sequence[dict[str, np.ndarray]], which: str = "main") -> list[dict[str, np.ndarray]]: ...


@runtime_checkable
class Target(Protocol):
    name: str

    def pipeline(self, spec: dict | None = None) -> list: ...

    def build(self, model: onnx.ModelProto, out_dir: Path, example: dict[str, np.ndarray] | None = None
              ) -> dict[str, str]: ...

    def run(self, out_dir: Path, samples: Sequence[dict[str, np.ndarray]], threads: int = 1
            ) -> list[dict[str, np.ndarray]]: ...


def write_model(model: onnx.ModelProto, out_dir: Path) -> dict[str, str]:
    """``out_dir/model.qdq.onnx``, checked to load in ONNX Runtime with all optimizations on (the integer-kernel
    fusions happen at session creation)."""
    from qcompile import numerics
    from qcompile.ir import save_model

    path = Path(out_dir) / MODEL_FILE
    save_model(model, path)
    try:
        numerics.session(str(path), optimize=True)
    except Exception as exc:  # noqa: BLE001 - ORT's own message, one line
        raise TargetError(f"ONNX Runtime cannot load the quantized model: {exc}") from None
    return {"model": MODEL_FILE}


def require_tools(tools: Sequence[str], who: str) -> None:
    """One clear error naming the packages when any of ``tools`` is not on PATH."""
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        pkgs = sorted({DEBIAN_PACKAGES.get(Path(t).name, Path(t).name) for t in missing})
        raise TargetError(f"{who} needs {', '.join(missing)}: apt-get install -y {' '.join(pkgs)} "
                          "(or run tools/setup)")


def run_tool(cmd: Sequence[str], who: str, *, cwd: Path | None = None, input: bytes | None = None,
             timeout: float | None = 600.0, check: bool = True, text: bool = False) -> subprocess.CompletedProcess:
    """``cmd`` with output captured; a missing tool, a timeout or (``check``) a non-zero exit is one TargetError
    starting with ``who`` and ending with the tail of the tool's output."""
    cmd = [str(c) for c in cmd]
    require_tools([cmd[0]], who)
    try:
        res = subprocess.run(cmd, cwd=cwd, input=input, capture_output=True, timeout=timeout, text=text,
                             stdin=subprocess.DEVNULL if input is None else None)
    except subprocess.TimeoutExpired:
        raise TargetError(f"{who}: {Path(cmd[0]).name} timed out after {timeout}s") from None
    if check and res.returncode != 0:
        out = res.stdout + res.stderr
        out = out if isinstance(out, str) else out.decode(errors="replace")
        raise TargetError(f"{who}: {Path(cmd[0]).name} failed (exit {res.returncode}): {' '.join(cmd)}\n"
                          f"{out.strip()[-3000:]}")
    return res


def check_inputs(meta: dict, sample: dict[str, np.ndarray]) -> list[np.ndarray]:
    """``sample``'s inputs in the order and at the shapes/dtypes the build was made for (``meta["inputs"]``)."""
    args = []
    for s in meta["inputs"]:
        if s["name"] not in sample:
            raise TargetError(f"input {s['name']!r} missing")
        v = np.ascontiguousarray(sample[s["name"]])
        if list(v.shape) != s["shape"] or v.dtype.name != s["dtype"]:
            raise TargetError(f"input {s['name']!r}: built for {s['dtype']} {s['shape']}, got {v.dtype} "
                              f"{list(v.shape)} (compiled builds have static shapes: rebuild with a matching sample)")
        args.append(v)
    return args


class BatchRunner:
    """The runner every compiled target uses: inputs checked against ``meta``, then ``_run(samples, which)`` (one
    process or emulator start for the whole batch, or one in-process call per sample); ``which`` is ``main`` (the
    model's outputs) or ``probe`` (every integer tensor too)."""

    def __init__(self, meta: dict) -> None:
        self.meta = meta

    def _run(self, samples: list[dict[str, np.ndarray]], which: str) -> list[dict[str, np.ndarray]]:
        raise NotImplementedError

    def run(self, samples: Sequence[dict[str, np.ndarray]], which: str = "main") -> list[dict[str, np.ndarray]]:
        for s in samples:
            check_inputs(self.meta, s)
        return self._run(list(samples), which) if samples else []

    def __call__(self, sample: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.run([sample])[0]

    def probe(self, sample: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.run([sample], "probe")[0]


class CompiledTarget:
    """Base of the targets with a runner: ``run`` is the runner's."""

    name = ""
    # ops the recipes' default Q/DQ placement leaves float for ONNX Runtime (which has no integer kernel for them)
    # and the integer lowering runs as integer code here (a ConvTranspose as the Conv it equals): quantized by default
    integer_compute_ops: tuple[str, ...] = ("ConvTranspose",)

    def pipeline(self, spec: dict | None = None) -> list:
        return []

    def runner(self, out_dir: Path) -> Runner:
        raise NotImplementedError

    def run(self, out_dir: Path, samples: Sequence[dict[str, np.ndarray]], threads: int = 1
            ) -> list[dict[str, np.ndarray]]:
        return self.runner(Path(out_dir)).run(samples)
