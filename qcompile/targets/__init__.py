"""The target registry: every back end by name, what it needs installed and the options it takes.

A target (:mod:`.base`): ``pipeline(spec)`` -> its phases, ``build(model, out_dir, example)`` -> files,
``runner(out_dir)`` (compiled targets) and ``run(out_dir, samples)``. The CLI builds its ``compile`` flags from
:data:`OPTIONS` (each flag's help names the targets that take it); :func:`get_target` checks options against the
target's constructor.
TVM targets are imported lazily (the ``tvm`` extra is optional): asking for one without it is one clear error.
"""
from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass

from qcompile.errors import ConfigError, TargetError


@dataclass(frozen=True)
class Option:
    """A target option as the CLI offers it (``--name-with-dashes``); ``kind`` is ``bool`` for a switch."""
    name: str
    kind: type
    help: str
    choices: tuple[str, ...] = ()


@dataclass(frozen=True)
class TargetInfo:
    module: str
    cls: str
    summary: str
    needs_tvm: bool = True
    options: tuple[str, ...] = ()


OPTIONS = {o.name: o for o in (
    Option("fast_math", bool, "approximate erf/exp/tanh in float regions (faster; borders may flip more often)"),
    Option("tune_trials", int, "MetaSchedule trials (0: no tuning)"),
    Option("tune_db", str, "tuning database folder to reuse and update"),
    Option("executor", str, "static (default: one C call over a planned arena, no TVM runtime) or vm (Relax VM, "
                            "multi-threaded via TVM_NUM_THREADS)", ("static", "vm")),
    Option("threads", int, "static executor: threads for the kernels' parallel loops (default 1)"),
    Option("rpc", str, "HOST:PORT of a TVM RPC tracker: tuning candidates are measured on its devices"),
    Option("key", str, "the device key at the RPC tracker (with --rpc)"),
    Option("ram_kb", float, "RAM budget in KiB; the build fails above it"),
    Option("flash_kb", float, "flash budget in KiB; the build fails above it"),
    Option("hvx", bool, "HVX vectors and vrmpy kernels (default on); --no-hvx: scalar Hexagon code"),
)}

TARGETS = {
    "onnxruntime": TargetInfo("qcompile.targets.onnxruntime", "OnnxRuntimeTarget",
                              "the QDQ model for ONNX Runtime's integer kernels", needs_tvm=False),
    "tvm-x86": TargetInfo("qcompile.targets.tvm.x86", "TvmX86Target",
                          "TVM, host x86-64 (AVX512-VNNI kernels), in-process",
                          options=("fast_math", "tune_trials", "tune_db", "executor", "threads", "rpc", "key")),
    "tvm-aarch64": TargetInfo("qcompile.targets.tvm.aarch64", "TvmAarch64Target",
                              "TVM, AArch64 Linux (NEON + dotprod), run under qemu-aarch64 or on devices behind a "
                              "TVM RPC tracker", options=("tune_trials", "tune_db", "rpc", "key")),
    "tvm-hexagon": TargetInfo("qcompile.targets.tvm.hexagon", "TvmHexagonTarget",
                              "TVM, Hexagon DSP v66 (HVX vrmpy kernels), freestanding, run under qemu-hexagon",
                              options=("hvx",)),
    "tvm-opencl": TargetInfo("qcompile.targets.tvm.opencl", "TvmOpenclTarget",
                             "TVM, OpenCL C kernels + a C host program (any OpenCL 1.2 device; POCL on the CPU)"),
    "tvm-cuda": TargetInfo("qcompile.targets.tvm.cuda", "TvmCudaTarget",
                           "TVM, CUDA kernels + a C host program built by nvcc (sm_80, sm_90); runs on a CUDA GPU"),
    "mcu-cortex-m4": TargetInfo("qcompile.targets.tvm.mcu", "McuCortexM4Target",
                                "Cortex-M4 firmware (DSP kernels), run in qemu-system-arm mps2-an386",
                                options=("ram_kb", "flash_kb")),
    "mcu-cortex-m7": TargetInfo("qcompile.targets.tvm.mcu", "McuCortexM7Target",
                                "Cortex-M7 firmware, run in qemu-system-arm mps2-an500",
                                options=("ram_kb", "flash_kb")),
}


def names() -> list[str]:
    return sorted(TARGETS)


def takes(option: str) -> list[str]:
    """The targets that take ``option``."""
    return [n for n in names() if option in TARGETS[n].options]


def get_target(name: str, **options):
    """The target `name`, constructed with `options` (e.g. ``fast_math``, ``tune_trials``, ``ram_kb``); an option
    the target does not take is a ConfigError."""
    if name not in TARGETS:
        raise ConfigError(f"unknown target {name!r}; available: {names()}")
    info = TARGETS[name]
    if info.needs_tvm:
        try:
            importlib.import_module("tvm")
        except ImportError as exc:
            raise TargetError(f"target {name} needs Apache TVM: pip install -e '.[tvm]' ({exc})") from None
    klass = getattr(importlib.import_module(info.module), info.cls)
    params = {} if klass.__init__ is object.__init__ else inspect.signature(klass.__init__).parameters
    unknown = sorted(k for k in options if k not in params)
    if unknown:
        takes_ = sorted(p for p in params if p != "self")
        raise ConfigError(f"target {name} does not take option(s) {unknown}; "
                          + (f"it takes {takes_}" if takes_ else "it takes none"))
    return klass(**options)
