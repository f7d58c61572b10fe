"""SmoothQuant: migrate activation outliers into the weights, per input channel, α searched per layer.

Identity, for an activation X [..., K] read by MatMul/Gemm nodes with constant weights W [K, N]:

    X·W = (X·diag(1/s))·(diag(s)·W),    s_j = max|X_j|^α / max|W_j|^(1-α)

(max|W_j| over row j of every consumer's weight: Q/K/V, or gate/up, share one ``s``). Per-tensor activation
quantization of X·diag(1/s) then sees flattened channels while the weights, quantized per output channel, absorb the
range. ``1/s`` is folded upstream where the graph allows it (``_scale_fold``: an RMSNorm / LayerNorm γ (β), a
preceding linear, one factor of a gated product such as SwiGLU's ``silu(gate)·up`` before the down projection);
and attention's output projection takes ``s`` from the V projection's columns (``_channel_path``: ``s`` tied over the
query heads that share one KV head); otherwise one ``Mul(X, 1/s)`` feeds the smoothed consumers while other readers
(a residual Add) keep X. The rewrite is fp32-exact up to rounding (an EQUIVALENCE pass, checked by the numerics
instrument).

α: one fixed value (``alpha``), or with ``search`` chosen per layer group from ``alpha_grid`` (and "no smoothing") by
the error of the group's quantized output on calibration rows: ``‖X·W − Qa(X/s)·Qw(s·W)‖²`` with ``Qa`` per-tensor
asymmetric (``activation_bits``, min/max range; with ``per_token``, symmetric per row, as insert_qdq's run-time
per-token activations) and ``Qw`` per-output-channel symmetric (``weight_bits``), the quantizers insert_qdq applies.
A group where no α beats leaving it alone is declined with that reason. ``Qw`` works column by column, so with
``search_columns`` the error is measured on that many evenly spread output columns, a sample of the whole (the
w8a8 recipes: 512; a decoder's gate/up pair has thousands). With ``holdout`` (the w8a8 recipes) s is computed from
the channel maxima of half the calibration samples (the even ones) and the error measured on rows of the other
half: s set from the very maxima it is judged on flattens the channels to exactly the calibration range and leaves
unseen tokens that exceed a channel's maximum to be clipped, which that search cannot see (minilm, 96 test
sentences: output SQNR 15.3 dB unsmoothed, 13.4 dB searched in-sample, 19.8 dB held out). The fold then uses every
sample's maxima.
Declined: activations with a non-constant or shared-differently weight reader, Gemm with transA, fewer than
``min_channels`` channels.
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
from qcompile.passes._channel_path import MOVES, SELECTS, ChannelPath, channel_map, trace
from qcompile.passes._linear import linear_groups, weight_rows
from qcompile.passes._scale_fold import (
    divide_channels,
    fold_input_scale,
    foldable,
    scale_weight_rows,
)
from qcompile.types import ConfigBase, PassKind

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SmoothConfig(ConfigBase):
    alpha: float = 0.5
    search: bool = False  # α per group from alpha_grid, by quantized output error on calibration rows
    alpha_grid: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
    weight_bits: int = 8  # the quantizers the search models (those of the insert_qdq that follows)
    activation_bits: int = 8
    per_token: bool = False  # the search models per-token activations (insert_qdq per_token: all), not per tensor
    search_rows: int = 2048  # calibration rows (tokens) per group the search evaluates
    search_columns: int = 0  # output columns (evenly spread) the search evaluates; 0: all
    holdout: bool = False  # the search's s from even samples' maxima, its error on odd samples' rows (see above)
    max_samples: int = 32
    min_channels: int = 16
    overrides: dict = field(default_factory=dict)

    def validate(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"smooth_quant.alpha must be in [0, 1], got {self.alpha}")
        if not self.alpha_grid or any(not 0.0 <= a <= 1.0 for a in self.alpha_grid):
            raise ConfigError(f"smooth_quant.alpha_grid must be values in [0, 1], got {list(self.alpha_grid)}")
        for key in ("weight_bits", "activation_bits"):
            if not 2 <= getattr(self, key) <= 8:
                raise ConfigError(f"smooth_quant.{key} must be in [2, 8], got {getattr(self, key)}")
        if self.search_rows < 16:
            raise ConfigError(f"smooth_quant.search_rows must be >= 16, got {self.search_rows}")
        if self.search_columns < 0:
            raise ConfigError(f"smooth_quant.search_columns must be >= 0 (0: all), got {self.search_columns}")
        OverrideMap.build(self.overrides, {"smooth"}, "smooth_quant.overrides")


def smoothing_scales(xa: np.ndarray, wa: np.ndarray, alpha: float) -> np.ndarray:
    """``s_j = max|X_j|^α / max|W_j|^(1-α)``, 1 where a channel is never active or has no weight, within
    [1e-5, 1e5]."""
    s = np.where((xa > 0) & (wa > 0), np.power(xa, alpha) / np.power(np.maximum(wa, 1e-12), 1 - alpha), 1.0)
    return np.clip(s, 1e-5, 1e5)


def _fake_quant_act(x: np.ndarray, bits: int) -> np.ndarray:
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    scale = (hi - lo) / ((1 << bits) - 1) or 1.0
    zp = np.round(-lo / scale)
    return (np.clip(np.round(x / scale) + zp, 0, (1 << bits) - 1) - zp) * scale


def _fake_quant_token(x: np.ndarray, bits: int) -> np.ndarray:
    """Symmetric per row (token), as insert_qdq's per_token activations."""
    qmax = (1 << (bits - 1)) - 1
    scale = np.abs(x).max(axis=1, keepdims=True) / qmax
    scale = np.where(scale > 0, scale, 1.0)
    return np.clip(np.round(x / scale), -qmax, qmax) * scale


