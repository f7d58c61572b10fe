"""Per-channel rescaling of a linear layer's input, folded into the graph where it costs nothing.

SmoothQuant, AWQ and the reparameterizations all use one identity, for an activation ``X [..., K]`` read only by
linear layers with constant weights ``W [K, N]``::

    X·W = (X·diag(1/s))·(diag(s)·W)

The consumers' weight rows take ``s`` (:func:`scale_weight_rows`). ``1/s`` is moved upstream into constants where
the graph allows it exactly (:func:`divide_channels`), following ``X`` back through the ops that are linear per
last-axis channel:

- ``Mul(z, γ)`` with a constant ``γ`` ([C] or scalar): ``γ/s`` (an RMSNorm's weight, a LayerNorm's decomposed γ);
- ``Add(m, β)`` with a constant ``β``: ``β/s`` and ``m/s`` in turn (a LayerNorm's decomposed tail, a bias);
- ``LayerNormalization`` (axis −1): ``γ/s``, ``β/s``;
- ``MatMul(y, W0)`` / ``Gemm(y, B, C)`` with constant weights: ``W0[:, c]/s_c``, ``C/s`` (a preceding linear);
- ``Mul(a, b)`` of two activations (SwiGLU's ``silu(gate)·up``): ``a/s`` or ``b/s``, whichever can take it
  (``(a/s)·b = (a·b)/s``); the gated MLP's down projection is where a decoder's largest outliers are;
- ``Gather`` / ``Slice`` with constant parameters on an axis other than the last (a ViT's class token taken after
  the last LayerNorm): they pick positions, not channels, so ``1/s`` goes to their input;
- ``Reshape`` / ``Flatten`` / ``Squeeze`` / ``Unsqueeze`` whose input and output both end in the ``C`` channels
  (GPT-2's ``addmm`` on ``x.view(-1, C)``): element ``i`` is channel ``i mod C`` on both sides.

Every tensor on that path must be read only by the op after it (and be no graph output), otherwise the other
readers would see the change; readers of its shape alone (``Shape``, ``Size``: exporters take the hidden size from
the normalized activation) do not count. Where no path exists, one ``Mul(X, 1/s)`` is inserted before the consumers
and other readers of ``X`` (a residual Add) keep ``X``. The rewrite is fp32-exact up to rounding.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx_graphsurgeon as gs

from qcompile.ir import NameScope
from qcompile.match import const_ints, const_value, producer

Edit = Callable[[], None]
SHAPE_ONLY = ("Shape", "Size")  # readers that see a tensor's shape, not its values


def value_readers(t: gs.Tensor) -> list[gs.Node]:
    """The nodes that read ``t``'s values (not only its shape)."""
    return [r for r in t.outputs if r.op not in SHAPE_ONLY]


def _per_channel(v: np.ndarray, c: int) -> bool:
    """Whether constant ``v`` broadcasts along the last axis only, as one value or ``c`` values."""
    return v.size in (1, c) and (v.ndim <= 1 or all(d == 1 for d in v.shape[:-1]))


def _set_input(node: gs.Node, i: int, value: np.ndarray, dtype: np.dtype, uniq: NameScope, tag: str) -> Edit:
    def edit() -> None:
        node.inputs[i] = gs.Constant(uniq(f"{node.name}_{tag}"), np.asarray(value, dtype=dtype))
    return edit


def _divided(v: np.ndarray, s: np.ndarray) -> np.ndarray:
    """Constant ``v`` (broadcast along the last axis) divided by ``s``, as a [C] vector."""
    return np.broadcast_to(v.astype(np.float64).reshape(-1), s.shape) / s


def _picks_positions(node: gs.Node) -> bool:
    """A ``Gather`` / ``Slice`` with constant parameters that leaves the last axis whole."""
    shape = getattr(node.inputs[0], "shape", None)
    if not shape:
        return False
    rank = len(shape)
    if node.op == "Gather":
        return const_value(node.inputs[1]) is not None and int(node.attrs.get("axis", 0)) % rank != rank - 1
    starts, ends, axes, steps = (const_ints(node, i) for i in (1, 2, 3, 4))
    if not starts or not ends or axes is None or steps is None:
        return False
    return all(a % rank != rank - 1 for a in (axes or range(len(starts))))


