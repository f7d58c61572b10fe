"""Residual-stream rotation (QuaRot / SpinQuant R1), found from the graph: an orthogonal ``Q`` folded into the weights.

A pre-norm transformer's residual stream ``h`` is only (a) written by its embedding and by the linear layers whose
outputs are added to it (attention's output projection, the MLP's down projection), and (b) read by RMSNorms, whose
outputs feed linear layers (Q/K/V, gate/up, the head). For an orthogonal ``Q`` [d, d]:

    RMSNorm(h·Q) = RMSNorm(h)·Q        (mean(h²) over the channels is ‖h‖²/d, which Q keeps)

so with every RMSNorm's weight γ first folded into its readers (``norm fusion``: ``y·diag(γ)·W = y·(diag(γ)·W)``,
γ := 1), the model computes the same function with

    E ← E·Q (embedding rows),   W_write ← W_write·Q (and bias·Q),   W_read ← Qᵀ·diag(γ)·W_read

and every activation on the stream and every norm output rotated. Outliers of single channels spread over all of
them (a randomized Hadamard ``diag(±1)·H/√d`` for any width ``d = m·2^k`` with a known Hadamard of order ``m``,
``passes/_hadamard.py``, else a random ``Q``: incoherent with any axis), which is what makes 4-bit activations and
weights possible. EQUIVALENCE: checked by the numerics instrument.

LayerNorm streams (ViT, GPT-2-style pre-LN; SliceGPT): ``LN(h) = γ·(h − mean(h))/σ + β`` does not commute with ``Q``,
but every reader of the stream is a LayerNorm, which subtracts the mean anyway, so the stream is centered first
(``C = I − 11ᵀ/d`` folded with ``Q``: ``W_write ← W_write·C·Q``, the start ``·C·Q``), the LayerNorms become RMSNorms
(the fused op replaced by ``x/√(mean(x²) + ε)``, the decomposed form loses its ``Sub``), γ goes into the readers and β
into their biases (``+ β·W``, into Gemm's C, a bias ``Add`` or a new one).

The start: an embedding ``Gather`` of a constant table takes ``E·C·Q``; any other start (ViT's patch embedding +
class token + position) gets ``MatMul(h₀, C·Q)`` at run time (``residual_stream_online_rotation``, kept float).

Online rotations (``online: true``): the input x of every residual writer (the MLP's down projection, attention's
output projection) is rotated at run time, ``x·W = (x·R)·(Rᵀ·W)``, ``Rᵀ`` folded into the writer: QuaRot's R4 before
the down projection, where the gated product's outliers sit; before the output projection a full rotation over all
heads (QuaRot splits it into a per-head rotation folded into V and an online one across heads). ``R = A ⊗ B``, a
randomized Hadamard of the width as two factors (12·128 for 1536), is applied as ``Reshape → MatMul(·, B) →
MatMul(Aᵀ, ·) → Reshape``: ``n·(a + b)`` multiply-adds per token and ``a² + b²`` constants instead of ``n²``
(``passes/_hadamard.py``); nodes are named ``<writer>_…_online_rotation`` and recipes keep them float
(``re:.*_online_rotation`` overrides): quantizing their input would undo them. A post-norm (BERT) model, whose stream
cannot be rotated (below), still gets these run-time rotations of its writers' inputs, which are exact anywhere.

Learned rotations (``rotation: learned``, SpinQuant): the residual rotation and every online one start from the
rotation above and are optimized in the orthogonal group (Cayley parametrization, torch) on calibration activations,
for the per-token activation quantizer the recipe uses (``act_bits``, ``act_clip``): the loss is each reader's
relative output error from quantizing its rotated input (``passes/_spin.py``); the online ``A ⊗ B`` is learned factor
by factor. Only which orthogonal matrix is folded changes, so the pass stays an EQUIVALENCE; stats ``learned_loss``
give the loss before and after.

Everything is found from the graph, no per-model map (``passes/_stream.py``): the stream is a chain of ``Add`` nodes of
a stream tensor and a linear layer's output (bias allowed, read by that Add only), whose tensors are otherwise read
only by RMSNorms or LayerNorms, whose outputs are read only by linear layers with constant weights (directly or
behind a class-token ``Gather`` / ``Slice``; ``Shape`` readers aside). A tied head (``MatMul`` with ``Transpose`` of
the embedding table) gets its own rotated copy. Declined with the reason: no such chain or more than one, a post-norm
BERT-style model (its residual sums go only into LayerNorms: re-normalized with mean subtraction after every block),
both RMSNorms and LayerNorms on one stream, a stream tensor that is a graph output, a reader or writer of another
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
from qcompile.match import Declined, const_value
from qcompile.pass_infra import PassBase, PassContext, PassResult
from qcompile.passes._hadamard import kron_all, online_factors, random_orthogonal, randomized_hadamard
from qcompile.passes._linear import weight_rows
from qcompile.passes._scale_fold import value_readers
from qcompile.passes._spin import Site, learn_rotation, require_torch
from qcompile.passes._stream import Norm, Plan, Reader, Writer, find_stream, post_norm, tied_head
from qcompile.types import ConfigBase, PassKind

logger = logging.getLogger(__name__)

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
    # OSTQuant: with a learned rotation, also learn a per-channel scale for each norm's output in the rotated basis
    # (the norm's γ := 1/s, its readers' weights ·s: exact); the loss then quantizes the readers' weights too
    # (weight_bits, per output channel)
    scaling: bool = False
    weight_bits: int = 4

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
        if isinstance(self.weight_bits, bool) or not 2 <= self.weight_bits <= 8:
            raise ConfigError(f"rotate_residual.weight_bits must be in [2, 8], got {self.weight_bits!r}")
        if self.scaling and self.rotation != "learned":
            raise ConfigError("rotate_residual.scaling needs rotation: learned (the scales are learned with it)")
        if self.rotation == "learned":
            require_torch()


class RotateResidualPass(PassBase):
    name = "rotate_residual"
    kind = PassKind.EQUIVALENCE

    def __init__(self, config: RotateConfig | None = None) -> None:
        self.config = config or RotateConfig()

    def call(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        plan, why = find_stream(graph, self._rank_of(graph, ctx))
        declined = Declined(self.name, graph.name or "model", "residual stream", why)
        if plan is None:
            writers = post_norm(graph)[1]
            if not (self.config.online and writers):
                return PassResult(graph, False, {}, [declined])
        if self.config.rotation == "learned" and not ctx.samples:
            return PassResult(graph, False, {}, [Declined(self.name, graph.name or "model", "residual stream",
                                                          "no calibration samples: a learned rotation needs "
                                                          "activations")])
        rng = np.random.default_rng(self.config.seed)
        uniq = NameScope(graph)
        if plan is None:  # post-norm: only the writers' inputs, rotated at run time
            online, learned = self._online(graph, ctx, uniq, writers, rng, {})
            graph.cleanup(remove_unused_graph_inputs=False).toposort()
            stats = {"rotation": "none (post-norm)", "writers": len(writers), "online": online}
            if learned:
                stats["learned_loss"] = _losses(learned)
            logger.info("rotate_residual: %s", stats)
            return PassResult(graph, True, stats, [declined])
        return self._rotate(graph, ctx, plan, uniq, rng)

    def _rotate(self, graph: gs.Graph, ctx: PassContext, plan: Plan, uniq: NameScope, rng: np.random.Generator
                ) -> PassResult:
        d = plan.d
        q, kind = self._rotation(d, rng)
        table = plan.table_gather.inputs[0] if plan.table_gather is not None else None
        e = const_value(table).astype(np.float64) if table is not None else None
        heads = {id(r.node) for r in plan.readers if tied_head(r.node, r.x, table)}

        def reader_weight(r: Reader) -> np.ndarray:  # a tied head reads the (original) table
            return e.T if id(r.node) in heads else weight_rows(r.node)

        learned: dict[str, dict] = {}
        rows: dict[str, np.ndarray] = {}
        if self.config.rotation == "learned":
            names = [n.rows or n.node.inputs[0].name for n in plan.norms]
            if self.config.online:
                names += [w.matmul.inputs[0].name for w in plan.writers]
            rows = self._rows(graph, ctx, names, rng)
            sites = [Site(_normalized(rows, n), [n.gamma(d)[:, None] * reader_weight(r).astype(np.float64)
                                                 for r in plan.readers if r.norm is n]) for n in plan.norms]
            q, learned["residual"] = self._learn(sites, q, scaled=self.config.scaling)
            kind = f"learned from {kind}"
        scales = learned.get("residual", {}).pop("scales", None) or [None] * len(plan.norms)
        scale_of = {id(n): sc for n, sc in zip(plan.norms, scales)}
        # SliceGPT: a LayerNorm stream is centered first (every writer's output and the start lose their mean over the
        # channels, which the LayerNorms subtract anyway), so that the LayerNorms become RMSNorms, which commute with q
        m = (np.eye(d) - 1.0 / d) @ q if plan.layernorm else q
        if table is not None:
            plan.table_gather.inputs[0] = gs.Constant(uniq(f"{table.name}_rotated"),
                                                      np.asarray(e @ m, dtype=const_value(table).dtype))
            start = "folded into the embedding table"
        else:
            _rotate_start(graph, uniq, plan.start, m)
            start = f"run-time MatMul {d}x{d} at {plan.start.name}"
        for w in plan.writers:
            _set_weight(w.matmul, weight_rows(w.matmul).astype(np.float64) @ m, uniq, "rotated_W")
            if w.bias_node is not None:
                b = const_value(w.bias_node.inputs[w.bias_index])
                w.bias_node.inputs[w.bias_index] = gs.Constant(
                    uniq(f"{w.bias_node.name}_rotated_b"),
                    np.asarray((b.reshape(-1).astype(np.float64) @ m).reshape(b.shape), dtype=b.dtype))
        online, learned_online = self._online(graph, ctx, uniq, plan.writers, rng, rows) if self.config.online \
            else ({}, {})
        for r in plan.readers:
            w = reader_weight(r).astype(np.float64)
            gamma, beta = r.norm.gamma(d), r.norm.beta(d)
            new = q.T @ (gamma[:, None] * w)
            if scale_of[id(r.norm)] is not None:
                new = scale_of[id(r.norm)][:, None] * new
            if id(r.node) in heads:  # its own copy of the (original) table
                r.node.inputs[1] = gs.Constant(uniq(f"{r.node.name}_rotated_W"),
                                               np.asarray(new, dtype=const_value(table).dtype))
            else:
                _set_weight(r.node, new, uniq, "rotated_W")
            if np.any(beta != 0):
                _add_bias(graph, uniq, r.node, beta @ w)
        for norm in plan.norms:
            _to_rms(graph, uniq, norm, plan.layernorm)
            if scale_of[id(norm)] is not None:
                _scale_output(graph, uniq, norm, 1.0 / scale_of[id(norm)])
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
        stats = {"rotation": kind, "hidden": d, "stream_tensors": len(plan.stream), "writers": len(plan.writers),
                 "norms": len(plan.norms), "readers": len(plan.readers), "tied_head": bool(heads), "start": start,
                 "online": online}
        if scales[0] is not None:
            stats["scaling"] = f"{len(plan.norms)} norms, scales {min(float(v.min()) for v in scales):.3g}-" \
                               f"{max(float(v.max()) for v in scales):.3g}"
        if plan.layernorm:
            stats["layernorm"] = f"{len(plan.norms)} LayerNorms made RMSNorms (stream centered, SliceGPT)"
        learned.update(learned_online)
        if learned:
            stats["learned_loss"] = _losses(learned)
        logger.info("rotate_residual: %s", stats)
        return PassResult(graph, True, stats, [])

    def _online(self, graph: gs.Graph, ctx: PassContext, uniq: NameScope, writers: list[Writer],
                rng: np.random.Generator, rows: dict[str, np.ndarray]) -> tuple[dict[str, int], dict[str, dict]]:
        """Every writer reads ``x·R`` computed at run time, ``Rᵀ`` folded into its weight: ``x·W = (x·R)·(Rᵀ·W)``."""
        learn = self.config.rotation == "learned"
        if learn and any(w.matmul.inputs[0].name not in rows for w in writers):
            rows = {**rows, **self._rows(graph, ctx, [w.matmul.inputs[0].name for w in writers], rng)}
        online: dict[str, int] = {}
        learned: dict[str, dict] = {}
        for w in writers:
            weight = weight_rows(w.matmul).astype(np.float64)
            factors, rkind = self._online_factors(weight.shape[0], rng)
            if learn:
                factors, learned[w.matmul.name] = self._learn(
                    [Site(rows[w.matmul.inputs[0].name], [weight])], factors)
                rkind = f"learned from {rkind}"
            _insert_online(graph, uniq, w.matmul, factors)
            _set_weight(w.matmul, kron_all(factors).T @ weight, uniq, "online_W")
            key = rkind if len(factors) == 1 else f"{rkind} {'x'.join(str(len(f)) for f in factors)}"
            online[key] = online.get(key, 0) + 1
        return online, learned

    @staticmethod
    def _rank_of(graph: gs.Graph, ctx: PassContext):
        """A tensor's rank measured on one calibration sample (None without samples)."""
        def rank_of(t: gs.Tensor) -> int | None:
            if not ctx.samples:
                return None
            values = next(iter(activations(graph, ctx.model, ctx.samples[:1], [t.name])))
            return int(np.ndim(values[t.name]))
        return rank_of

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

    def _learn(self, sites: list[Site], r0, scaled: bool = False):
        c = self.config
        return learn_rotation(sites, r0, c.act_bits, c.act_clip, c.steps, c.lr, c.batch, c.seed,
                              scale_weight_bits=c.weight_bits if scaled else None)

    def _rotation(self, d: int, rng: np.random.Generator) -> tuple[np.ndarray, str]:
        if self.config.rotation in ("hadamard", "learned") and (h := randomized_hadamard(d, rng)) is not None:
            return h, "hadamard"
        return random_orthogonal(d, rng), "random"

    def _online_factors(self, d: int, rng: np.random.Generator) -> tuple[list[np.ndarray], str]:
        if self.config.rotation in ("hadamard", "learned"):
            return online_factors(d, rng)
        return [random_orthogonal(d, rng)], "random"


