"""Targets: `pipeline(spec)` then `build(model, out_dir) -> files`; `run(out_dir, samples)` executes a build."""
from __future__ import annotations

from qcompile.errors import ConfigError


def get_target(name: str):
    from qcompile.targets.onnxruntime import OnnxRuntimeTarget

    table = {OnnxRuntimeTarget.name: OnnxRuntimeTarget}
    if name not in table:
        raise ConfigError(f"unknown target {name!r}; available: {sorted(table)}")
    return table[name]()