def _plan(t: gs.Tensor, s: np.ndarray, outputs: set[str], uniq: NameScope, tag: str) -> tuple[list[Edit], str] | None:
    """Edits that make ``t``'s value ``t/s`` per last-axis channel, and what takes the factor; None if impossible.
    ``t`` is read only by the op that asked."""
    node = producer(t)
    c = s.shape[0]
    if node is None or not node.outputs or node.outputs[0] is not t or t.name in outputs:
        return None
    consts = [const_value(x) if x.name else None for x in node.inputs]
    op = node.op
    if op == "LayerNormalization":
        if int(node.attrs.get("axis", -1)) != -1 or any(o.outputs for o in node.outputs[1:]):
            return None
        g = consts[1] if len(consts) > 1 else None
        if g is None or g.reshape(-1).shape != (c,):
            return None
        edits = [_set_input(node, 1, _divided(g, s), g.dtype, uniq, f"{tag}_gamma")]
        if len(consts) > 2 and node.inputs[2].name:
            if consts[2] is None or consts[2].reshape(-1).shape != (c,):
                return None
            edits.append(_set_input(node, 2, _divided(consts[2], s), consts[2].dtype, uniq, f"{tag}_beta"))
        return edits, "norm"
    if len(node.outputs) != 1:
        return None
    if (op in ("Gather", "Slice") and _picks_positions(node)) or (
            op in ("Reshape", "Flatten", "Squeeze", "Unsqueeze") and _last_dim(node.inputs[0]) == c == _last_dim(t)):
        return _upstream(node.inputs[0], node, s, outputs, uniq, tag)
    if op in ("Mul", "Add") and len(node.inputs) == 2:
        k = next((i for i, v in enumerate(consts) if v is not None), None)
        if k is not None:
            v = consts[k]
            other = node.inputs[1 - k]
            if not _per_channel(v, c) or _last_dim(other) not in (c, None) or consts[1 - k] is not None:
                return None
            edit = _set_input(node, k, _divided(v, s), v.dtype, uniq, f"{tag}_{'scale' if op == 'Mul' else 'bias'}")
            if op == "Mul":
                return [edit], "norm"
            inner = _upstream(other, node, s, outputs, uniq, tag)
            return (inner[0] + [edit], inner[1]) if inner else None
        if op == "Mul":  # a product of two activations: one factor takes 1/s
            for x in sorted(node.inputs, key=lambda x: producer(x) is None or producer(x).op not in ("MatMul", "Gemm")):
                if _last_dim(x) != c:
                    continue
                inner = _upstream(x, node, s, outputs, uniq, tag)
                if inner:
                    return inner[0], "product"
        return None
    if op in ("MatMul", "Gemm") and consts[1] is not None and consts[1].ndim == 2 and consts[0] is None:
        w = consts[1]
        if op == "Gemm" and int(node.attrs.get("transA", 0)):
            return None
        trans = op == "Gemm" and int(node.attrs.get("transB", 0))
        cols = w.T if trans else w
        if cols.shape[1] != c:
            return None
        new = cols.astype(np.float64) / s[None, :]
        edits = [_set_input(node, 1, new.T if trans else new, w.dtype, uniq, f"{tag}_W")]
        if op == "Gemm" and len(node.inputs) > 2 and node.inputs[2].name:
            b = consts[2]
            if b is None or not _per_channel(b, c):
                return None
            edits.append(_set_input(node, 2, _divided(b, s), b.dtype, uniq, f"{tag}_C"))
        return edits, "linear"
    return None


def _last_dim(t: gs.Tensor) -> int | None:
    shape = getattr(t, "shape", None)
    if not shape or not isinstance(shape[-1], (int, np.integer)) or int(shape[-1]) < 0:
        return None
    return int(shape[-1])


