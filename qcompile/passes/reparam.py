"""RepQ-ViT scale reparameterization: per-channel quantizers at calibration, one per-tensor quantizer at inference,
with the difference folded into the producer (LayerNorm γ/β) or a Mul + Add, and into the consuming weights.

``targets: layernorm`` is RepQ-ViT (post-LayerNorm activations only); ``targets: all`` applies the same identity to
every activation read by constant-weight MatMul/Gemm nodes (GELU outputs feeding FFN2 carry the worst channel
outliers in BERT-like models: on MiniLM W4A4 it lifts cosine 0.764 -> 0.796, on the zoo ViT top-1 0.970 -> 0.974).

For X [..., C] (a LayerNorm output) read by MatMul/Gemm nodes ``Y = X·W + b`` with constant W [C, N], calibrate
per-channel asymmetric b-bit parameters (s_c, z_c). With ``s̃ = mean(s)``, ``z̃ = round(mean(z))``,
``r1 = s / s̃`` and ``r2 = z - z̃`` (integers):

    X'_c = X_c / r1_c + s̃·r2_c      =>  round(X'_c / s̃) + z̃ = round(X_c / s_c) + z_c       (same integer levels)
    W'_c = r1_c · W_c (row c)       b' = b - Σ_c s_c·r2_c·W_c  =>  X'·W' + b' = X·W + b       (fp32-exact)

so the per-tensor quantizer (s̃, z̃) on X' reproduces the per-channel quantizer on X level for level, and the float
graph is unchanged in real arithmetic (in fp32 up to the cancellation of the shift: see ``kind``). X' is produced by
folding 1/r1 and s̃·r2 into the LayerNorm's γ and β (γ' = γ/r1, β' = β/r1 + s̃·r2) when only those MatMuls read X,
else by a Mul + Add on the MatMul branch (post-LN BERT: the residual keeps X). (s̃, z̃) goes to
``ctx.qparam_hints`` for the Q/DQ pass. Ranges: per-channel min/max, or per-channel MSE-optimal clips, or RepQuant's
dual clipping: a lower and an upper clip per channel learned (Adam, straight-through rounding) to minimize the
quantized block output error ``||Q(X)·W - X·W||²`` on calibration tokens. Declined: LayerNorm outputs not read by
a constant-weight MatMul/Gemm, fewer than ``min_channels`` channels, no calibration samples.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from qcompile.calibrate import activations
from qcompile.errors import ConfigError
from qcompile.ir import NameScope
from qcompile.match import Declined, const_value, producer
from qcompile.overrides import OverrideMap
from qcompile.pass_infra import PassBase, PassContext, PassResult
from qcompile.passes._layernorm import affine_tail
from qcompile.passes._linear import linear_groups, weight_rows
from qcompile.types import ConfigBase, PassKind, QParams, QuantDType

logger = logging.getLogger(__name__)
RANGES = ("minmax", "mse", "dual_clip")


@dataclass(frozen=True)
class ReparamConfig(ConfigBase):
    bits: int = 8  # the activation bit width insert_qdq will use (uint8 storage)
    ranges: str = "minmax"
    max_samples: int = 32
    max_tokens: int = 4096  # calibration tokens kept per LayerNorm output for range search
    clip_steps: int = 150
    min_channels: int = 16
    # "layernorm": post-LayerNorm activations only (RepQ-ViT); "all": every activation read by constant-weight
    # MatMul/Gemm nodes (e.g. GELU outputs feeding FFN2), through a Mul + Add where no LayerNorm γ/β can absorb it.
    targets: str = "layernorm"
    overrides: dict = field(default_factory=dict)

    def validate(self) -> None:
        if not 2 <= self.bits <= 8:
            raise ConfigError(f"reparameterize.bits must be in [2, 8], got {self.bits}")
        if self.targets not in ("layernorm", "all"):
            raise ConfigError(f"reparameterize.targets must be 'layernorm' or 'all', got {self.targets!r}")
        if self.ranges not in RANGES:
            raise ConfigError(f"reparameterize.ranges must be one of {list(RANGES)}, got {self.ranges!r}")
        OverrideMap.build(self.overrides, {"reparam"}, "reparameterize.overrides")


def is_layernorm_output(x: gs.Tensor, channels: int) -> bool:
    """LayerNormalization's output, or a decomposed LayerNorm's affine tail Add(Mul(Div(...), γ), β)."""
    tail = affine_tail(x, channels)
    if tail is None:
        return False
    if tail.gamma_node.op == "LayerNormalization":
        return True
    norm = tail.gamma_node.inputs[1 - tail.gamma_index]
    return producer(norm) is not None and producer(norm).op == "Div"


def channel_ranges(xs: np.ndarray, bits: int, mode: str, w: np.ndarray, steps: int
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel (lo, hi) for tokens xs [T, C], both containing 0."""
    lo, hi = np.minimum(xs.min(axis=0), 0.0), np.maximum(xs.max(axis=0), 0.0)
    if mode == "minmax":
        return lo, hi
    levels = 2 ** bits - 1
    if mode == "mse":
        best, best_err = (lo, hi), np.full(xs.shape[1], np.inf)
        for a in np.linspace(0.3, 1.0, 15):
            for b in np.linspace(0.3, 1.0, 15):
                lo_, hi_ = lo * a, hi * b
                s = np.maximum((hi_ - lo_) / levels, 1e-12)
                z = np.round(-lo_ / s)
                q = np.clip(np.round(xs / s) + z, 0, levels)
                err = (((q - z) * s - xs) ** 2).mean(axis=0)
                better = err < best_err
                best_err = np.where(better, err, best_err)
                best = (np.where(better, lo_, best[0]), np.where(better, hi_, best[1]))
        return best
    return _dual_clip(xs, lo, hi, levels, w, steps)


