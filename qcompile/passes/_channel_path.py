"""Linear → linear sites with only a channel permutation between them: attention's V projection → output
projection.

Between ``v = Y·W_v`` and the output projection's input ``X`` an attention block only moves channels around and mixes
tokens: ``Reshape`` to heads, ``Transpose``, the grouped-query ``Unsqueeze``/``Expand``/``Reshape`` that repeats KV
heads, ``P·V`` (``MatMul`` with V as its right operand: row ``i`` of the output is ``Σ_j P_ij·V_j``, channel by
channel), ``Transpose`` and ``Reshape`` back. So every channel ``c`` of ``X`` is channel ``m(c)`` of ``v`` mixed over
tokens, and for any ``t > 0`` on v's channels::

    v / t  (W_v[:, k] / t_k, bias / t)   gives   X / t[m]   exactly.

A smoothing factor ``s`` on X can therefore be folded into ``W_v`` when it is constant over each ``m``-class (several
query heads share one KV head under grouped-query attention): ``s = t[m]``. :func:`trace` finds the path (every
tensor on it read by the next op only, ``P`` not computed from it); :func:`channel_map` derives ``m`` by pushing an
index tensor through the path at the shapes of one calibration run, and declines unless every channel of X
draws from one v channel at every position.

A fused QKV projection (timm's ViT, GPT-2, BLOOM: one linear whose output is cut into Q, K and V) reaches V through a
selection with constant parameters (``Gather``, ``Slice``, one output of ``Split``) whose input other selections
also read (Q's and K's). ``t`` then scales only the projection's V columns, which the other readers must not see:
:func:`channel_map` pushes the index tensor through those readers too and declines unless the channels they select
are disjoint from V's (``t`` is 1 on every channel ``m`` does not reach).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from qcompile.match import const_ints, const_value, producer

MOVES = ("Reshape", "Transpose", "Expand", "Unsqueeze", "Squeeze", "Identity")
SELECTS = ("Gather", "Slice", "Split")  # with constant parameters: a part of their input, other parts read by others


@dataclass
class ChannelPath:
    """``linear`` (constant weight, optional ``bias_add``) → ``nodes`` (forward order, ``outs``: the output of each
    that the path follows) → the activation ``x``."""

    linear: gs.Node
    bias_add: gs.Node | None
    nodes: list[gs.Node]
    x: gs.Tensor
    outs: list[gs.Tensor]

    def tensors(self) -> list[gs.Tensor]:
        """The values whose shapes :func:`channel_map` needs: the linear's output (or the bias Add's) and each
        node's output on the path."""
        first = (self.bias_add or self.linear).outputs[0]
        return [first] + list(self.outs)


def _readers(t: gs.Tensor) -> list[gs.Node]:
    return [r for r in t.outputs if r.op not in ("Shape", "Size")]


def _only_reader(t: gs.Tensor, node: gs.Node, outputs: set[str]) -> bool:
    readers = _readers(t)
    return len(readers) == 1 and readers[0] is node and t.name not in outputs