def _fake_quant_weight(w: np.ndarray, bits: int) -> np.ndarray:
    qmax = (1 << (bits - 1)) - 1
    scale = np.abs(w).max(axis=0, keepdims=True) / qmax
    scale = np.where(scale > 0, scale, 1.0)
    return np.clip(np.round(w / scale), -qmax, qmax) * scale


def quantized_error(x: np.ndarray, w: np.ndarray, s: np.ndarray | None, wbits: int, abits: int,
                    ref: np.ndarray | None = None, per_token: bool = False) -> float:
    """Mean squared error of ``Qa(X/s)·Qw(s·W)`` against ``X·W`` (``ref``, if given) for rows of ``x`` [R, K] and
    ``w`` [K, N] (``Qa`` per tensor, or per row with ``per_token``). In float32: the quantization error is 1e4 times
    fp32's rounding, and sgemm halves the search."""
    x, w = np.asarray(x, np.float32), np.asarray(w, np.float32)
    ref = x @ w if ref is None else ref
    xs, ws = (x, w) if s is None else (x / s[None, :].astype(np.float32), w * s[:, None].astype(np.float32))
    qa = _fake_quant_token(xs, abits) if per_token else _fake_quant_act(xs, abits)
    diff = qa @ _fake_quant_weight(ws, wbits) - ref
    return float(np.mean(np.square(diff, dtype=np.float64)))


def _class_max(v: np.ndarray, m: np.ndarray, n: int) -> np.ndarray:
    """Per channel ``k`` of the V projection's ``n`` outputs: the maximum of ``v`` over X's channels ``c`` with
    ``m[c] = k`` (0 where no channel of X is ``k``: a fused projection's Q and K columns)."""
    out = np.zeros(n)
    np.maximum.at(out, m, v)
    return out


def _fold_path(graph: gs.Graph, path: ChannelPath, nodes: list[gs.Node], t: np.ndarray, m: np.ndarray,
               uniq: NameScope) -> str:
    """Through attention: the V projection's output channels take ``1/t``, the consumers' rows ``t[m]``."""
    if divide_channels(graph, path.tensors()[0], t, uniq, "smoothed") is None:
        return fold_input_scale(graph, path.x, nodes, t[m], uniq, "smoothed")
    for n in nodes:
        scale_weight_rows(n, t[m], uniq, "smoothed")
    return "attention_v"


