"""AWQ (Lin et al., 2024): activation-aware per-input-channel weight scales and a per-block clipping search for
low-bit block-wise weights (weight-only, w4a16), handed to insert_qdq as weight hints.

Identity, for an activation X [..., K] read by MatMul/Gemm nodes with constant weights W [K, N] (one group: Q/K/V,
gate/up, ... share X and one ``s``)::

    X·W = (X·diag(1/s))·(diag(s)·W)                                    (fp32-exact up to rounding)

``s`` is folded by the shared helper :func:`qcompile.passes._scale_fold.fold_input_scale` (weights' rows take s;
1/s goes into an RMSNorm / LayerNorm γ, a preceding linear, one factor of a gated product, or one inserted Mul), so
the float model computes the same function: the pass is an EQUIVALENCE pass, checked by the numerics instrument.
What changes is what the block quantizer Q (``bits``, ``weight_block`` rows of K per scale, ``symmetric``: exactly
insert_qdq's weight-only per-block quantizer) does to the scaled weights. Per group, on calibration rows X (all
tokens of up to ``max_samples`` samples, through H = XᵀX):

1. scales ``s = m^α / sqrt(max m^α · min m^α)`` with ``m_j = mean|X_j|`` (channels never active: m = min of the
   active ones), α from ``alpha_grid`` minimizing ``‖X·W − (X/s)·Q(s·W)‖² = tr(DᵀHD)``, ``D = W − Q(s·W)/s``.
   α = 0 (always tried) is s = 1, round-to-nearest: the chosen scales never do worse than RTN on the calibration data.
2. clipping: for each block b and output column n, the shrink ratio r from ``clip_grid`` minimizing that block's
   share of the output error ``d_bnᵀ H'_bb d_bn`` (``H' = H / (s·sᵀ)``, the statistics of X/s; ``d = w − Q_r(w)``,
   ``Q_r``: the block's range scaled by r before its scale is taken). The clipped solution is kept only if the
   whole ``tr(DᵀH'D)`` is not larger than without clipping.

Hand-off: ``ctx.weight_hints[W' name] = (integers, QParams(scale, zero point, axis = K axis, block_size))``, the
integers of the final (scaled) weight W' in the graph on the chosen clip grid, computed after every group is folded
(a later fold into a preceding linear rescales W' columns). Hints rather than clipped float weights, because a hint
is exact with respect to the final quantizer: insert_qdq stores those integers and scales as they are, whereas a
clipped float weight would be re-quantized by insert_qdq from its new range, and the float model would no longer be
the original function (the pass would stop being an equivalence, and any later weight pass would see altered W).
With ``hints: false`` only step 1 runs (the scales are folded, nothing is hinted): a later reconstruct_weights picks
the integers of the scaled weights by GPTQ, which also compensates rounding across blocks (AWQ's clipping treats
each block alone).
Declined: groups with fewer than ``min_channels`` channels, non-finite activations, weights read by other nodes too,
linear nodes inside If/Loop/Scan bodies (they keep insert_qdq's round-to-nearest).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from qcompile import quant_math
from qcompile.calibrate import activations
from qcompile.errors import ConfigError
from qcompile.ir import NameScope, iter_graphs
from qcompile.match import Declined, const_value
from qcompile.overrides import OverrideMap
from qcompile.pass_infra import PassBase, PassContext, PassResult
from qcompile.passes._linear import linear_groups, weight_rows
from qcompile.passes._scale_fold import fold_input_scale
from qcompile.types import ConfigBase, PassKind, QuantDType

logger = logging.getLogger(__name__)

BLOCKS = (16, 32, 64, 128, 256)


@dataclass(frozen=True)
class AWQConfig(ConfigBase):
    bits: int = 4  # = insert_qdq.weight_bits
    weight_block: int = 32  # = insert_qdq.weight_block (per_block granularity)
    symmetric: bool = True  # = insert_qdq.weight_symmetric
    alpha_grid: tuple[float, ...] = tuple(round(0.05 * i, 2) for i in range(21))
    clip: bool = True
    hints: bool = True  # False: scales only (the equivalence); a later reconstruct_weights (GPTQ) picks the integers
    clip_grid: tuple[float, ...] = tuple(round(1.0 - 0.05 * i, 2) for i in range(11))  # 1.0 .. 0.5
    max_samples: int = 32
    min_channels: int = 16
    overrides: dict = field(default_factory=dict)

    def validate(self) -> None:
        if isinstance(self.bits, bool) or not 2 <= self.bits <= 4:
            raise ConfigError(f"awq.bits must be in [2, 4] (block-wise int4 storage), got {self.bits!r}")
        if self.weight_block not in BLOCKS:
            raise ConfigError(f"awq.weight_block must be one of {list(BLOCKS)}, got {self.weight_block!r}")
        if not self.alpha_grid or any(not 0.0 <= a <= 1.0 for a in self.alpha_grid):
            raise ConfigError(f"awq.alpha_grid must be values in [0, 1], got {list(self.alpha_grid)}")
        if not self.clip_grid or any(not 0.0 < r <= 1.0 for r in self.clip_grid):
            raise ConfigError(f"awq.clip_grid must be ratios in (0, 1], got {list(self.clip_grid)}")
        if self.max_samples < 1 or self.min_channels < 1:
            raise ConfigError("awq.max_samples and awq.min_channels must be >= 1")
        OverrideMap.build(self.overrides, {"awq"}, "awq.overrides")


def awq_scales(m: np.ndarray, alpha: float) -> np.ndarray:
    """``s = m^α`` normalized to geometric-mean-of-extremes 1, inactive channels at the smallest active mean."""
    active = m[m > 0]
    m = np.where(m > 0, m, active.min() if active.size else 1.0)
    s = np.power(m, alpha)
    return np.clip(s / np.sqrt(s.max() * s.min()), 1e-4, 1e4)


class _Quantizer:
    """insert_qdq's weight-only block quantizer on rows [K, N] (blocks along K)."""

    def __init__(self, cfg: AWQConfig) -> None:
        self.cfg = cfg
        self.dtype = QuantDType.INT8 if cfg.symmetric else QuantDType.UINT8

    def params(self, w: np.ndarray, axis: int = 0, ratio=None):
        return quant_math.block_qparams(w, axis, self.cfg.weight_block, self.dtype, self.cfg.symmetric,
                                        self.cfg.bits, ratio)

    def integers(self, w: np.ndarray, qp) -> np.ndarray:
        return quant_math.quantize_weight(w, qp, self.dtype, self.cfg.symmetric, self.cfg.bits)

    def fake(self, w: np.ndarray, ratio=None) -> np.ndarray:
        qp = self.params(w, 0, ratio)
        return quant_math.dequantize(self.integers(w, qp), qp).astype(np.float64)