def _upstream(t: gs.Tensor, reader: gs.Node, s: np.ndarray, outputs: set[str], uniq: NameScope, tag: str):
    readers = value_readers(t)
    if len(readers) != 1 or readers[0] is not reader:
        return None
    return _plan(t, s, outputs, uniq, tag)


def divide_channels(graph: gs.Graph, x: gs.Tensor, s: np.ndarray, uniq: NameScope, tag: str) -> str | None:
    """Change constants upstream so that ``x`` becomes ``x/s`` (last axis); what took the factor (``"norm"``,
    ``"linear"``, ``"product"``) or None, with the graph unchanged. Every reader of ``x`` sees the change."""
    outputs = {t.name for t in graph.outputs}
    planned = _plan(x, np.asarray(s, np.float64), outputs, uniq, tag)
    if planned is None:
        return None
    for edit in planned[0]:
        edit()
    return planned[1]


def scale_weight_rows(node: gs.Node, s: np.ndarray, uniq: NameScope, tag: str) -> None:
    """Multiply the input-channel rows of a MatMul / Gemm constant weight by ``s`` (``W[K, N]`` or, with
    ``transB``, ``B[N, K]``)."""
    w = const_value(node.inputs[1])
    trans = node.op == "Gemm" and int(node.attrs.get("transB", 0))
    new = w.astype(np.float64) * (s[None, :] if trans else s[:, None])
    node.inputs[1] = gs.Constant(uniq(f"{node.name}_{tag}_W"), np.asarray(new, dtype=w.dtype))


def foldable(graph: gs.Graph, x: gs.Tensor, nodes: list[gs.Node], uniq: NameScope) -> bool:
    """Whether :func:`fold_input_scale` would move ``1/s`` upstream (rather than insert a ``Mul``) for ``x``
    (``uniq`` is only read by edits, which a probe never runs)."""
    readers = value_readers(x)
    if len(readers) != len(nodes) or not all(any(r is n for n in nodes) for r in readers):
        return False
    c = _last_dim(x) or weight_rows_count(nodes[0])
    return c is not None and _plan(x, np.ones(c), {t.name for t in graph.outputs}, uniq, "probe") is not None


def weight_rows_count(node: gs.Node) -> int | None:
    w = const_value(node.inputs[1]) if len(node.inputs) > 1 else None
    if w is None or w.ndim != 2:
        return None
    return int(w.shape[1] if node.op == "Gemm" and int(node.attrs.get("transB", 0)) else w.shape[0])


def fold_input_scale(graph: gs.Graph, x: gs.Tensor, nodes: list[gs.Node], s: np.ndarray, uniq: NameScope,
                     tag: str) -> str:
    """``X·W = (X/s)·(s·W)`` for the linear ``nodes`` reading ``x``: their weight rows take ``s``; ``1/s`` goes
    upstream where only they read ``x`` (:func:`divide_channels`), else into one inserted ``Mul``. Returns where
    ``1/s`` went: ``"norm"``, ``"linear"``, ``"product"`` or ``"inserted"``."""
    s = np.asarray(s, np.float64)
    for n in nodes:
        scale_weight_rows(n, s, uniq, tag)
    readers = value_readers(x)
    only = len(readers) == len(nodes) and all(any(r is n for n in nodes) for r in readers)
    if only:
        where = divide_channels(graph, x, s, uniq, tag)
        if where is not None:
            return where
    inv = gs.Constant(uniq(f"{x.name}_{tag}_inv_scale"), np.asarray(1.0 / s, dtype=np.float32))
    xs = gs.Variable(uniq(f"{x.name}_{tag}"), dtype=x.dtype, shape=x.shape)
    graph.nodes.append(gs.Node("Mul", uniq(f"{x.name}_{tag}_Mul"), inputs=[x, inv], outputs=[xs]))
    for n in nodes:
        n.inputs[0] = xs
    return "inserted"


__all__ = ["divide_channels", "fold_input_scale", "foldable", "scale_weight_rows", "value_readers"]
