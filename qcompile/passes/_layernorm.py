"""Where a LayerNorm's affine parameters live, so passes can fold per-channel factors into γ and β.

Two forms: the LayerNormalization op (opset 17+; γ is input 1, β input 2 or absent) and the decomposed tail that
exporters emit below opset 17, ``Add(Mul(normalized, γ), β)`` with constant γ and β.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from qcompile.ir import NameScope
from qcompile.match import const_value, producer


@dataclass
class AffineTail:
    gamma_node: gs.Node
    gamma_index: int
    beta_node: gs.Node
    beta_index: int

    def values(self) -> tuple[np.ndarray, np.ndarray]:
        g = const_value(self.gamma_node.inputs[self.gamma_index])
        has_b = len(self.beta_node.inputs) > self.beta_index and self.beta_node.inputs[self.beta_index].name
        b = const_value(self.beta_node.inputs[self.beta_index]) if has_b else np.zeros_like(g)
        return g, b

    def set(self, gamma: np.ndarray, beta: np.ndarray, uniq: NameScope, tag: str) -> None:
        g, _ = self.values()
        self.gamma_node.inputs[self.gamma_index] = gs.Constant(uniq(f"{self.gamma_node.name}_{tag}_gamma"),
                                                               np.array(gamma, dtype=g.dtype))
        beta_t = gs.Constant(uniq(f"{self.beta_node.name}_{tag}_beta"), np.array(beta, dtype=g.dtype))
        if len(self.beta_node.inputs) > self.beta_index:
            self.beta_node.inputs[self.beta_index] = beta_t
        else:
            self.beta_node.inputs.append(beta_t)


def affine_tail(x: gs.Tensor, channels: int) -> AffineTail | None:
    """The affine tail producing `x` with per-channel (last-axis, `channels`) γ and β, else None."""
    node = producer(x)
    if node is None or len(node.outputs) == 0 or node.outputs[0] is not x:
        return None
    if node.op == "LayerNormalization":
        if int(node.attrs.get("axis", -1)) != -1 or any(t.outputs for t in node.outputs[1:]):
            return None
        tail = AffineTail(node, 1, node, 2)
    elif node.op == "Add":
        bidx = next((i for i, t in enumerate(node.inputs) if const_value(t) is not None), None)
        if bidx is None:
            return None
        mul = producer(node.inputs[1 - bidx])
        if mul is None or mul.op != "Mul" or len(node.inputs[1 - bidx].outputs) != 1:
            return None
        gidx = next((i for i, t in enumerate(mul.inputs) if const_value(t) is not None), None)
        if gidx is None:
            return None
        tail = AffineTail(mul, gidx, node, bidx)
    else:
        return None
    g, b = tail.values()
    if g is None or b is None or g.reshape(-1).shape != (channels,) or b.reshape(-1).shape not in ((channels,), (1,)):
        return None
    return tail
