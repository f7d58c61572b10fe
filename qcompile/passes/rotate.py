"""Residual-stream rotation (QuaRot / SpinQuant R1), found from the graph: an orthogonal ``Q`` folded into the weights.

A pre-norm transformer's residual stream ``h`` is only (a) written by its embedding and by the linear layers whose
outputs are added to it (attention's output projection, the MLP's down projection), and (b) read by RMSNorms, whose
outputs feed linear layers (Q/K/V, gate/up, the head). For an orthogonal ``Q`` [d, d]:

    RMSNorm(h·Q) = RMSNorm(h)·Q        (mean(h²) over the channels is ‖h‖²/d, which Q keeps)

so with every RMSNorm's weight γ first folded into its readers (``norm fusion``: ``y·diag(γ)·W = y·(diag(γ)·W)``,
γ := 1), the model computes the same function with

    E ← E·Q (embedding rows),   W_write ← W_write·Q (and bias·Q),   W_read ← Qᵀ·diag(γ)·W_read

and every activation on the stream and every norm output rotated. Outliers of single channels spread over all of
them (a random ``Q``, or a randomized Hadamard ``H·diag(±1)/√d`` where ``d`` is a power of two: incoherent with any
axis), which is what makes 4-bit activations and weights possible. EQUIVALENCE: checked by the numerics instrument.

Online rotations (``online: true``): the input x of every residual writer (the MLP's down projection, attention's
output projection) is rotated at run time, ``x·W = (x·R)·(Rᵀ·W)`` with ``MatMul(x, R)`` inserted (nodes named
``<writer>_online_rotation``) and ``Rᵀ`` folded into the writer: QuaRot's R4 before the down projection, where the
gated product's outliers sit; before the output projection a full rotation over all heads (QuaRot splits it into a
per-head rotation folded into V and an online one across heads; the full one costs k² instead of k·log k
multiply-adds per token, k = heads·head_dim). R is a randomized Hadamard for a power-of-two width, else random
orthogonal (smollm2-135m's 1536 and 576). Recipes keep the rotation MatMuls float (``re:.*_online_rotation``
overrides): quantizing their input would undo them.

Learned rotations (``rotation: learned``, SpinQuant): the residual rotation and every online one start from the
rotation above and are optimized in the orthogonal group (Cayley parametrization, torch) on calibration activations,
for the per-token activation quantizer the recipe uses (``act_bits``, ``act_clip``): the loss is each reader's
relative output error from quantizing its rotated input (``passes/_spin.py``). Only which orthogonal matrix is
folded changes, so the pass stays an EQUIVALENCE; stats ``learned_loss`` give the loss before and after.

Everything is found from the graph, no per-model map: the stream starts at the output of a ``Gather`` of a constant
table, continues through ``Add`` nodes one of whose inputs is the stream and the other a linear layer's output
(read by that Add only), and its other readers must be RMSNorms (decomposed: ``x·f(mean(x², -1))`` with ``f`` built
from constants, ``Sqrt``, ``Reciprocal``, ``Div`` and ``Pow``; an optional ``Mul`` by a constant γ) whose outputs
are read only by linear layers with constant weights (``Shape`` readers aside). A tied head (``MatMul`` with
``Transpose`` of the embedding table) gets its own rotated copy. Declined with the reason: no embedding ``Gather``,
a LayerNorm (its mean subtraction does not commute with ``Q``; a post-norm BERT-style model, whose residual sums go
straight into LayerNorms, is named as such), a stream tensor that is a graph output, a reader or writer of another
kind.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from qcompile.calibrate import activations
from qcompile.errors import ConfigError
from qcompile.ir import NameScope
from qcompile.match import Declined, const_value, producer
from qcompile.pass_infra import PassBase, PassContext, PassResult
from qcompile.passes._hadamard import kron_all, online_factors, random_orthogonal, randomized_hadamard
from qcompile.passes._linear import weight_rows
from qcompile.passes._scale_fold import value_readers
from qcompile.passes._spin import Site, learn_rotation, require_torch
from qcompile.types import ConfigBase, PassKind

logger = logging.getLogger(__name__)

NORM_SCALE_OPS = ("Add", "Sub", "Mul", "Div", "Sqrt", "Reciprocal", "Pow", "Cast")
ONLINE_SUFFIX = "_online_rotation"  # node name suffix of the run-time rotations (recipes keep them float by pattern)


@dataclass(frozen=True)
class RotateConfig(ConfigBase):
    # randomized Hadamard where d is a power of two (else random), "random", or "learned" (SpinQuant: optimized from
    # the Hadamard / random start on calibration activations, see passes/_spin.py; needs torch)
    rotation: str = "hadamard"
    seed: int = 0
    online: bool = False  # also rotate each residual writer's input at run time (QuaRot's R4 / a full-width R2)
    # learned rotations: the per-token activation quantizer they are learned for (= insert_qdq's activation_bits and
    # per_token_clip), Adam steps / learning rate / rows per step, and the calibration rows used
    act_bits: int = 4
    act_clip: float = 0.9
    steps: int = 100
    lr: float = 0.01
    batch: int = 256
    max_samples: int = 32
    max_tokens: int = 2048

    def validate(self) -> None:
        if self.rotation not in ("hadamard", "random", "learned"):
            raise ConfigError(f"rotate_residual.rotation must be hadamard, random or learned, got {self.rotation!r}")
        if isinstance(self.act_bits, bool) or not 2 <= self.act_bits <= 8:
            raise ConfigError(f"rotate_residual.act_bits must be in [2, 8], got {self.act_bits!r}")
        if not 0.0 < self.act_clip <= 1.0:
            raise ConfigError(f"rotate_residual.act_clip must be in (0, 1], got {self.act_clip!r}")
        for key in ("steps", "batch", "max_samples", "max_tokens"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < (0 if key == "steps" else 1):
                raise ConfigError(f"rotate_residual.{key} must be an integer >= {0 if key == 'steps' else 1}, "
                                  f"got {v!r}")
        if not self.lr > 0:
            raise ConfigError(f"rotate_residual.lr must be > 0, got {self.lr!r}")
        if self.rotation == "learned":
            require_torch()


def _scalar(t: gs.Tensor) -> bool:
    v = const_value(t)
    return v is not None and v.size == 1


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


@dataclass
class _Norm:
    """An RMSNorm reading the stream: ``y = h·r`` (``scale_node``), then optionally ``y·γ`` (``gamma_node``)."""

    scale_node: gs.Node
    gamma_node: gs.Node | None
    gamma_index: int
    out: gs.Tensor  # the normalized (and scaled) output the linear readers take

    def gamma(self, d: int) -> np.ndarray:
        if self.gamma_node is None:
            return np.ones(d)
        return np.broadcast_to(const_value(self.gamma_node.inputs[self.gamma_index]).astype(np.float64)
                               .reshape(-1), (d,))


def _match_norms(h: gs.Tensor, rank: int | None, d: int) -> tuple[list[_Norm], list[gs.Node], str]:
    """(norms reading ``h``, the other value readers, reason if something reads ``h`` that is neither)."""
    norms, others, squares = [], [], set()
    for r in value_readers(h):
        if r.op == "LayerNormalization":
            return [], [], f"{r.name}: a LayerNorm reads the residual stream (its mean subtraction does not commute " \
                           "with a rotation)"
        pos = [i for i, x in enumerate(r.inputs) if x is h]
        if r.op in ("Mul", "Div") and len(r.inputs) == 2 and len(pos) == 1 and (r.op == "Mul" or pos[0] == 0):
            seen: set[int] = set()  # h·r or r·h, or h / sqrt(mean(h²) + eps)
            if _norm_scale(r.inputs[1 - pos[0]], h, rank, seen):
                squares |= seen
                out = r.outputs[0]
                g_node, g_idx = None, 0
                rd = value_readers(out)
                if len(rd) == 1 and rd[0].op == "Mul":
                    k = 1 if rd[0].inputs[0] is out else 0
                    g = const_value(rd[0].inputs[k])
                    if g is not None and g.size in (1, d) and (g.ndim <= 1 or all(s == 1 for s in g.shape[:-1])):
                        g_node, g_idx, out = rd[0], k, rd[0].outputs[0]
                norms.append(_Norm(r, g_node, g_idx, out))
                continue
        others.append(r)
    rest = [r for r in others if id(r) not in squares]
    return norms, rest, ""


def _linear_weight_rows(node: gs.Node, x: gs.Tensor) -> np.ndarray | None:
    """W [K, N] of a MatMul reading ``x`` as input 0 with a constant 2-D float weight."""
    return weight_rows(node) if node.op == "MatMul" and node.inputs[0] is x else None


def _tied_head(node: gs.Node, x: gs.Tensor, table: gs.Tensor) -> bool:
    """MatMul(x, Transpose(E)) with the embedding table E (a tied LM head)."""
    if node.op != "MatMul" or node.inputs[0] is not x:
        return False
    tr = producer(node.inputs[1])
    return tr is not None and tr.op == "Transpose" and tr.inputs[0] is table and \
        list(tr.attrs.get("perm", [1, 0])) == [1, 0]


@dataclass
class _Plan:
    table: gs.Tensor
    gather: gs.Node
    stream: list[gs.Tensor]
    writers: list[gs.Node]  # linear layers whose output is added to the stream
    norms: list[_Norm]
    readers: list[tuple[gs.Node, _Norm]]  # linear layers reading a norm output


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


def _post_norm(graph: gs.Graph) -> str:
    """Why a post-norm (BERT-style) transformer cannot be rotated, or "": residual ``Add``s of a linear layer's output
    whose sums go only into a LayerNorm, in more than one block (a pre-norm model has one, before its final norm)."""
    found = []
    for add in (n for n in graph.nodes if n.op == "Add" and len(n.inputs) == 2):
        ln = _only_layernorm(add.outputs[0])
        if ln is None:
            continue
        for u in add.inputs:
            p = producer(u)
            if p is not None and p.op == "Add":  # a bias Add after the MatMul
                p = next((producer(x) for x in p.inputs if producer(x) is not None), None)
            if p is not None and p.op in ("MatMul", "Gemm") and const_value(p.inputs[1]) is not None:
                found.append((add, p, ln))
                break
    if len(found) < 2:
        return ""
    add, p, ln = found[0]
    return (f"post-norm transformer (BERT-style): {len(found)} residual sums go only into a LayerNorm (first: "
            f"{add.name}, of {p.name}, into {ln.name}); the stream is re-normalized with mean subtraction after "
            "every block, which a rotation folded into the weights does not commute with (needs a pre-norm "
            "RMSNorm stream)")


def _find(graph: gs.Graph) -> tuple[_Plan | None, str]:
    outputs = {t.name for t in graph.outputs}
    if why := _post_norm(graph):
        return None, why
    tables = {id(n): const_value(n.inputs[0]) for n in graph.nodes if n.op == "Gather"}
    gathers = [n for n in graph.nodes if n.op == "Gather" and (t := tables[id(n)]) is not None and t.ndim == 2
               and t.dtype.kind == "f" and int(n.attrs.get("axis", 0)) == 0]
    if len(gathers) != 1:
        return None, f"{len(gathers)} embedding Gathers of a 2-D float table (need exactly one)"
    gather = gathers[0]
    table = gather.inputs[0]
    d = int(const_value(table).shape[1])
    h = gather.outputs[0]
    rank = len(h.shape) if h.shape else None
    plan = _Plan(table, gather, [], [], [], [])
    while True:
        if h.name in outputs:
            return None, f"residual stream tensor {h.name!r} is a graph output (it would come out rotated)"
        plan.stream.append(h)
        norms, rest, why = _match_norms(h, rank, d)
        if why:
            return None, why
        plan.norms += norms
        adds = [r for r in rest if r.op == "Add"]
        if len(rest) != len(adds) or len(adds) > 1:
            kinds = sorted({r.op for r in rest})
            return None, f"residual stream tensor {h.name!r} is read by {kinds} besides RMSNorms and one Add"
        if not adds:
            break
        add = adds[0]
        u = add.inputs[1] if add.inputs[0] is h else add.inputs[0]
        w = producer(u)
        rows = None if w is None else _linear_weight_rows(w, w.inputs[0])
        if rows is None or rows.shape[1] != d or value_readers(u) != [add] or u.name in outputs:
            return None, f"{add.name}: the residual Add's other input is not a linear layer's output read only by it"
        plan.writers.append(w)
        h = add.outputs[0]
    if not plan.norms:
        return None, "no RMSNorm reads the residual stream"
    for norm in plan.norms:
        if norm.out.name in outputs:
            return None, f"norm output {norm.out.name!r} is a graph output"
        for r in value_readers(norm.out):
            if _linear_weight_rows(r, norm.out) is None and not _tied_head(r, norm.out, table):
                return None, f"{r.name} ({r.op}) reads the norm output {norm.out.name!r}: not a linear layer " \
                             "with a constant weight"
            plan.readers.append((r, norm))
    return plan, ""


class RotateResidualPass(PassBase):
    name = "rotate_residual"
    kind = PassKind.EQUIVALENCE

    def __init__(self, config: RotateConfig | None = None) -> None:
        self.config = config or RotateConfig()

    def call(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        plan, why = _find(graph)
        if plan is None:
            return PassResult(graph, False, {}, [Declined(self.name, graph.name or "model", "residual stream", why)])
        e = const_value(plan.table).astype(np.float64)
        d = e.shape[1]
        rng = np.random.default_rng(self.config.seed)
        q, kind = self._rotation(d, rng)
        heads = {id(r) for r, n in plan.readers if _tied_head(r, n.out, plan.table)}

        def reader_weight(r: gs.Node) -> np.ndarray:  # a tied head reads the (original) table
            return e.T if id(r) in heads else const_value(r.inputs[1])

        learn = self.config.rotation == "learned"
        learned: dict[str, dict] = {}
        if learn:
            if not ctx.samples:
                return PassResult(graph, False, {}, [Declined(self.name, graph.name or "model", "residual stream",
                                                              "no calibration samples: a learned rotation needs "
                                                              "activations")])
            rows = self._rows(graph, ctx, [n.scale_node.outputs[0].name for n in plan.norms]
                              + ([w.inputs[0].name for w in plan.writers] if self.config.online else []), rng)
            sites = [Site(rows[n.scale_node.outputs[0].name],
                          [n.gamma(d)[:, None] * reader_weight(r).astype(np.float64)
                           for r, m in plan.readers if m is n]) for n in plan.norms]
            q, learned["residual"] = self._learn(sites, q)
            kind = f"learned from {kind}"
        uniq = NameScope(graph)
        dtype = const_value(plan.table).dtype
        plan.gather.inputs[0] = gs.Constant(uniq(f"{plan.table.name}_rotated"), np.asarray(e @ q, dtype=dtype))
        online: dict[str, int] = {}
        for w_node in plan.writers:
            w = const_value(w_node.inputs[1]).astype(np.float64) @ q
            if self.config.online:  # x·W = (x·R)·(Rᵀ·W), x·R computed at run time
                factors, rkind = self._online(w.shape[0], rng)
                if learn:
                    factors, learned[w_node.name] = self._learn(
                        [Site(rows[w_node.inputs[0].name], [const_value(w_node.inputs[1])])], factors)
                    rkind = f"learned from {rkind}"
                _insert_online(graph, uniq, w_node, factors)
                w = kron_all(factors).T @ w
                key = rkind if len(factors) == 1 else f"{rkind} {'x'.join(str(len(f)) for f in factors)}"
                online[key] = online.get(key, 0) + 1
            w_node.inputs[1] = gs.Constant(uniq(f"{w_node.name}_rotated_W"),
                                           np.asarray(w, dtype=w_node.inputs[1].dtype))
        for r, norm in plan.readers:  # a tied head gets its own copy of the (original) table
            w = reader_weight(r)
            new = q.T @ (norm.gamma(d)[:, None] * w.astype(np.float64))
            r.inputs[1] = gs.Constant(uniq(f"{r.name}_rotated_W"),
                                      np.asarray(new, dtype=dtype if id(r) in heads else w.dtype))
        for norm in plan.norms:  # γ now lives in the readers
            if norm.gamma_node is not None:
                g = const_value(norm.gamma_node.inputs[norm.gamma_index])
                norm.gamma_node.inputs[norm.gamma_index] = gs.Constant(uniq(f"{norm.gamma_node.name}_unit_gamma"),
                                                                       np.ones_like(g))
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
        stats = {"rotation": kind, "hidden": d, "stream_tensors": len(plan.stream), "writers": len(plan.writers),
                 "norms": len(plan.norms), "readers": len(plan.readers),
                 "tied_head": bool(heads), "online": online}
        if learned:
            stats["learned_loss"] = {k: f"{v['loss_start']:.4g} -> {v['loss']:.4g}" for k, v in learned.items()}
        logger.info("rotate_residual: %s", stats)
        return PassResult(graph, True, stats, [])

    def _rows(self, graph: gs.Graph, ctx: PassContext, names: list[str], rng: np.random.Generator
              ) -> dict[str, np.ndarray]:
        """Up to ``max_tokens`` calibration rows [T, width] of each tensor, drawn evenly from the samples."""
        samples = ctx.samples[: self.config.max_samples]
        per = -(-self.config.max_tokens // len(samples))
        got: dict[str, list[np.ndarray]] = {n: [] for n in names}
        for values in activations(graph, ctx.model, samples, names):
            for n, v in values.items():
                v = np.asarray(v, np.float32).reshape(-1, np.shape(v)[-1])
                v = v[np.all(np.isfinite(v), axis=1)]
                got[n].append(v[rng.choice(len(v), min(per, len(v)), replace=False)])
        return {n: np.concatenate(v) for n, v in got.items()}

    def _learn(self, sites: list[Site], r0):
        c = self.config
        return learn_rotation(sites, r0, c.act_bits, c.act_clip, c.steps, c.lr, c.batch, c.seed)

    def _rotation(self, d: int, rng: np.random.Generator) -> tuple[np.ndarray, str]:
        if self.config.rotation in ("hadamard", "learned") and (h := randomized_hadamard(d, rng)) is not None:
            return h, "hadamard"
        return random_orthogonal(d, rng), "random"

    def _online(self, d: int, rng: np.random.Generator) -> tuple[list[np.ndarray], str]:
        if self.config.rotation in ("hadamard", "learned"):
            return online_factors(d, rng)
        return [random_orthogonal(d, rng)], "random"


def _insert_online(graph: gs.Graph, uniq: NameScope, w_node: gs.Node, factors: list[np.ndarray]) -> None:
    """``x·R`` before the writer, ``R = ⊗ factors``: one MatMul for a single factor; for ``A ⊗ B``, ``x`` reshaped to
    ``[…, a, b]``, ``Aᵀ·X·B`` (two MatMuls) and reshaped back. Every node is named ``…_online_rotation``."""
    x = w_node.inputs[0]
    dtype = w_node.inputs[1].dtype
    xr = gs.Variable(uniq(f"{x.name}_rotated"), dtype=x.dtype, shape=x.shape)

    def node(op: str, tag: str, inputs: list, outputs: list) -> None:
        graph.nodes.append(gs.Node(op, uniq(f"{w_node.name}{tag}{ONLINE_SUFFIX}"), inputs=inputs, outputs=outputs))

    def const(tag: str, value: np.ndarray) -> gs.Constant:
        return gs.Constant(uniq(f"{w_node.name}_online_{tag}"), value)

    if len(factors) == 1:
        node("MatMul", "", [x, const("R", np.asarray(factors[0], dtype=dtype))], [xr])
    else:
        a, b = (np.asarray(f, dtype=dtype) for f in factors)
        rank = len(x.shape) if x.shape is not None else None
        split = gs.Variable(uniq(f"{x.name}_split"), dtype=x.dtype)
        xb = gs.Variable(uniq(f"{x.name}_rotated_b"), dtype=x.dtype)
        xab = gs.Variable(uniq(f"{x.name}_rotated_ab"), dtype=x.dtype)
        if rank is not None:  # Reshape's 0 copies the leading dims (dynamic ones included)
            to = [0] * (rank - 1) + [len(a), len(b)]
            back = const("shape", np.array([0] * (rank - 1) + [len(a) * len(b)], dtype=np.int64))
        else:
            to, back = [-1, len(a), len(b)], gs.Variable(uniq(f"{x.name}_shape"), dtype=np.int64)
            node("Shape", "_shape", [x], [back])
        node("Reshape", "_split", [x, const("split", np.array(to, dtype=np.int64))], [split])
        node("MatMul", "_b", [split, const("B", b)], [xb])
        node("MatMul", "_a", [const("At", np.ascontiguousarray(a.T)), xb], [xab])
        node("Reshape", "_merge", [xab, back], [xr])
    w_node.inputs[0] = xr


__all__ = ["ONLINE_SUFFIX", "RotateConfig", "RotateResidualPass", "random_orthogonal", "randomized_hadamard"]
