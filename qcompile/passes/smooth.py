"""SmoothQuant: migrate activation outliers into the weights, per input channel.

Identity, for an activation X [..., K] read by MatMul/Gemm nodes with constant weights W [K, N]:

    X·W = (X·diag(1/s))·(diag(s)·W),    s_j = max|X_j|^α / max|W_j|^(1-α)

(max|W_j| over row j of every consumer's weight). Per-tensor activation quantization of X·diag(1/s) then sees
flattened channels while the weights, quantized per output channel, absorb the range. The rewrite is fp32-exact up
to rounding (an EQUIVALENCE pass, checked by the numerics instrument). Where X is the output of a LayerNorm's affine
tail (``Mul(γ)`` then ``Add(β)``, as exporters decompose it) and only such MatMuls read it, 1/s is folded into γ and β
(no new op); otherwise one ``Mul(X, 1/s)`` feeds the smoothed consumers while other readers (a residual Add) keep X.
Channel maxima come from the calibration samples. Declined: activations with a non-constant or shared-differently
weight reader, Gemm with transA, fewer than ``min_channels`` channels.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from qcompile.calibrate import channel_absmax
from qcompile.errors import ConfigError
from qcompile.ir import NameScope
from qcompile.match import Declined, const_value
from qcompile.overrides import OverrideMap
from qcompile.pass_infra import PassBase, PassContext, PassResult
from qcompile.passes._layernorm import affine_tail
from qcompile.passes._linear import linear_groups, weight_rows
from qcompile.types import ConfigBase, PassKind

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SmoothConfig(ConfigBase):
    alpha: float = 0.5
    max_samples: int = 32
    min_channels: int = 16
    overrides: dict = field(default_factory=dict)

    def validate(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"smooth_quant.alpha must be in [0, 1], got {self.alpha}")
        OverrideMap.build(self.overrides, {"smooth"}, "smooth_quant.overrides")


class SmoothQuantPass(PassBase):
    name = "smooth_quant"
    kind = PassKind.EQUIVALENCE

    def __init__(self, config: SmoothConfig | None = None) -> None:
        self.config = config or SmoothConfig()
        self.overrides = OverrideMap.build(self.config.overrides, {"smooth"}, "smooth_quant.overrides")

    def call(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        declined: list[Declined] = []
        if not ctx.samples:
            declined.append(Declined(self.name, "", "", "no calibration samples: smoothing needs activation ranges"))
            return PassResult(graph, False, {"smoothed": 0}, declined)
        groups = linear_groups(graph, self.name, self.overrides, "smooth", self.config.min_channels, declined)
        if not groups:
            return PassResult(graph, False, {"smoothed": 0}, declined)
        amax = channel_absmax(graph, ctx.model, ctx.samples[: self.config.max_samples], list(groups), axis=-1)
        a = self.config.alpha
        uniq = NameScope(graph)
        folded = inserted = 0
        ratios = []
        for name, (x, nodes) in groups.items():
            xa = amax[name].astype(np.float64)
            wa = np.max([np.abs(weight_rows(n)).max(axis=1) for n in nodes], axis=0).astype(np.float64)
            if xa.shape != wa.shape:
                declined.append(Declined(self.name, nodes[0].name, nodes[0].op, "channel count mismatch"))
                continue
            s = np.where((xa > 0) & (wa > 0), np.power(xa, a) / np.power(np.maximum(wa, 1e-12), 1 - a), 1.0)
            s = np.clip(s, 1e-5, 1e5)
            ratios.append(float(xa.max() / max(np.median(xa), 1e-12)))
            for n in nodes:
                w = const_value(n.inputs[1])
                if n.op == "Gemm" and int(n.attrs.get("transB", 0)):
                    w_new = w.astype(np.float64) * s[None, :]
                else:
                    w_new = w.astype(np.float64) * s[:, None]
                n.inputs[1] = gs.Constant(uniq(f"{n.name}_smoothed_W"), np.array(w_new, dtype=w.dtype))
            tail = affine_tail(x, s.shape[0]) if len(x.outputs) == len(nodes) else None
            if tail is not None:  # only the smoothed nodes read X: fold 1/s into the LayerNorm's γ and β
                g, b = tail.values()
                tail.set(g.reshape(-1) / s, b.reshape(-1) / s, uniq, "smoothed")
                folded += 1
                continue
            inv = gs.Constant(uniq(f"{name}_smooth_inv_scale"), np.array(1.0 / s, dtype=np.float32))
            xs = gs.Variable(uniq(f"{name}_smoothed"), dtype=x.dtype, shape=x.shape)
            graph.nodes.append(gs.Node("Mul", uniq(f"{name}_smooth_Mul"), inputs=[x, inv], outputs=[xs]))
            for n in nodes:
                n.inputs[0] = xs
            inserted += 1
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
        stats = {"smoothed": folded + inserted, "folded_into_layernorm": folded, "mul_inserted": inserted,
                 "alpha": a, "max_channel_outlier_ratio": round(max(ratios), 2) if ratios else None}
        return PassResult(graph, folded + inserted > 0, stats, declined)
