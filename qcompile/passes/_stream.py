"""The residual stream of a pre-norm transformer, found from the graph (no per-model map), for ``rotate_residual``.

The stream is a chain ``h₀ → h₁ = h₀ + u₀ → …`` where every ``u`` is a residual writer's output (a ``MatMul`` with a
constant weight, optionally followed by a constant bias ``Add``, read only by the residual ``Add``) and every stream
tensor is otherwise read only by norms:

- RMSNorm, decomposed: ``h·f(mean(h², -1))`` (``f`` from constants, ``Sqrt``, ``Reciprocal``, ``Div``, ``Pow``), an
  optional ``Mul`` by a constant γ;
- LayerNorm, the ``LayerNormalization`` op over the last axis, or decomposed: ``c = h − mean(h, -1)``, then
  ``c·f(mean(c², -1))`` and an optional affine tail ``Add(Mul(·, γ), β)``.

The norms' outputs are read by linear layers with constant weights (``MatMul``, ``Gemm``), directly or behind a token
selection (``Gather`` / ``Slice`` on an axis other than the channels, as ViT's class-token head). ``h₀`` is the output
of a ``Gather`` of a 2-D float table (an embedding, folded) or any other tensor (ViT's patch embedding + class token +
position: a run-time rotation is inserted there). A post-norm (BERT) model, whose residual sums go only into
LayerNorms, is named as such: its writers can still be rotated at run time (:func:`post_norm_writers`).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from qcompile.match import const_value, producer
from qcompile.passes._layernorm import affine_tail
from qcompile.passes._linear import weight_rows
from qcompile.passes._scale_fold import value_readers

NORM_SCALE_OPS = ("Add", "Sub", "Mul", "Div", "Sqrt", "Reciprocal", "Pow", "Cast")


def _scalar(t: gs.Tensor) -> bool:
    v = const_value(t)
    return v is not None and v.size == 1


def _last_axis(node: gs.Node, rank: int | None, name: str = "axis") -> bool:
    a = int(node.attrs.get(name, -1))
    return a == -1 or (rank is not None and a == rank - 1)


def _reduces_last_axis(node: gs.Node, rank: int | None) -> bool:
    """ReduceMean over the last axis only, keeping it (attribute or, from opset 18, input)."""
    if node.op != "ReduceMean" or not int(node.attrs.get("keepdims", 1)):
        return False
    axes = node.attrs.get("axes")
    if axes is None and len(node.inputs) > 1:
        v = const_value(node.inputs[1])
        axes = None if v is None else [int(a) for a in np.asarray(v).reshape(-1)]
    if axes is None or len(axes) != 1:
        return False
    return axes[0] == -1 or (rank is not None and axes[0] == rank - 1)


def _is_square_of(node: gs.Node, h: gs.Tensor) -> bool:
    if node.op == "Mul":
        return len(node.inputs) == 2 and node.inputs[0] is h and node.inputs[1] is h
    if node.op == "Pow":
        e = const_value(node.inputs[1])
        return node.inputs[0] is h and e is not None and e.size == 1 and float(e.reshape(-1)[0]) == 2.0
    return False


def _norm_scale(t: gs.Tensor, h: gs.Tensor, rank: int | None, seen: set[int], budget: int = 12) -> bool:
    """Whether ``t`` is computed from ``h`` only through ``mean(h², -1)`` and scalar constants."""
    node = producer(t)
    if node is None or budget <= 0:
        return False
    if node.op == "ReduceMean":
        sq = producer(node.inputs[0])
        if sq is not None and _is_square_of(sq, h) and _reduces_last_axis(node, rank):
            seen.add(id(sq))
            return True
        return False
    if node.op not in NORM_SCALE_OPS:
        return False
    data = [x for x in node.inputs if x.name and not _scalar(x)]
    if node.op == "Pow" and (len(node.inputs) != 2 or not _scalar(node.inputs[1])):
        return False
    return bool(data) and all(_norm_scale(x, h, rank, seen, budget - 1) for x in data)


def _is_norm_scale(r: gs.Node, x: gs.Tensor, rank: int | None, squares: set[int]) -> bool:
    """Whether ``r`` computes ``x·f(mean(x², -1))`` (``Mul``, or ``Div`` with ``x`` first); the square nodes it reads
    through go into ``squares``."""
    pos = [i for i, t in enumerate(r.inputs) if t is x]
    if r.op not in ("Mul", "Div") or len(r.inputs) != 2 or len(pos) != 1 or (r.op == "Div" and pos[0] != 0):
        return False
    seen: set[int] = set()
    if not _norm_scale(r.inputs[1 - pos[0]], x, rank, seen):
        return False
    squares |= seen
    return True


def _scaled_by_norm(c: gs.Tensor, rank: int | None, squares: set[int]) -> gs.Node | None:
    """The reader of ``c`` computing ``c·f(mean(c², -1))``, else None."""
    return next((r for r in value_readers(c) if _is_norm_scale(r, c, rank, squares)), None)


@dataclass
class Norm:
    """A norm reading the stream ``h``. ``kind``: ``rms``; ``layernorm`` (the op: ``node``); ``layernorm-decomposed``
    (``node`` is the Sub ``c = h − mean(h)``, ``scale_node`` computes ``c·f(mean(c²))``). ``out`` is what the
    readers take (after γ and β); ``rows`` names the tensor whose calibration rows are the normalized (pre-γ)
    activation, ``None`` for ``layernorm`` (normalized from ``h`` with ``eps``)."""

    kind: str
    node: gs.Node
    out: gs.Tensor
    gamma_node: gs.Node | None = None
    gamma_index: int = 0
    beta_node: gs.Node | None = None
    beta_index: int = 0
    scale_node: gs.Node | None = None
    eps: float = 1e-5

    def _const(self, node: gs.Node | None, index: int, d: int, default: float) -> np.ndarray:
        if node is None or index >= len(node.inputs) or not node.inputs[index].name:
            return np.full(d, default)
        return np.broadcast_to(const_value(node.inputs[index]).astype(np.float64).reshape(-1), (d,))

    def gamma(self, d: int) -> np.ndarray:
        return self._const(self.gamma_node, self.gamma_index, d, 1.0)

    def beta(self, d: int) -> np.ndarray:
        return self._const(self.beta_node, self.beta_index, d, 0.0)

    @property
    def rows(self) -> str | None:
        if self.kind == "rms":
            return self.node.outputs[0].name
        if self.kind == "layernorm-decomposed":
            return self.scale_node.outputs[0].name
        return None

    @property
    def layernorm(self) -> bool:
        return self.kind != "rms"


def _gamma_after(out: gs.Tensor, d: int) -> tuple[gs.Node | None, int, gs.Tensor]:
    """An optional ``Mul`` by a per-channel constant γ read only after ``out``: (node, γ's index, its output)."""
    rd = value_readers(out)
    if len(rd) == 1 and rd[0].op == "Mul":
        k = 1 if rd[0].inputs[0] is out else 0
        g = const_value(rd[0].inputs[k])
        if g is not None and g.size in (1, d) and (g.ndim <= 1 or all(s == 1 for s in g.shape[:-1])):
            return rd[0], k, rd[0].outputs[0]
    return None, 0, out


def match_norms(h: gs.Tensor, rank: int | None, d: int) -> tuple[list[Norm], list[gs.Node], str]:
    """(norms reading ``h``, its other value readers, a reason if a norm cannot be used)."""
    norms, others, squares, taken = [], [], set(), set()
    readers = value_readers(h)
    for r in readers:
        if r.op == "LayerNormalization" and r.inputs[0] is h:
            if not _last_axis(r, rank) or any(o.outputs for o in r.outputs[1:]):
                return [], [], f"{r.name}: a LayerNormalization over other axes than the channels, or with its " \
                               "mean / inverse deviation outputs used"
            if any(const_value(x) is None for x in r.inputs[1:] if x.name):
                return [], [], f"{r.name}: LayerNorm γ or β is not a constant"
            norms.append(Norm("layernorm", r, r.outputs[0], r, 1, r if len(r.inputs) > 2 else None, 2,
                              eps=float(r.attrs.get("epsilon", 1e-5))))
            continue
        if r.op == "ReduceMean" and _reduces_last_axis(r, rank) and r.inputs[0] is h:
            subs = [s for s in readers if s.op == "Sub" and s.inputs[0] is h and s.inputs[1] is r.outputs[0]]
            if len(subs) == 1 and value_readers(r.outputs[0]) == subs:
                c = subs[0].outputs[0]
                scale = _scaled_by_norm(c, rank, squares)
                if scale is not None:
                    rest = [x for x in value_readers(c) if x is not scale and id(x) not in squares]
                    if rest:
                        return [], [], f"{subs[0].name}: the centered stream is read by {sorted({x.op for x in rest})}"
                    tail = affine_tail(_tail_end(scale.outputs[0]), d)
                    if tail is not None and tail.gamma_node.op != "LayerNormalization":
                        norms.append(Norm("layernorm-decomposed", subs[0], tail.beta_node.outputs[0],
                                          tail.gamma_node, tail.gamma_index, tail.beta_node, tail.beta_index, scale))
                    else:
                        g_node, g_idx, out = _gamma_after(scale.outputs[0], d)
                        norms.append(Norm("layernorm-decomposed", subs[0], out, g_node, g_idx, scale_node=scale))
                    taken.add(id(subs[0]))  # the Sub reads h too: it is part of this norm
                    continue
        if _is_norm_scale(r, h, rank, squares):  # h·r or r·h, or h / sqrt(mean(h²) + eps)
            g_node, g_idx, out = _gamma_after(r.outputs[0], d)
            norms.append(Norm("rms", r, out, g_node, g_idx))
            continue
        others.append(r)
    rest = [r for r in others if id(r) not in squares and id(r) not in taken]
    return norms, rest, ""


def _tail_end(t: gs.Tensor) -> gs.Tensor:
    """The output of ``Add(Mul(t, γ), β)`` after ``t`` if ``t`` is read only by such a ``Mul``, else ``t``."""
    rd = value_readers(t)
    if len(rd) == 1 and rd[0].op == "Mul":
        rd2 = value_readers(rd[0].outputs[0])
        if len(rd2) == 1 and rd2[0].op == "Add":
            return rd2[0].outputs[0]
    return t


@dataclass
class Writer:
    """A residual writer: ``MatMul(x, W)`` [+ constant bias ``Add``], its sum read only by the residual Add."""

    matmul: gs.Node
    bias_node: gs.Node | None = None
    bias_index: int = 0


def writer_of(u: gs.Tensor, add: gs.Node, outputs: set[str]) -> Writer | None:
    if value_readers(u) != [add] or u.name in outputs:
        return None
    node = producer(u)
    if node is None:
        return None
    bias_node, bias_index = None, 0
    if node.op == "Add" and len(node.inputs) == 2:
        k = next((i for i, x in enumerate(node.inputs) if const_value(x) is not None), None)
        inner = producer(node.inputs[1 - k]) if k is not None else None
        if inner is None or value_readers(node.inputs[1 - k]) != [node] or node.inputs[1 - k].name in outputs:
            return None
        b = const_value(node.inputs[k])
        d = const_value(inner.inputs[1]).shape[-1] if inner.op == "MatMul" and len(inner.inputs) > 1 and \
            const_value(inner.inputs[1]) is not None else None
        if d is None or b.size != d or not (b.ndim <= 1 or all(s == 1 for s in b.shape[:-1])):
            return None
        bias_node, bias_index, node = node, k, inner
    if node.op != "MatMul" or weight_rows(node) is None:
        return None
    return Writer(node, bias_node, bias_index)


@dataclass
class Reader:
    """A linear layer reading a norm's output ``x`` (directly or behind a token selection)."""

    node: gs.Node
    norm: Norm
    x: gs.Tensor


@dataclass
class Plan:
    start: gs.Tensor
    table_gather: gs.Node | None  # the embedding Gather whose table takes the start's rotation
    d: int  # the stream's width
    stream: list[gs.Tensor] = field(default_factory=list)
    writers: list[Writer] = field(default_factory=list)
    norms: list[Norm] = field(default_factory=list)
    readers: list[Reader] = field(default_factory=list)

    @property
    def layernorm(self) -> bool:
        return any(n.layernorm for n in self.norms)


def _table_gather(t: gs.Tensor) -> gs.Node | None:
    g = producer(t)
    if g is None or g.op != "Gather" or int(g.attrs.get("axis", 0)) != 0:
        return None
    table = const_value(g.inputs[0])
    return g if table is not None and table.ndim == 2 and table.dtype.kind == "f" else None


def tied_head(node: gs.Node, x: gs.Tensor, table: gs.Tensor | None) -> bool:
    """MatMul(x, Transpose(E)) with the embedding table E (a tied LM head)."""
    if table is None or node.op != "MatMul" or node.inputs[0] is not x:
        return False
    tr = producer(node.inputs[1])
    return tr is not None and tr.op == "Transpose" and tr.inputs[0] is table and \
        list(tr.attrs.get("perm", [1, 0])) == [1, 0]


def _rank(t: gs.Tensor, stream_rank: int | None, rank_of: Callable[[gs.Tensor], int | None] | None) -> int | None:
    if t.shape is not None:
        return len(t.shape)
    return stream_rank if stream_rank is not None else rank_of(t) if rank_of is not None else None


def _token_select(node: gs.Node, x: gs.Tensor, rank: int | None) -> bool:
    """``Gather`` with constant indices / ``Slice`` with constant axes, neither on the channel (last) axis."""
    if not node.inputs or node.inputs[0] is not x or rank is None:
        return False
    if node.op == "Gather":
        axis = int(node.attrs.get("axis", 0))
        return const_value(node.inputs[1]) is not None and axis not in (-1, rank - 1)
    if node.op == "Slice" and len(node.inputs) >= 4:
        axes = const_value(node.inputs[3])
        return axes is not None and all(int(a) not in (-1, rank - 1) for a in np.asarray(axes).reshape(-1))
    return False


def _starts(graph: gs.Graph, outputs: set[str]) -> list[tuple[gs.Tensor, int]]:
    """(tensor, width) of the tensors that a residual Add reads beside a writer's output, that a norm reads, and that
    no such Add wrote."""
    heads, sums = {}, set()
    for add in (n for n in graph.nodes if n.op == "Add" and len(n.inputs) == 2):
        for i in (0, 1):
            h, u = add.inputs[i], add.inputs[1 - i]
            w = None if h is u or const_value(h) is not None else writer_of(u, add, outputs)
            if w is None:
                continue
            d = int(weight_rows(w.matmul).shape[1])
            if match_norms(h, len(h.shape) if h.shape else None, d)[0]:
                heads[id(h)] = (h, d)
                sums.add(id(add.outputs[0]))
    return [hd for k, hd in heads.items() if k not in sums]


def find_stream(graph: gs.Graph, rank_of: Callable[[gs.Tensor], int | None] | None = None
                ) -> tuple[Plan | None, str]:
    """The stream and everything reading and writing it, or the reason there is none. ``rank_of`` gives a tensor's
    rank where the graph does not (dynamic exports): a token selection must be known not to touch the channels."""
    outputs = {t.name for t in graph.outputs}
    if why := post_norm(graph)[0]:
        return None, why
    starts = _starts(graph, outputs)
    if len(starts) != 1:
        return None, f"{len(starts)} residual streams found (need one: a chain of Adds of linear layers' outputs " \
                     "whose tensors are read by RMSNorms or LayerNorms)"
    h, d = starts[0]
    gather = _table_gather(h)
    table = gather.inputs[0] if gather is not None else None
    rank = len(h.shape) if h.shape else None
    plan = Plan(h, gather, d)
    while True:
        if h.name in outputs:
            return None, f"residual stream tensor {h.name!r} is a graph output (it would come out rotated)"
        plan.stream.append(h)
        norms, rest, why = match_norms(h, rank, d)
        if why:
            return None, why
        plan.norms += norms
        adds = [r for r in rest if r.op == "Add"]
        if len(rest) != len(adds) or len(adds) > 1:
            kinds = sorted({r.op for r in rest})
            return None, f"residual stream tensor {h.name!r} is read by {kinds} besides norms and one Add"
        if not adds:
            break
        add = adds[0]
        u = add.inputs[1] if add.inputs[0] is h else add.inputs[0]
        writer = writer_of(u, add, outputs)
        if writer is None or weight_rows(writer.matmul).shape[1] != d:
            return None, f"{add.name}: the residual Add's other input is not a linear layer's output read only by it"
        plan.writers.append(writer)
        h = add.outputs[0]
    if not plan.norms:
        return None, "no RMSNorm or LayerNorm reads the residual stream"
    if plan.layernorm and not all(n.layernorm for n in plan.norms):
        return None, "the stream is read by both RMSNorms and LayerNorms (centering it for the LayerNorms would " \
                     "change the RMSNorms)"
    if gather is not None and const_value(table).shape[1] != d:
        return None, f"embedding table {table.name!r} is not {d} wide"
    for norm in plan.norms:
        if norm.out.name in outputs:
            return None, f"norm output {norm.out.name!r} is a graph output"
        for r in value_readers(norm.out):
            xs = [(r, norm.out)]
            if r.op in ("Gather", "Slice") and _token_select(r, norm.out, _rank(norm.out, rank, rank_of)):
                if r.outputs[0].name in outputs:
                    return None, f"{r.name}: its token selection is a graph output"
                xs = [(rr, r.outputs[0]) for rr in value_readers(r.outputs[0])]
            for node, x in xs:
                if not (weight_rows(node) is not None and node.inputs[0] is x) and not tied_head(node, x, table):
                    return None, f"{node.name} ({node.op}) reads the norm output {norm.out.name!r}: not a linear " \
                                 "layer with a constant weight"
                plan.readers.append(Reader(node, norm, x))
    return plan, ""


def _only_layernorm(t: gs.Tensor) -> gs.Node | None:
    """The LayerNorm that is ``t``'s only reader (fused, or decomposed: a ``ReduceMean`` and ``Sub``s of it), or
    None. Pre-norm streams are also read by the next residual Add; a post-norm sum only by its LayerNorm."""
    readers = value_readers(t)
    if len(readers) == 1 and readers[0].op == "LayerNormalization" and readers[0].inputs[0] is t:
        return readers[0]
    means = [r for r in readers if r.op == "ReduceMean"]
    if len(means) == 1 and all(r is means[0] or (r.op == "Sub" and r.inputs[0] is t and r.inputs[1] is
                                                 means[0].outputs[0]) for r in readers) and len(readers) > 1:
        return means[0]
    return None


def post_norm(graph: gs.Graph) -> tuple[str, list[Writer]]:
    """Why a post-norm (BERT-style) transformer's stream cannot be rotated (or "") and its residual writers: the
    linear layers whose outputs are added to a residual sum that goes only into a LayerNorm, in more than one block
    (a pre-norm model has one such sum, before its final norm)."""
    outputs = {t.name for t in graph.outputs}
    found = []
    for add in (n for n in graph.nodes if n.op == "Add" and len(n.inputs) == 2):
        ln = _only_layernorm(add.outputs[0])
        if ln is None:
            continue
        for u in add.inputs:
            w = writer_of(u, add, outputs)
            if w is not None:
                found.append((add, w, ln))
                break
    if len(found) < 2:
        return "", []
    add, w, ln = found[0]
    return (f"post-norm transformer (BERT-style): {len(found)} residual sums go only into a LayerNorm (first: "
            f"{add.name}, of {w.matmul.name}, into {ln.name}); the stream is re-normalized with mean subtraction "
            "after every block, which a rotation folded into the weights does not commute with (needs a pre-norm "
            "stream)"), [w for _, w, _ in found]


__all__ = ["Norm", "Plan", "Reader", "Writer", "find_stream", "match_norms", "post_norm", "tied_head", "writer_of"]
