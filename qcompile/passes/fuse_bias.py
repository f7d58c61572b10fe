"""Fuse a constant per-channel Add that follows a Conv / ConvTranspose into the convolution's bias.

Identity: ``Conv(x, W, b) + c = Conv(x, W, b + c)`` when ``c`` broadcasts to the output [N, C, ...] varying only
along axis 1 (shapes like [C,1,1], [1,C,1,1], [1] or scalar). The sum ``b + c`` is formed in float64 and rounded
once, so the result differs from the unfused graph only by fp32 rounding of one addition. Declined: non-constant
addends, addends varying along the batch or spatial axes, convolutions whose output has other consumers.
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from qcompile.ir import iter_graphs
from qcompile.match import MATCHED, Declined, MatchResult, const_value, producer, single_consumer
from qcompile.pass_infra import PassBase, PassContext, PassResult
from qcompile.types import PassKind


def channel_vector(c: np.ndarray, rank: int, channels: int) -> np.ndarray | None:
    """`c` as a [channels] vector if it broadcasts against [N, channels, ...] varying only along axis 1."""
    if c.ndim > rank:
        return None
    shape = (1,) * (rank - c.ndim) + c.shape
    if any(d != 1 for i, d in enumerate(shape) if i != 1):
        return None
    if shape[1] not in (1, channels):
        return None
    return np.broadcast_to(c.reshape(-1), (channels,)) if c.size == 1 else c.reshape(channels)


class FuseConvBiasPass(PassBase):
    name = "fuse_conv_bias"
    kind = PassKind.EQUIVALENCE

    def _match(self, add: gs.Node, outs: set[str]) -> tuple[MatchResult, gs.Node | None, np.ndarray | None]:
        for i, t in enumerate(add.inputs):
            conv = producer(t)
            if conv is None or conv.op not in ("Conv", "ConvTranspose"):
                continue
            c = const_value(add.inputs[1 - i])
            w = const_value(conv.inputs[1])
            if c is None or w is None:
                return MatchResult.fail("addend or conv weight is not constant"), None, None
            if single_consumer(t, outs) is None:
                return MatchResult.fail("conv output has other consumers"), None, None
            if len(conv.inputs) > 2 and conv.inputs[2].name and const_value(conv.inputs[2]) is None:
                return MatchResult.fail("conv bias is not constant"), None, None
            grp = int(conv.attrs.get("group", 1))
            channels = w.shape[0] if conv.op == "Conv" else w.shape[1] * grp
            vec = channel_vector(c, w.ndim, channels)
            if vec is None:
                return MatchResult.fail(f"addend of shape {list(c.shape)} is not per-channel"), None, None
            return MATCHED, conv, vec
        return MatchResult.fail("no Conv input"), None, None

    def call(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        fused = 0
        declined: list[Declined] = []
        for g in iter_graphs(graph):
            outs = {t.name for t in g.outputs}
            for add in [n for n in g.nodes if n.op == "Add" and len(n.inputs) == 2]:
                if not any(producer(t) is not None and producer(t).op in ("Conv", "ConvTranspose")
                           for t in add.inputs):
                    continue
                m, conv, vec = self._match(add, outs)
                if not m:
                    declined.append(Declined(self.name, add.name, add.op, m.reason))
                    continue
                w = const_value(conv.inputs[1])
                has_b = len(conv.inputs) > 2 and conv.inputs[2].name
                b = const_value(conv.inputs[2]).astype(np.float64) if has_b else np.zeros(vec.shape)
                bias = gs.Constant(f"{add.name or add.outputs[0].name}_fused_B",
                                   (b + vec.astype(np.float64)).astype(w.dtype))
                if has_b:
                    conv.inputs[2] = bias
                else:
                    conv.inputs.append(bias)
                conv.outputs[0] = add.outputs[0]
                add.outputs.clear()
                add.inputs.clear()
                fused += 1
            g.cleanup(remove_unused_graph_inputs=False).toposort()
        return PassResult(graph, fused > 0, {"fused": fused}, declined)