def _dual_clip(xs: np.ndarray, lo: np.ndarray, hi: np.ndarray, levels: int, w: np.ndarray, steps: int
               ) -> tuple[np.ndarray, np.ndarray]:
    """RepQuant's learnable per-channel lower/upper clips: minimize ||Q(X)W - XW||² (straight-through rounding)."""
    import torch

    torch.manual_seed(0)
    x = torch.from_numpy(xs.astype(np.float32))
    wt = torch.from_numpy(w.astype(np.float32))
    ref = x @ wt
    lo_p = torch.nn.Parameter(torch.from_numpy(lo.astype(np.float32)))
    hi_p = torch.nn.Parameter(torch.from_numpy(hi.astype(np.float32)))
    opt = torch.optim.Adam([lo_p, hi_p], lr=float(np.abs(hi - lo).mean()) * 0.01)

    def fake_quant() -> torch.Tensor:
        lo_t, hi_t = torch.clamp(lo_p, max=0.0), torch.clamp(hi_p, min=0.0)
        s = torch.clamp((hi_t - lo_t) / levels, min=1e-8)
        z = torch.round(-lo_t / s).detach() + (-lo_t / s - (-lo_t / s).detach())
        v = x / s + z
        q = torch.clamp(v + (torch.round(v) - v).detach(), 0, levels)
        return (q - z) * s

    with torch.no_grad():
        start = float(((fake_quant() @ wt - ref) ** 2).mean())
    best = (lo.copy(), hi.copy(), start)
    for _ in range(steps):
        opt.zero_grad()
        loss = ((fake_quant() @ wt - ref) ** 2).mean()
        if float(loss.detach()) < best[2]:  # the loss of the current clips, recorded before the step moves them
            best = (np.minimum(lo_p.detach().numpy(), 0.0).copy(), np.maximum(hi_p.detach().numpy(), 0.0).copy(),
                    float(loss.detach()))
        loss.backward()
        opt.step()
    return best[0].astype(np.float64), best[1].astype(np.float64)