def output_error(d: np.ndarray, h: np.ndarray) -> float:
    """``tr(DᵀHD)`` = ‖X·D‖² for H = XᵀX."""
    return float(np.sum((h @ d) * d))


def block_errors(d: np.ndarray, h: np.ndarray, block: int) -> np.ndarray:
    """[nb, N]: ``d_bᵀ H_bb d_b`` per block b (rows of K) and column."""
    k = d.shape[0]
    return np.stack([np.sum((h[i:i + block, i:i + block] @ d[i:i + block]) * d[i:i + block], axis=0)
                     for i in range(0, k, block)])


class AWQPass(PassBase):
    name = "awq"
    kind = PassKind.EQUIVALENCE

    def __init__(self, config: AWQConfig | None = None) -> None:
        self.config = config or AWQConfig()
        self.overrides = OverrideMap.build(self.config.overrides, {"awq"}, "awq.overrides")

    def _statistics(self, graph: gs.Graph, ctx: PassContext, names: list[str]) -> dict[str, tuple]:
        """Per activation: (mean |x| per channel, H = XᵀX, rows) over the samples, or a reason string."""
        acc: dict[str, list] = {}
        for values in activations(graph, ctx.model, ctx.samples[: self.config.max_samples], names):
            for n, v in values.items():
                v = np.asarray(v, np.float64)
                v = v.reshape(-1, v.shape[-1])
                if n in acc and isinstance(acc[n], str):
                    continue
                if not np.all(np.isfinite(v)):
                    acc[n] = "activation has non-finite values"
                    continue
                a = acc.setdefault(n, [np.zeros(v.shape[1]), np.zeros((v.shape[1], v.shape[1])), 0])
                a[0] += np.abs(v).sum(axis=0)
                a[1] += v.T @ v
                a[2] += v.shape[0]
        return {n: (a if isinstance(a, str) else (a[0] / max(a[2], 1), a[1], a[2])) for n, a in acc.items()}

    def _alpha(self, w: np.ndarray, m: np.ndarray, h: np.ndarray, qz: _Quantizer) -> tuple[float, dict]:
        errs = {}
        for a in sorted({0.0, *self.config.alpha_grid}):  # α = 0 (RTN) always: never worse than RTN
            s = awq_scales(m, a)
            errs[a] = output_error(w - qz.fake(w * s[:, None]) / s[:, None], h)
        return min(errs, key=errs.get), errs

    def _clip(self, w: np.ndarray, h: np.ndarray, qz: _Quantizer) -> tuple[np.ndarray, float, float]:
        """(ratios [nb, N], error unclipped, error with the ratios) for rows w [K, N] under H."""
        block = self.config.weight_block
        base = qz.fake(w)
        best_err = block_errors(w - base, h, block)
        best = np.ones_like(best_err)
        for r in self.config.clip_grid:
            if r == 1.0:
                continue
            e = block_errors(w - qz.fake(w, r), h, block)
            better = e < best_err
            best, best_err = np.where(better, r, best), np.where(better, e, best_err)
        return best, output_error(w - base, h), output_error(w - qz.fake(w, best), h)

    def call(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        cfg = self.config
        declined: list[Declined] = []
        stats: dict = {"groups": 0, "scaled": 0, "hinted": 0, "layers": []}
        if not ctx.samples:
            declined.append(Declined(self.name, "", "", "no calibration samples: AWQ needs activations"))
            return PassResult(graph, False, stats, declined)
        for sub in list(iter_graphs(graph))[1:]:
            n = sum(node.op in ("MatMul", "Gemm") for node in sub.nodes)
            if n:
                declined.append(Declined(self.name, sub.name, "subgraph", f"AWQ inside If/Loop/Scan bodies is not "
                                         f"supported: {n} linear nodes keep round-to-nearest"))
        groups = linear_groups(graph, self.name, self.overrides, "awq", cfg.min_channels, declined)
        for name in list(groups):
            nodes = groups[name][1]
            shared = [n for n in nodes if len(n.inputs[1].outputs) > 1]
            if shared:
                declined.append(Declined(self.name, shared[0].name, shared[0].op, "weight read by other nodes too"))
                del groups[name]
        st = self._statistics(graph, ctx, list(groups)) if groups else {}
        qz = _Quantizer(cfg)
        uniq = NameScope(graph)
        where: dict[str, int] = {}
        plan = []  # (nodes, H of X/s, entry)
        for name, (x, nodes) in groups.items():
            s_ = st.get(name, "no activations collected")
            if isinstance(s_, str):
                declined.append(Declined(self.name, nodes[0].name, nodes[0].op, s_))
                continue
            m, h, _ = s_
            w = np.concatenate([weight_rows(n) for n in nodes], axis=1).astype(np.float64)
            alpha, errs = self._alpha(w, m, h, qz)
            ref = max(output_error(w, h), 1e-30)
            entry = {"group": name, "nodes": [n.name for n in nodes], "alpha": alpha,
                     "rtn_rel_err": errs[0.0] / ref, "scaled_rel_err": errs[alpha] / ref}
            if alpha > 0:
                s = awq_scales(m, alpha)
                kind = fold_input_scale(graph, x, nodes, s, uniq, "awq")
                where[kind] = where.get(kind, 0) + 1
                h = h / np.outer(s, s)
                stats["scaled"] += 1
            plan.append((nodes, h, entry))
            stats["groups"] += 1
        for nodes, h, entry in plan if cfg.hints else []:  # every fold done: the weights are final
            total = [0.0, 0.0]
            ref = 0.0
            for node in nodes:
                w = weight_rows(node).astype(np.float64)
                ref += output_error(w, h)
                ratio = np.ones((-(-w.shape[0] // cfg.weight_block), w.shape[1]))
                if cfg.clip:
                    ratio, before, after = self._clip(w, h, qz)
                    if after > before:
                        ratio, after = np.ones_like(ratio), before
                    total = [total[0] + before, total[1] + after]
                wt = const_value(node.inputs[1])
                trans = node.op == "Gemm" and int(node.attrs.get("transB", 0))
                qp = qz.params(wt, 1 if trans else 0, ratio.T if trans else ratio)
                ctx.weight_hints[node.inputs[1].name] = (qz.integers(wt, qp), qp)
                stats["hinted"] += 1
            entry["clipped_rel_err"] = total[1] / max(ref, 1e-30) if cfg.clip else entry["scaled_rel_err"]
            stats["layers"].append(entry)
        if plan:
            key = "clipped_rel_err" if cfg.hints else "scaled_rel_err"
            stats["mean_error_ratio_vs_rtn"] = float(np.mean([e[key] / max(e["rtn_rel_err"], 1e-30)
                                                              for _, _, e in plan]))
            if not cfg.hints:
                stats["layers"] = [e for _, _, e in plan]
        stats["folded"] = {k: v for k, v in where.items() if k != "inserted"}
        stats["mul_inserted"] = where.get("inserted", 0)
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
        logger.info("awq: %d groups, %d scaled, %d weights hinted", stats["groups"], stats["scaled"], stats["hinted"])
        return PassResult(graph, stats["scaled"] > 0, stats, declined)
