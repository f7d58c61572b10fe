"""Targets: `pipeline(spec)` then `build(model, out_dir, example) -> files`; `run(out_dir, samples)` executes a build.

TVM targets are imported lazily (the `tvm` extra is optional): asking for one without it installed is one clear error.
"""
from __future__ import annotations

import importlib
import inspect

from qcompile.errors import ConfigError, TargetError

_TABLE = {
    "onnxruntime": ("qcompile.targets.onnxruntime", "OnnxRuntimeTarget"),
    "tvm-x86": ("qcompile.targets.tvm.x86", "TvmX86Target"),
    "tvm-aarch64": ("qcompile.targets.tvm.aarch64", "TvmAarch64Target"),
    "mcu-cortex-m4": ("qcompile.targets.tvm.mcu", "McuCortexM4Target"),
    "mcu-cortex-m7": ("qcompile.targets.tvm.mcu", "McuCortexM7Target"),
}


def names() -> list[str]:
    return sorted(_TABLE)


def get_target(name: str, **options):
    """The target `name`, constructed with `options` (e.g. ``fast_math``, ``tune_trials``, ``ram_kb``); an option
    the target does not take is a ConfigError."""
    if name not in _TABLE:
        raise ConfigError(f"unknown target {name!r}; available: {names()}")
    module, cls = _TABLE[name]
    if name.startswith(("tvm", "mcu")):
        try:
            importlib.import_module("tvm")
        except ImportError as exc:
            raise TargetError(f"target {name} needs Apache TVM: pip install -e '.[tvm]' ({exc})") from None
    klass = getattr(importlib.import_module(module), cls)
    params = {} if klass.__init__ is object.__init__ else inspect.signature(klass.__init__).parameters
    unknown = sorted(k for k in options if k not in params)
    if unknown:
        takes = sorted(p for p in params if p != "self")
        raise ConfigError(f"target {name} does not take option(s) {unknown}; "
                          + (f"it takes {takes}" if takes else "it takes none"))
    return klass(**options)