def reparam_params(lo: np.ndarray, hi: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray, float, float]:
    """Per-channel (s, z) of asymmetric b-bit quantizers on [lo, hi] and the per-tensor (s̃, z̃) = (mean s, round
    mean z)."""
    levels = 2 ** bits - 1
    s = np.maximum((hi - lo) / levels, 1e-8)
    z = np.clip(np.round(-lo / s), 0, levels)
    return s, z, float(s.mean()), float(np.clip(np.round(z.mean()), 0, levels))


class ReparameterizePass(PassBase):
    name = "reparameterize"
    # Exact in real arithmetic, but not fp32-exact: the shift s̃·r2 is added before and subtracted after the
    # MatMul, and the cancellation costs ~1e-5 relative where zero points differ a lot between channels (MiniLM:
    # 111 dB output SQNR). So it is APPROXIMATE; the numerics instrument measures and reports its deviation.
    kind = PassKind.APPROXIMATE

    def __init__(self, config: ReparamConfig | None = None) -> None:
        self.config = config or ReparamConfig()
        self.overrides = OverrideMap.build(self.config.overrides, {"reparam"}, "reparameterize.overrides")

    def _tokens(self, graph: gs.Graph, ctx: PassContext, names: list[str]) -> dict[str, np.ndarray]:
        acc: dict[str, list[np.ndarray]] = {n: [] for n in names}
        for values in activations(graph, ctx.model, ctx.samples[: self.config.max_samples], names):
            for n, v in values.items():
                acc[n].append(np.asarray(v, np.float32).reshape(-1, v.shape[-1]))
        out = {}
        rng = np.random.default_rng(0)
        for n, parts in acc.items():
            t = np.concatenate(parts)
            if len(t) > self.config.max_tokens:
                t = t[np.sort(rng.choice(len(t), self.config.max_tokens, replace=False))]
            out[n] = t.astype(np.float64)
        return out

    def call(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        declined: list[Declined] = []
        if not ctx.samples:
            declined.append(Declined(self.name, "", "", "no calibration samples: per-channel ranges are needed"))
            return PassResult(graph, False, {"reparameterized": 0}, declined)
        accept = (lambda x, c: True) if self.config.targets == "all" else is_layernorm_output
        groups = linear_groups(graph, self.name, self.overrides, "reparam", self.config.min_channels, declined,
                               lambda x, c: producer(x) is not None and accept(x, c))
        if not groups:
            return PassResult(graph, False, {"reparameterized": 0}, declined)
        tokens = self._tokens(graph, ctx, list(groups))
        cfg, uniq = self.config, NameScope(graph)
        report: dict[str, dict] = {}
        for name, (x, nodes) in groups.items():
            xs = tokens[name]
            w_all = np.concatenate([weight_rows(n).astype(np.float64) for n in nodes], axis=1)
            lo, hi = channel_ranges(xs, cfg.bits, cfg.ranges, w_all, cfg.clip_steps)
            s, z, s_t, z_t = reparam_params(lo, hi, cfg.bits)
            r1, r2 = s / s_t, z - z_t
            for n in nodes:
                fix = self._rewrite_consumer(n, r1, s * r2, uniq)
                if fix is not None:
                    graph.nodes.append(fix)
            others = [c for c in x.outputs if c not in nodes and c.op != "Shape"]  # Shape reads no values
            tail = affine_tail(x, s.size) if not others else None
            if tail is not None:
                g, b = tail.values()
                tail.set(g.reshape(-1) / r1, b.reshape(-1) / r1 + s_t * r2, uniq, "reparam")
                target = x
            else:
                target = self._insert_affine(graph, x, nodes, 1.0 / r1, s_t * r2, uniq)
            ctx.qparam_hints[target.name] = QParams(np.array(s_t, np.float32),
                                                    np.array(z_t, QuantDType.UINT8.numpy))
            report[name] = {"channels": int(s.size), "scale_ratio_max_over_min": round(float(s.max() / s.min()), 2),
                            "per_tensor_scale": s_t, "zero_point": int(z_t), "folded": tail is not None,
                            "hinted_tensor": target.name, "consumers": [n.name for n in nodes],
                            "channel_min": xs.min(axis=0).tolist(), "channel_max": xs.max(axis=0).tolist(),
                            "clip_lo": lo.tolist(), "clip_hi": hi.tolist()}
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
        return PassResult(graph, True, {"reparameterized": len(report), "ranges": cfg.ranges, "bits": cfg.bits,
                                        "tensors": report}, declined)

    @staticmethod
    def _rewrite_consumer(n: gs.Node, r1: np.ndarray, shift: np.ndarray, uniq: NameScope) -> gs.Node | None:
        """W' = r1 ⊙ W (rows), b' = b - shift·W, where shift = s ⊙ r2; returns a bias Add to insert, if needed."""
        fix = None
        w = const_value(n.inputs[1])
        trans = n.op == "Gemm" and int(n.attrs.get("transB", 0))
        rows = weight_rows(n).astype(np.float64)
        delta = shift @ rows  # [N]
        w_new = (rows * r1[:, None]).T if trans else rows * r1[:, None]
        if n.op == "Gemm":
            alpha = float(n.attrs.get("alpha", 1.0))
            delta = delta * alpha
            beta = float(n.attrs.get("beta", 1.0))
            has_c = len(n.inputs) > 2 and n.inputs[2].name
            c = const_value(n.inputs[2]).astype(np.float64) * beta if has_c else np.zeros(delta.shape)
            n.attrs["beta"] = 1.0
            c_t = gs.Constant(uniq(f"{n.name}_reparam_C"), np.array(np.broadcast_to(c, delta.shape) - delta,
                                                                    dtype=w.dtype))
            if has_c:
                n.inputs[2] = c_t
            else:
                n.inputs.append(c_t)
        else:
            y = n.outputs[0]
            add = y.outputs[0] if len(y.outputs) == 1 and y.outputs[0].op == "Add" else None
            bidx = next((i for i, t in enumerate(add.inputs) if const_value(t) is not None), None) if add else None
            if add is not None and bidx is not None and const_value(add.inputs[bidx]).shape == delta.shape:
                b = const_value(add.inputs[bidx]).astype(np.float64)
                add.inputs[bidx] = gs.Constant(uniq(f"{add.name}_reparam_bias"), np.array(b - delta, dtype=w.dtype))
            else:
                y_new = gs.Variable(uniq(f"{y.name}_pre_reparam"), dtype=y.dtype, shape=y.shape)
                n.outputs[0] = y_new
                fix = gs.Node("Add", uniq(f"{n.name}_reparam_bias_Add"),
                              inputs=[y_new, gs.Constant(uniq(f"{n.name}_reparam_bias"),
                                                         np.array(-delta, dtype=w.dtype))], outputs=[y])
        n.inputs[1] = gs.Constant(uniq(f"{n.name}_reparam_W"), np.array(w_new, dtype=w.dtype))
        return fix

    @staticmethod
    def _insert_affine(graph: gs.Graph, x: gs.Tensor, nodes: list[gs.Node], mul: np.ndarray, add: np.ndarray,
                       uniq: NameScope) -> gs.Tensor:
        xm = gs.Variable(uniq(f"{x.name}_reparam_scaled"), dtype=x.dtype, shape=x.shape)
        xr = gs.Variable(uniq(f"{x.name}_reparam"), dtype=x.dtype, shape=x.shape)
        graph.nodes.append(gs.Node("Mul", uniq(f"{x.name}_reparam_Mul"), inputs=[
            x, gs.Constant(uniq(f"{x.name}_reparam_inv_r1"), np.array(mul, dtype=np.float32))], outputs=[xm]))
        graph.nodes.append(gs.Node("Add", uniq(f"{x.name}_reparam_Add"), inputs=[
            xm, gs.Constant(uniq(f"{x.name}_reparam_shift"), np.array(add, dtype=np.float32))], outputs=[xr]))
        for n in nodes:
            n.inputs[0] = xr
        return xr
