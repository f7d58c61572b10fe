"""Per-node overrides: one ordered map, fixed precedence: exact node name, then ``re:`` patterns in order, then default.

Keys are node names or ``re:<regex>`` (full match on the node name); values are partial settings. Only the first
matching entry of the highest-precedence kind applies (no merging across entries), so a user can read which rule won.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping

from qcompile.errors import ConfigError


@dataclass(frozen=True)
class OverrideMap:
    exact: tuple[tuple[str, dict], ...] = ()
    patterns: tuple[tuple[re.Pattern, dict], ...] = ()

    @staticmethod
    def build(raw: Mapping[str, Mapping[str, Any]] | None, allowed: set[str], where: str) -> "OverrideMap":
        exact, patterns = [], []
        for key, val in (raw or {}).items():
            if not isinstance(val, Mapping):
                raise ConfigError(f"{where}: override {key!r} must map to settings, got {val!r}")
            unknown = sorted(set(val) - allowed)
            if unknown:
                raise ConfigError(f"{where}: unknown override key(s) {unknown} for {key!r}; known: {sorted(allowed)}")
            if key.startswith("re:"):
                try:
                    patterns.append((re.compile(key[3:]), dict(val)))
                except re.error as exc:
                    raise ConfigError(f"{where}: bad pattern {key!r}: {exc}") from None
            else:
                exact.append((key, dict(val)))
        return OverrideMap(tuple(exact), tuple(patterns))

    def resolve(self, node_name: str) -> dict:
        for name, val in self.exact:
            if name == node_name:
                return val
        for pat, val in self.patterns:
            if pat.fullmatch(node_name or ""):
                return val
        return {}
