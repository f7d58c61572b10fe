"""Fold inference BatchNormalization into the producing Conv / ConvTranspose / Gemm / MatMul(+Add).

With ``f = γ / sqrt(σ² + ε)`` (per output channel c), ``BN(y) = (y - μ)·f + β``, and for ``y = W*x + b``:

    W'[c] = W[c]·f[c]        b'[c] = (b[c] - μ[c])·f[c] + β[c]

Conv: W is [O, I/g, k...], channel axis 0. ConvTranspose: W is [I, O/g, k...]; output channel ``gi·O/g + j`` scales
``W.reshape(g, I/g, O/g, ...)[gi, :, j]``. Gemm (Y = α·A·B + β_g·C, BN channel = Y's axis 1): B's output axis is 0
when transB else 1; ``C' = (β_g·C - μ)·f + β`` and the Gemm's beta becomes 1. MatMul with a constant [K, N] weight and
a rank-2 output (BN channel axis 1 = N), optionally followed by Add(bias): the same with an Add carrying b'.
Arithmetic is done in float64 and rounded once to the weight dtype. Declined: non-constant BN parameters, training
mode, a producer with other consumers, MatMul outputs of rank ≠ 2 (BN's channel axis is not the weight's).
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from qcompile.ir import iter_graphs
from qcompile.match import MATCHED, Declined, MatchResult, const_value, producer, single_consumer
from qcompile.pass_infra import PassBase, PassContext, PassResult
from qcompile.types import PassKind


def _const(name: str, value: np.ndarray, like: np.ndarray) -> gs.Constant:
    return gs.Constant(name, np.array(value, dtype=like.dtype, order="C"))


def _bn_params(bn: gs.Node) -> tuple[np.ndarray, np.ndarray] | None:
    vals = [const_value(t) for t in bn.inputs[1:5]]
    if any(v is None for v in vals):
        return None
    gamma, beta, mean, var = (v.astype(np.float64) for v in vals)
    f = gamma / np.sqrt(var + float(bn.attrs.get("epsilon", 1e-5)))
    return f, beta - mean * f


class FoldBatchNormPass(PassBase):
    name = "fold_batchnorm"
    kind = PassKind.EQUIVALENCE

    def _match(self, bn: gs.Node, outs: set[str]) -> MatchResult:
        if len(bn.inputs) != 5:
            return MatchResult.fail("BatchNormalization without 5 inputs")
        if int(bn.attrs.get("training_mode", 0)):
            return MatchResult.fail("training_mode=1")
        if any(t.outputs for t in bn.outputs[1:]):
            return MatchResult.fail("running-statistics outputs are used")
        if _bn_params(bn) is None:
            return MatchResult.fail("BN parameters are not constants")
        src = producer(bn.inputs[0])
        if src is None:
            return MatchResult.fail("input is a graph input: nothing to fold into")
        if single_consumer(bn.inputs[0], outs) is None:
            return MatchResult.fail(f"producer {src.name} output has other consumers")
        if src.op in ("Conv", "ConvTranspose"):
            return MATCHED if const_value(src.inputs[1]) is not None and (
                len(src.inputs) < 3 or const_value(src.inputs[2]) is not None) else MatchResult.fail(
                f"{src.op} weights/bias not constant")
        if src.op == "Gemm":
            if const_value(src.inputs[1]) is None:
                return MatchResult.fail("Gemm B not constant")
            if len(src.inputs) > 2 and (const_value(src.inputs[2]) is None or
                                        const_value(src.inputs[2]).size not in (1, const_value(src.inputs[1]).shape[
                                            0 if src.attrs.get("transB", 0) else 1])):
                return MatchResult.fail("Gemm C not a constant per-channel bias")
            return MATCHED
        mm = src
        if src.op == "Add":
            mm = next((producer(t) for t in src.inputs if producer(t) is not None and producer(t).op == "MatMul"), None)
            if mm is None or not any(const_value(t) is not None for t in src.inputs):
                return MatchResult.fail("Add is not MatMul + constant bias")
            if single_consumer(mm.outputs[0], outs) is None:
                return MatchResult.fail("MatMul output has other consumers")
        if mm.op == "MatMul":
            w = const_value(mm.inputs[1])
            shape = bn.inputs[0].shape
            if w is None or w.ndim != 2:
                return MatchResult.fail("MatMul weight is not a constant matrix")
            if shape is None or len(shape) != 2:
                return MatchResult.fail("MatMul output rank is not 2: BN channel axis is not the weight's output axis")
            return MATCHED
        return MatchResult.fail(f"producer op {src.op} cannot absorb BatchNormalization")

    def _fold(self, bn: gs.Node, g: gs.Graph) -> None:
        f, shift = _bn_params(bn)  # BN(y) = y*f + shift
        src = producer(bn.inputs[0])
        tag = bn.name or bn.outputs[0].name
        if src.op in ("Conv", "ConvTranspose", "Gemm"):
            w = const_value(src.inputs[1])
            w64 = w.astype(np.float64)
            if src.op == "Conv":
                w_new = w64 * f.reshape((-1,) + (1,) * (w.ndim - 1))
            elif src.op == "ConvTranspose":
                grp = int(src.attrs.get("group", 1))
                shp = (grp, w.shape[0] // grp, w.shape[1]) + w.shape[2:]
                w_new = (w64.reshape(shp) * f.reshape((grp, 1, w.shape[1]) + (1,) * (w.ndim - 2))).reshape(w.shape)
            else:
                w_new = w64 * (f[:, None] if src.attrs.get("transB", 0) else f[None, :])
            has_b = len(src.inputs) > 2 and src.inputs[2].name
            if src.op == "Gemm":
                b = const_value(src.inputs[2]).astype(np.float64).reshape(-1) * float(src.attrs.get("beta", 1.0)) \
                    if has_b else np.zeros_like(f)
                src.attrs["beta"] = 1.0
            else:
                b = const_value(src.inputs[2]).astype(np.float64) if has_b else np.zeros_like(f)
            b_new = np.broadcast_to(b, f.shape) * f + shift
            src.inputs[1] = _const(f"{tag}_folded_W", w_new, w)
            bias = _const(f"{tag}_folded_B", b_new, w)
            if has_b:
                src.inputs[2] = bias
            else:
                src.inputs.append(bias)
            src.outputs[0] = bn.outputs[0]
        else:
            add = src if src.op == "Add" else None
            mm = producer(next(t for t in add.inputs if producer(t) is not None)) if add else src
            w = const_value(mm.inputs[1])
            mm.inputs[1] = _const(f"{tag}_folded_W", w.astype(np.float64) * f[None, :], w)
            if add is not None:
                bidx = next(i for i, t in enumerate(add.inputs) if const_value(t) is not None)
                b = const_value(add.inputs[bidx])
                add.inputs[bidx] = _const(f"{tag}_folded_B", b.astype(np.float64) * f + shift, w)
                add.outputs[0] = bn.outputs[0]
            else:
                bn.op, bn.attrs = "Add", {}
                x = bn.inputs[0]
                bn.inputs.clear()
                bn.inputs.extend([x, _const(f"{tag}_folded_B", shift, w)])
                while len(bn.outputs) > 1:
                    bn.outputs.pop()
                return
        bn.outputs.clear()
        bn.inputs.clear()

    def call(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        folded = 0
        declined: list[Declined] = []
        for g in iter_graphs(graph):
            outs = {t.name for t in g.outputs}
            for bn in [n for n in g.nodes if n.op == "BatchNormalization"]:
                m = self._match(bn, outs)
                if not m:
                    declined.append(Declined(self.name, bn.name, bn.op, m.reason))
                    continue
                self._fold(bn, g)
                folded += 1
            g.cleanup(remove_unused_graph_inputs=False).toposort()
        return PassResult(graph, folded > 0, {"folded": folded}, declined)