def select(node: gs.Node, idx: np.ndarray) -> list[np.ndarray] | None:
    """What a ``Gather`` / ``Slice`` / ``Split`` with constant parameters makes of ``idx`` (one array per output),
    or None when a parameter is not constant."""
    rank = idx.ndim
    if node.op == "Gather":
        ind = const_value(node.inputs[1]) if len(node.inputs) > 1 else None
        if ind is None:
            return None
        return [np.take(idx, np.asarray(ind, np.int64), axis=int(node.attrs.get("axis", 0)))]
    if node.op == "Slice":
        starts, ends, axes, steps = (const_ints(node, i) for i in (1, 2, 3, 4))
        if starts is None or ends is None or axes is None or steps is None:
            return None
        sl = [slice(None)] * rank
        for k, (b, e) in enumerate(zip(starts, ends)):
            sl[axes[k] % rank if axes else k] = slice(b, e, steps[k] if steps else 1)
        return [idx[tuple(sl)]]
    if node.op == "Split":
        axis = int(node.attrs.get("axis", 0)) % rank
        sizes = const_ints(node, 1)
        if sizes is None:
            return None
        sizes = sizes or list(node.attrs.get("split", []))
        n = len(node.outputs)
        if not sizes:
            d = idx.shape[axis]
            sizes = [-(-d // n)] * (n - 1) + [d - -(-d // n) * (n - 1)]
        return np.split(idx, np.cumsum(sizes)[:-1], axis=axis)
    return None


def _linear(node: gs.Node) -> bool:
    if node.op not in ("MatMul", "Gemm") or len(node.inputs) < 2:
        return False
    w = const_value(node.inputs[1])
    if w is None or w.ndim != 2 or const_value(node.inputs[0]) is not None:
        return False
    return not (node.op == "Gemm" and int(node.attrs.get("transA", 0)))


def trace(graph: gs.Graph, x: gs.Tensor, max_nodes: int = 16) -> ChannelPath | None:
    """The path from a constant-weight linear through channel moves and ``P·V`` to ``x``, or None."""
    outputs = {t.name for t in graph.outputs}
    nodes: list[gs.Node] = []
    outs: list[gs.Tensor] = []
    t, matmuls = x, 0
    while len(nodes) <= max_nodes:
        node = producer(t)
        if node is None or not node.outputs or (node.outputs[0] is not t and node.op != "Split"):
            return None
        if node.op == "Add" and len(node.inputs) == 2:  # a bias right after the linear
            k = next((i for i, v in enumerate(node.inputs) if const_value(v) is not None), None)
            inner = producer(node.inputs[1 - k]) if k is not None else None
            if inner is None or not _linear(inner) or not _only_reader(node.inputs[1 - k], node, outputs):
                return None
            return ChannelPath(inner, node, nodes[::-1], x, outs[::-1]) if matmuls == 1 else None
        if _linear(node):
            return ChannelPath(node, None, nodes[::-1], x, outs[::-1]) if matmuls == 1 and nodes else None
        shared = False  # nxt may have other readers (checked by channel_map)
        if node.op == "MatMul" and const_value(node.inputs[0]) is None and const_value(node.inputs[1]) is None:
            matmuls += 1  # P·V: V is the right operand
            nxt = node.inputs[1]
        elif node.op in MOVES:
            nxt = node.inputs[0]
        elif node.op in SELECTS:
            nxt, shared = node.inputs[0], True
        else:
            return None
        if shared:
            if nxt.name in outputs or any(r.op not in SELECTS for r in _readers(nxt)):
                return None
        elif not _only_reader(nxt, node, outputs):
            return None
        nodes.append(node)
        outs.append(t)
        t = nxt
    return None


def channel_map(path: ChannelPath, shapes: dict[str, tuple[int, ...]]) -> np.ndarray | None:
    """``m``: for each channel of ``path.x``, the channel of the linear's output it carries, or None when some
    channel of x is not one v channel at every position (or a shape is missing)."""
    first = path.tensors()[0]
    if first.name not in shapes or path.x.name not in shapes:
        return None
    c = shapes[first.name][-1]
    idx = np.broadcast_to(np.arange(c, dtype=np.int64), shapes[first.name])
    for node, t in zip(path.nodes, path.outs):
        out = shapes.get(t.name)
        if out is None:
            return None
        try:
            if node.op in SELECTS:
                src = node.inputs[0]
                mine = select(node, idx)
                if mine is None:
                    return None
                k = next(i for i, o in enumerate(node.outputs) if o is t)
                others = [part for r in _readers(src) for i, part in enumerate(select(r, idx) or [None])
                          if not (r is node and i == k)]
                if any(part is None for part in others):
                    return None
                idx = mine[k]
                if others and np.intersect1d(idx, np.concatenate([p.reshape(-1) for p in others])).size:
                    return None  # another reader selects one of these channels: it would see the scale
            elif node.op == "Transpose":
                perm = node.attrs.get("perm")
                idx = idx.transpose(tuple(perm) if perm is not None else None)
            elif node.op == "Expand":
                idx = np.broadcast_to(idx, out)
            elif node.op == "MatMul":  # rows of P·V mix rows of V: the index must not vary along them
                if idx.ndim < 2 or not np.all(idx == idx[..., :1, :]):
                    return None
                idx = np.broadcast_to(idx[..., :1, :], out)
            else:  # Reshape, Unsqueeze, Squeeze, Identity
                idx = np.ascontiguousarray(idx).reshape(out)
        except ValueError:
            return None
        if tuple(idx.shape) != tuple(out):
            return None
    flat = np.ascontiguousarray(idx).reshape(-1, idx.shape[-1])
    return flat[0].copy() if np.all(flat == flat[:1]) else None


__all__ = ["ChannelPath", "channel_map", "trace"]
