"""Cross-layer equalization of activation ranges between convolutions (Nagel et al. 2019, data-aware form).

Identity, for a Conv ``P`` producing channel ``c`` of ``X`` (weight rows ``W_P[c]``, bias ``b_P[c]``), then ops ``f``
with ``f(z/s) = f(z)/s`` for every ``s > 0`` applied per channel (none, Relu, LeakyRelu, MaxPool), read only by Convs
``C`` (as input 0, constant weights)::

    C(f(P(x))) = C'(f(P'(x))),   W_P'[c] = W_P[c] / s_c,   b_P'[c] = b_P[c] / s_c,   W_C'[:, c] = W_C[:, c] * s_c

(``W_C[:, c]``: the weights that read input channel ``c``, in ``c``'s group). fp32-exact up to rounding (an
EQUIVALENCE pass, checked by the numerics instrument).

Why: exporters leave convolutions whose output channels span ranges 100x apart (PP-OCRv4's first conv: 0.3 to 26);
per-tensor activation quantization then gives the small channels a handful of levels. Weights are quantized per
output channel, so dividing ``W_P``'s rows costs nothing; what the scale trades is the activation's range against
the consumer's per-output-channel weight range. With ``r_c = max|X_c|`` on calibration data and
``w_c = max|W_C[:, c]|``::

    s_c = r_c^α / w_c^(1-α)       α = 1 for depthwise consumers (each channel has its own weight scale),
                                  α = ``alpha`` (default 0.5, SmoothQuant's balance) for dense or grouped ones,

normalized so that ``max(r / s) = max(r)``, and bounded to ``max_ratio``. Channels never active (``r_c = 0``) keep
``s_c = 1``. Declined (with the reason): a producer or intermediate that is a graph output or read by anything
else, a non-constant weight, consumers reading X as something other than their data input, fewer than
``min_channels`` channels, ranges already even (max/median below ``min_spread``), and Convs inside subgraphs.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from qcompile.calibrate import channel_absmax
from qcompile.errors import ConfigError
from qcompile.ir import NameScope, iter_graphs
from qcompile.match import Declined, const_value
from qcompile.overrides import OverrideMap
from qcompile.pass_infra import PassBase, PassContext, PassResult
from qcompile.types import ConfigBase, PassKind

logger = logging.getLogger(__name__)

HOMOGENEOUS = ("Relu", "LeakyRelu", "MaxPool")  # f(z/s) = f(z)/s for s > 0, channel by channel


@dataclass(frozen=True)
class EqualizeConfig(ConfigBase):
    alpha: float = 0.5
    max_samples: int = 16
    min_channels: int = 4
    min_spread: float = 2.0
    max_ratio: float = 1e4
    overrides: dict = field(default_factory=dict)

    def validate(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"equalize.alpha must be in [0, 1], got {self.alpha}")
        if self.max_samples < 1 or self.min_channels < 1:
            raise ConfigError("equalize.max_samples and equalize.min_channels must be >= 1")
        if self.min_spread < 1.0 or self.max_ratio < 1.0:
            raise ConfigError("equalize.min_spread and equalize.max_ratio must be >= 1")
        OverrideMap.build(self.overrides, {"equalize"}, "equalize.overrides")


@dataclass
class _Pair:
    producer: gs.Node
    x: gs.Tensor  # what the consumers read (after the homogeneous chain)
    consumers: list[gs.Node]


def _conv_weight(node: gs.Node) -> np.ndarray | None:
    w = const_value(node.inputs[1]) if node.op == "Conv" and len(node.inputs) > 1 else None
    return w if w is not None and w.dtype.kind == "f" and w.ndim >= 3 else None


def _match(node: gs.Node, graph: gs.Graph) -> _Pair | str | None:
    """The pair starting at Conv `node`, a reason to decline it, or None when nothing here is a candidate."""
    if node.op != "Conv" or _conv_weight(node) is None:
        return None
    t, exposed = node.outputs[0], False
    while True:
        exposed |= t in graph.outputs
        if len(t.outputs) == 1 and t.outputs[0].op in HOMOGENEOUS and t.outputs[0].inputs[0] is t:
            nxt = t.outputs[0]
            if any(o.outputs or o in graph.outputs for o in nxt.outputs[1:]):
                return f"{nxt.op}'s second output (indices) is used"
            t = nxt.outputs[0]
            continue
        break
    readers = list(t.outputs)
    if not readers or any(r.op != "Conv" for r in readers):
        return None  # not followed by convolutions only: nothing to equalize with
    if exposed or t in graph.outputs:
        return "its output (or a value after it) is a graph output"
    if len(node.inputs) > 2 and const_value(node.inputs[2]) is None:
        return "bias is not a constant"
    if any(_conv_weight(r) is None or r.inputs[0] is not t or any(i is t for i in r.inputs[1:]) for r in readers):
        return "a consumer has a non-constant weight or reads the activation as a weight"
    return _Pair(node, t, readers)


def _consumer_scale(c: gs.Node, w: np.ndarray, s: np.ndarray) -> np.ndarray:
    """W_C with input channel k (over all groups) multiplied by s[k]."""
    groups = int(c.attrs.get("group", 1))
    cpg = w.shape[1]
    per_out = np.repeat(s.reshape(groups, cpg), w.shape[0] // groups, axis=0)  # [C_out, cpg]
    return (w.astype(np.float64) * per_out.reshape(per_out.shape + (1,) * (w.ndim - 2))).astype(w.dtype)


class EqualizePass(PassBase):
    name = "equalize"
    kind = PassKind.EQUIVALENCE

    def __init__(self, config: EqualizeConfig | None = None) -> None:
        self.config = config or EqualizeConfig()
        self.overrides = OverrideMap.build(self.config.overrides, {"equalize"}, "equalize.overrides")

    def _pairs(self, graph: gs.Graph, declined: list[Declined]) -> list[_Pair]:
        pairs = []
        for node in graph.nodes:
            m = _match(node, graph)
            if m is None:
                continue
            if isinstance(m, str):
                declined.append(Declined(self.name, node.name, node.op, m))
                continue
            off = [n.name for n in [m.producer, *m.consumers]
                   if self.overrides.resolve(n.name).get("equalize", True) is False]
            channels = _conv_weight(node).shape[0]
            if off:
                declined.append(Declined(self.name, node.name, node.op, f"excluded by override ({off[0]})"))
            elif channels < self.config.min_channels:
                declined.append(Declined(self.name, node.name, node.op, f"only {channels} channels"))
            else:
                pairs.append(m)
        return pairs

    def _scales(self, pair: _Pair, r: np.ndarray) -> tuple[np.ndarray, str | None]:
        cfg = self.config
        live = r > 0
        if live.sum() < 2 or r.max() / np.median(r[live]) < cfg.min_spread:
            return np.ones_like(r), (f"channel ranges already even (max/median "
                                     f"{r.max() / max(np.median(r[live]), 1e-30):.2f} < {cfg.min_spread})"
                                     if live.any() else "no active channel on the calibration data")
        depthwise = all(int(c.attrs.get("group", 1)) == r.size and _conv_weight(c).shape[1] == 1
                        for c in pair.consumers)
        alpha = 1.0 if depthwise else cfg.alpha
        s = np.ones_like(r)
        if alpha < 1.0:
            wmax = np.zeros_like(r)
            for c in pair.consumers:  # max |W_C| over everything that reads input channel k
                w = np.abs(_conv_weight(c).astype(np.float64))
                groups, cpg = int(c.attrs.get("group", 1)), w.shape[1]
                per_in = w.reshape(groups, -1, cpg, *w.shape[2:]).max(axis=(1, *range(3, w.ndim + 1)))
                wmax = np.maximum(wmax, per_in.reshape(-1))
            ok = live & (wmax > 0)
            s[ok] = np.power(r[ok], alpha) / np.power(wmax[ok], 1.0 - alpha)
        else:
            s[live] = r[live]
        s[live] *= np.max(r[live] / s[live]) / r.max()  # normalized: max(r / s) = max(r)
        lo = s[live].max() / cfg.max_ratio
        s[live] = np.maximum(s[live], lo)
        return s, None

    def call(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        declined: list[Declined] = []
        stats = {"equalized": 0, "producers": [], "channel_spread_before": None, "channel_spread_after": None}
        for g in list(iter_graphs(graph))[1:]:
            if any(n.op == "Conv" for n in g.nodes):
                declined.append(Declined(self.name, g.name, "subgraph", "convolutions inside subgraphs are not "
                                         "equalized"))
        if not ctx.samples:
            declined.append(Declined(self.name, "", "", "no calibration samples: equalization needs activation "
                                     "ranges"))
            return PassResult(graph, False, stats, declined)
        pairs = self._pairs(graph, declined)
        if not pairs:
            return PassResult(graph, False, stats, declined)
        names = [p.x.name for p in pairs]
        rmax = channel_absmax(graph, ctx.model, ctx.samples[: self.config.max_samples], names, axis=1)
        uniq = NameScope(graph)
        before, after = [], []
        for p in pairs:
            r = rmax[p.x.name]
            s, why = self._scales(p, r)
            if why:
                declined.append(Declined(self.name, p.producer.name, p.producer.op, why))
                continue
            w = _conv_weight(p.producer)
            shape = (-1,) + (1,) * (w.ndim - 1)
            p.producer.inputs[1] = gs.Constant(uniq(f"{p.producer.name}_equalized_W"),
                                               (w.astype(np.float64) / s.reshape(shape)).astype(w.dtype))
            if len(p.producer.inputs) > 2:
                b = const_value(p.producer.inputs[2])
                p.producer.inputs[2] = gs.Constant(uniq(f"{p.producer.name}_equalized_B"),
                                                   (b.astype(np.float64) / s).astype(b.dtype))
            for c in p.consumers:
                c.inputs[1] = gs.Constant(uniq(f"{c.name}_equalized_W"), _consumer_scale(c, _conv_weight(c), s))
            live = r > 0
            before.append(float(r.max() / np.median(r[live])))
            after.append(float((r / s)[live].max() / np.median((r / s)[live])))
            stats["equalized"] += 1
            stats["producers"].append(p.producer.name)
        graph.cleanup(remove_unused_graph_inputs=False)
        if before:
            stats["channel_spread_before"] = round(float(np.median(before)), 2)
            stats["channel_spread_after"] = round(float(np.median(after)), 2)
        return PassResult(graph, stats["equalized"] > 0, stats, declined)
