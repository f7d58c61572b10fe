"""Small matching helpers. A declined match carries a reason that reaches the report."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs


@dataclass(frozen=True)
class MatchResult:
    ok: bool
    reason: str = ""

    def __bool__(self) -> bool:
        return self.ok

    @staticmethod
    def fail(reason: str) -> "MatchResult":
        return MatchResult(False, reason)


MATCHED = MatchResult(True)


@dataclass(frozen=True)
class Declined:
    """A match a pass looked at and did not rewrite, with why."""

    pass_name: str
    node: str
    op: str
    reason: str

    def as_dict(self) -> dict:
        return {"pass": self.pass_name, "node": self.node, "op": self.op, "reason": self.reason}


def const_value(t: gs.Tensor) -> np.ndarray | None:
    """Value of a constant tensor (initializer or Constant-node output), else None."""
    if isinstance(t, gs.Constant):
        return np.asarray(t.values)
    if len(t.inputs) == 1 and t.inputs[0].op == "Constant":
        attrs = t.inputs[0].attrs
        if "value" in attrs and isinstance(attrs["value"], gs.Constant):
            return np.asarray(attrs["value"].values)
    return None


def const_ints(node: gs.Node, i: int) -> list[int] | None:
    """Input ``i`` of ``node`` as constant integers ([] when absent), None when it is not constant."""
    if len(node.inputs) <= i or not node.inputs[i].name:
        return []
    v = const_value(node.inputs[i])
    return None if v is None else [int(a) for a in np.asarray(v).reshape(-1)]


def single_consumer(t: gs.Tensor, graph_outputs: set[str]) -> gs.Node | None:
    """The only consumer of `t`, or None if it has several or is a graph output."""
    if len(t.outputs) != 1 or t.name in graph_outputs:
        return None
    return t.outputs[0]


def producer(t: gs.Tensor) -> gs.Node | None:
    return t.inputs[0] if len(t.inputs) == 1 else None


def is_float(t: gs.Tensor) -> bool:
    """A float32 tensor: the float type qcompile calibrates and quantizes (QuantizeLinear takes float32 before opset
    19; a float16 / bfloat16 model is computed in float32 from load on, :mod:`qcompile.upcast`). A float64 tensor
    (a double island in an export, a scikit-learn model) stays as it is."""
    dt = getattr(t, "dtype", None)
    if dt is None:
        return False
    try:
        return np.dtype(dt) == np.float32
    except TypeError:
        return False