def _losses(learned: dict[str, dict]) -> dict[str, str]:
    return {k: f"{v['loss_start']:.4g} -> {v['loss']:.4g}" for k, v in learned.items()}


def _normalized(rows: dict[str, np.ndarray], norm: Norm) -> np.ndarray:
    """The calibration rows of what the norm's readers take before γ and β (a fused LayerNorm normalized here)."""
    if norm.rows is not None:
        return rows[norm.rows]
    h = rows[norm.node.inputs[0].name].astype(np.float64)
    c = h - h.mean(axis=1, keepdims=True)
    return (c / np.sqrt(np.mean(c * c, axis=1, keepdims=True) + norm.eps)).astype(np.float32)


def _set_weight(node: gs.Node, w: np.ndarray, uniq: NameScope, tag: str) -> None:
    """A MatMul's or Gemm's weight from ``w`` [K, N] (transposed back for Gemm's transB), in its dtype."""
    old = const_value(node.inputs[1])
    if node.op == "Gemm" and int(node.attrs.get("transB", 0)):
        w = w.T
    node.inputs[1] = gs.Constant(uniq(f"{node.name}_{tag}"), np.asarray(w, dtype=old.dtype))


def _add_bias(graph: gs.Graph, uniq: NameScope, node: gs.Node, delta: np.ndarray) -> None:
    """Add the per-output-channel ``delta`` to a linear layer's output: into Gemm's C, a constant bias ``Add`` that
    alone reads a MatMul, or a new ``Add``."""
    y = node.outputs[0]
    dtype = const_value(node.inputs[1]).dtype
    if node.op == "Gemm":
        alpha, beta = float(node.attrs.get("alpha", 1.0)), float(node.attrs.get("beta", 1.0))
        c = const_value(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2].name else None
        if c is not None and beta != 0 and c.size in (1, delta.size):
            new = np.broadcast_to(c.reshape(-1).astype(np.float64), delta.shape) + delta * alpha / beta
            node.inputs[2] = gs.Constant(uniq(f"{node.name}_beta_C"), np.asarray(new, dtype=c.dtype))
            return
        if len(node.inputs) == 2:
            node.attrs["beta"] = 1.0
            node.inputs.append(gs.Constant(uniq(f"{node.name}_beta_C"), np.asarray(delta * alpha, dtype=dtype)))
            return
    readers = value_readers(y)
    if node.op == "MatMul" and len(readers) == 1 and readers[0].op == "Add" and len(y.outputs) == 1:
        add = readers[0]
        k = 1 if add.inputs[0] is y else 0
        b = const_value(add.inputs[k])
        if b is not None and b.size == delta.size and (b.ndim <= 1 or all(s == 1 for s in b.shape[:-1])):
            new = (b.reshape(-1).astype(np.float64) + delta).reshape(b.shape)
            add.inputs[k] = gs.Constant(uniq(f"{add.name}_beta_b"), np.asarray(new, dtype=b.dtype))
            return
    raw = gs.Variable(uniq(f"{y.name}_without_beta"), dtype=y.dtype, shape=y.shape)
    node.outputs[0] = raw
    graph.nodes.append(gs.Node("Add", uniq(f"{node.name}_norm_beta"), inputs=[
        raw, gs.Constant(uniq(f"{node.name}_norm_beta_b"), np.asarray(delta, dtype=dtype))], outputs=[y]))