# Ops whose outputs insert_qdq keeps integer (linear layers, their activations, pools, concatenation) and the data
# movements between them and a reader: an inserted Mul(X, 1/s) after them would be a float island in an integer
# pipeline (dequantize, multiply, quantize again). After a float op (a norm, GELU, attention's P·V) it costs little.
_INTEGER_OPS = ("Conv", "ConvTranspose", "Relu", "LeakyRelu", "Clip", "MaxPool", "AveragePool", "GlobalAveragePool",
                "GlobalMaxPool", "Concat")
_MOVES = MOVES + SELECTS + ("Flatten",)


def _integer_producer(x: gs.Tensor) -> gs.Node | None:
    """The op behind ``x`` (through data movements) whose output stays integer, or None."""
    node = producer(x)
    while node is not None and node.op in _MOVES and node.inputs:
        node = producer(node.inputs[0])
    if node is None:
        return None
    linear = node.op in ("MatMul", "Gemm") and len(node.inputs) > 1 and const_value(node.inputs[1]) is not None
    return node if linear or node.op in _INTEGER_OPS else None


class SmoothQuantPass(PassBase):
    name = "smooth_quant"
    kind = PassKind.EQUIVALENCE

    def __init__(self, config: SmoothConfig | None = None) -> None:
        self.config = config or SmoothConfig()
        self.overrides = OverrideMap.build(self.config.overrides, {"smooth"}, "smooth_quant.overrides")

    def _rows(self, graph: gs.Graph, ctx: PassContext, names: list[str], probe: list[str]
              ) -> tuple[dict, dict, dict, dict]:
        """Per activation: channel max |x| over the samples; the same over the samples whose maxima the search
        may use (with ``holdout`` and two samples or more, the even ones; else all); up to ``search_rows`` rows
        (evenly spread) of the samples the search measures on (with ``holdout``, the odd ones); the shapes of the
        ``probe`` tensors in the first sample."""
        cfg = self.config
        amax: dict[str, np.ndarray] = {}
        fit: dict[str, np.ndarray] = {}
        rows: dict[str, list[np.ndarray]] = {n: [] for n in names}
        shapes: dict[str, tuple[int, ...]] = {}
        samples = ctx.samples[: cfg.max_samples]
        split = cfg.holdout and len(samples) >= 2
        per_sample = max(1, -(-cfg.search_rows // max(len(samples) // (2 if split else 1), 1)))
        for i, values in enumerate(activations(graph, ctx.model, samples, names + probe if probe else names)):
            if i == 0:
                shapes = {n: tuple(np.shape(v)) for n, v in values.items()}
            for n in names:
                v = values[n]
                v = np.asarray(v, np.float64)
                v = np.where(np.isfinite(v), v, 0.0).reshape(-1, v.shape[-1])
                a = np.abs(v).max(axis=0)
                amax[n] = a if n not in amax else np.maximum(amax[n], a)
                if split and i % 2 == 0:
                    fit[n] = a if n not in fit else np.maximum(fit[n], a)
                if cfg.search and (not split or i % 2 == 1):
                    rows[n].append(v[np.linspace(0, len(v) - 1, min(per_sample, len(v))).astype(int)])
        return amax, fit if split else amax, {n: np.concatenate(r) for n, r in rows.items() if r}, shapes

    def _choose(self, x: np.ndarray | None, w: np.ndarray, scales) -> tuple[float | None, dict]:
        """(α, errors): the fixed α, or the grid's best by quantized output error (None: smoothing does not help).
        ``scales(α)`` gives the smoothing factors of X's channels."""
        cfg = self.config
        if not cfg.search or x is None:
            return cfg.alpha, {}
        x, w = np.asarray(x, np.float32), np.asarray(w, np.float32)
        if 0 < cfg.search_columns < w.shape[1]:  # weights are quantized per output column: a sample of columns
            w = w[:, np.linspace(0, w.shape[1] - 1, cfg.search_columns).astype(int)]  # is a sample of the error
        ref = x @ w
        base = quantized_error(x, w, None, cfg.weight_bits, cfg.activation_bits, ref, cfg.per_token)
        errs = {a: quantized_error(x, w, scales(a), cfg.weight_bits, cfg.activation_bits, ref, cfg.per_token)
                for a in cfg.alpha_grid}
        best = min(errs, key=errs.get)
        return (best if errs[best] < base else None), {"none": base, **errs}

    def call(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        declined: list[Declined] = []
        if not ctx.samples:
            declined.append(Declined(self.name, "", "", "no calibration samples: smoothing needs activation ranges"))
            return PassResult(graph, False, {"smoothed": 0}, declined)
        groups = linear_groups(graph, self.name, self.overrides, "smooth", self.config.min_channels, declined)
        if not groups:
            return PassResult(graph, False, {"smoothed": 0}, declined)
        uniq = NameScope(graph)
        folds = {name: foldable(graph, x, nodes, uniq) for name, (x, nodes) in groups.items()}
        paths = {name: p for name, (x, nodes) in groups.items()
                 if not folds[name] and (p := trace(graph, x)) is not None and len(x.outputs) == len(nodes)}
        probe = sorted({t.name for p in paths.values() for t in p.tensors()} - set(groups))
        amax, fit, rows, shapes = self._rows(graph, ctx, list(groups), probe)
        where: dict[str, int] = {}
        ratios, chosen = [], {}
        for name, (x, nodes) in groups.items():
            xa = amax[name]
            w = np.concatenate([weight_rows(n) for n in nodes], axis=1).astype(np.float64)
            wa = np.abs(w).max(axis=1)
            if xa.shape != wa.shape:
                declined.append(Declined(self.name, nodes[0].name, nodes[0].op, "channel count mismatch"))
                continue
            ratios.append(float(xa.max() / max(np.median(xa), 1e-12)))
            path = paths.get(name)
            m = channel_map(path, shapes) if path is not None else None
            n_v = shapes[path.tensors()[0].name][-1] if m is not None else 0
            cut = None if folds[name] or m is not None else _integer_producer(x)
            if cut is not None:
                declined.append(Declined(self.name, nodes[0].name, nodes[0].op,
                                         f"1/s folds into no producer of the input and a Mul after {cut.op} "
                                         f"{cut.name!r}, whose output stays integer, would cut the integer pipeline"))
                continue
            def scaler(maxima: np.ndarray, m=m, wa=wa, n_v=n_v):
                """s(α) for X's channels from their maxima (through attention: one factor per V channel)."""
                if m is None:
                    return lambda a: smoothing_scales(maxima, wa, a)
                xv, wv = _class_max(maxima, m, n_v), _class_max(wa, m, n_v)
                return lambda a: smoothing_scales(xv, wv, a)[m]
            alpha, errs = self._choose(rows.get(name), w, scaler(fit[name]))
            if alpha is None:
                declined.append(Declined(self.name, nodes[0].name, nodes[0].op,
                                         f"no alpha in the grid lowers the quantized output error "
                                         f"({errs['none']:.3g} unsmoothed)"))
                continue
            chosen[nodes[0].name] = alpha
            if m is not None:
                t = smoothing_scales(_class_max(xa, m, n_v), _class_max(wa, m, n_v), alpha)
                kind = _fold_path(graph, path, nodes, t, m, uniq)
            else:
                kind = fold_input_scale(graph, x, nodes, scaler(xa)(alpha), uniq, "smoothed")
            where[kind] = where.get(kind, 0) + 1
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
        n = sum(where.values())
        stats = {"smoothed": n, "folded": {k: v for k, v in where.items() if k != "inserted"},
                 "mul_inserted": where.get("inserted", 0),
                 "alpha": chosen if self.config.search else self.config.alpha,
                 "max_channel_outlier_ratio": round(max(ratios), 2) if ratios else None}
        return PassResult(graph, n > 0, stats, declined)
