"""Linear layers with constant weights, grouped by the activation they read (smoothing and reparameterization
both rescale an activation's channels and the rows of every weight that reads it)."""
from __future__ import annotations

from typing import Callable

import numpy as np
import onnx_graphsurgeon as gs

from qcompile.match import Declined, const_value, is_float
from qcompile.overrides import OverrideMap


def weight_rows(node: gs.Node) -> np.ndarray | None:
    """Weight as [K, N] (input channels first) for MatMul(X, W) / Gemm(X, B[, C]); None if not of that form."""
    if node.op not in ("MatMul", "Gemm"):
        return None
    w = const_value(node.inputs[1]) if len(node.inputs) > 1 else None
    if w is None or w.ndim != 2 or w.dtype.kind != "f":
        return None
    if node.op == "Gemm":
        if int(node.attrs.get("transA", 0)):
            return None
        return w.T if int(node.attrs.get("transB", 0)) else w
    return w


def linear_groups(graph: gs.Graph, pass_name: str, overrides: OverrideMap, key: str, min_channels: int,
                  declined: list[Declined], accept: Callable[[gs.Tensor, int], bool] = lambda x, c: True,
                  ) -> dict[str, tuple[gs.Tensor, list[gs.Node]]]:
    """activation name -> (activation, the MatMul/Gemm nodes reading it as input 0 with constant weights).

    Skips constant and non-float activations and those `accept(x, channels)` rejects; declines nodes whose override
    sets `key` false and groups with fewer than `min_channels` input channels."""
    groups: dict[str, tuple[gs.Tensor, list[gs.Node]]] = {}
    for node in graph.nodes:
        rows = weight_rows(node)
        x = node.inputs[0] if node.inputs else None
        if rows is None or x is None or const_value(x) is not None or not is_float(x) or not accept(x, rows.shape[0]):
            continue
        if overrides.resolve(node.name).get(key, True) is False:
            declined.append(Declined(pass_name, node.name, node.op, "excluded by override"))
            continue
        groups.setdefault(x.name, (x, []))[1].append(node)
    out = {}
    for name, (x, nodes) in groups.items():
        c = weight_rows(nodes[0]).shape[0]
        if c < min_channels:
            declined.append(Declined(pass_name, nodes[0].name, nodes[0].op, f"only {c} input channels"))
        else:
            out[name] = (x, nodes)
    return out