def _scale_output(graph: gs.Graph, uniq: NameScope, norm: Norm, inv: np.ndarray) -> None:
    """The norm's output times ``inv`` per channel: its γ (left at 1 by :func:`_to_rms`), or a new ``Mul``."""
    out = norm.out
    if norm.gamma_node is not None and norm.kind != "layernorm" and norm.beta_node is None:
        g = const_value(norm.gamma_node.inputs[norm.gamma_index])
        norm.gamma_node.inputs[norm.gamma_index] = gs.Constant(uniq(f"{norm.gamma_node.name}_ost_scale"),
                                                               np.asarray(inv, dtype=g.dtype))
        return
    raw = gs.Variable(uniq(f"{out.name}_unscaled"), dtype=out.dtype, shape=out.shape)
    node = out.inputs[0]
    node.outputs[node.outputs.index(out)] = raw
    graph.nodes.append(gs.Node("Mul", uniq(f"{node.name}_ost_scale"), outputs=[out], inputs=[
        raw, gs.Constant(uniq(f"{node.name}_ost_scale_c"), np.asarray(inv, dtype=out.dtype or np.float32))]))


def _replace_input(node: gs.Node, old: gs.Tensor, new: gs.Tensor) -> None:
    for i, x in enumerate(list(node.inputs)):
        if x is old:
            node.inputs[i] = new


def _rotate_start(graph: gs.Graph, uniq: NameScope, start: gs.Tensor, m: np.ndarray) -> None:
    """``start·m`` at run time (not an embedding table to fold it into), read instead of ``start`` by the stream."""
    readers = list(start.outputs)
    rotated = gs.Variable(uniq(f"{start.name}_rotated"), dtype=start.dtype, shape=start.shape)
    graph.nodes.append(gs.Node("MatMul", uniq(f"residual_stream{ONLINE_SUFFIX}"), outputs=[rotated], inputs=[
        start, gs.Constant(uniq("residual_stream_R"), np.asarray(m, dtype=start.dtype or np.float32))]))
    for r in readers:
        _replace_input(r, start, rotated)


def _to_rms(graph: gs.Graph, uniq: NameScope, norm: Norm, layernorm: bool) -> None:
    """γ and β now live in the readers; a LayerNorm of the centered stream becomes an RMSNorm."""
    if norm.kind == "layernorm":  # x / sqrt(mean(x²) + eps) in place of the op, writing its output tensor
        ln = norm.node
        x, out = ln.inputs[0], ln.outputs[0]
        ln.outputs.clear()
        t = [gs.Variable(uniq(f"{ln.name}_rms_{k}"), dtype=x.dtype) for k in ("sq", "ms", "eps", "den")]
        opset = graph.opset or 17
        axes = gs.Constant(uniq(f"{ln.name}_rms_axes"), np.array([-1], dtype=np.int64))
        mean = gs.Node("ReduceMean", uniq(f"{ln.name}_rms_mean"), inputs=[t[0]] + ([axes] if opset >= 18 else []),
                       outputs=[t[1]], attrs={"keepdims": 1, **({} if opset >= 18 else {"axes": [-1]})})
        graph.nodes += [
            gs.Node("Mul", uniq(f"{ln.name}_rms_square"), inputs=[x, x], outputs=[t[0]]), mean,
            gs.Node("Add", uniq(f"{ln.name}_rms_add_eps"), outputs=[t[2]], inputs=[
                t[1], gs.Constant(uniq(f"{ln.name}_rms_eps"), np.array(norm.eps, dtype=x.dtype or np.float32))]),
            gs.Node("Sqrt", uniq(f"{ln.name}_rms_sqrt"), inputs=[t[2]], outputs=[t[3]]),
            gs.Node("Div", uniq(f"{ln.name}_rms_div"), inputs=[x, t[3]], outputs=[out])]
        return
    if norm.kind == "layernorm-decomposed":  # the centered tensor's readers read the stream itself
        c, h = norm.node.outputs[0], norm.node.inputs[0]
        for r in list(c.outputs):
            _replace_input(r, c, h)
    for node, index, value in ((norm.gamma_node, norm.gamma_index, 1.0), (norm.beta_node, norm.beta_index, 0.0)):
        if node is not None and index < len(node.inputs) and node.inputs[index].name:
            v = const_value(node.inputs[index])
            node.inputs[index] = gs.Constant(uniq(f"{node.name}_unit_{'gamma' if value else 'beta'}"),
                                             np.full_like(v, value))


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
