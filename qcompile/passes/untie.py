"""Untie transposed constant weights: ``MatMul(X, Transpose(W))`` (and ``Gemm``) with a constant ``W`` gets the
transposed weight as its own initializer.

A language model whose head is tied to its embedding table E reads it twice: ``Gather(E, ids)`` and
``MatMul(h, Transpose(E))``. fold_constants leaves the Transpose when E is above its size threshold (folding would
store the table twice in the float model), so the head's weight is not a constant and every weight quantizer
(insert_qdq, awq, reconstruct_weights) leaves it float, and quantize_embedding leaves the table float as well.
On smollm2-135m that is 113 MB of a 538 MB model: the int4 recipes stopped at 0.39x fp32 size.

Identity: a transpose only moves values, so ``Transpose(W)`` and the initializer ``Wᵀ`` are the same tensor (exact).
The float model grows by the untied copy until a quantizer replaces it, so recipes run this pass right before weight
quantization, not among the equivalence passes every recipe starts with.
Stats: untied weights and their bytes. Nothing is declined: a Transpose of a non-constant is not this pass's concern.
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from qcompile.ir import NameScope, iter_graphs
from qcompile.match import const_value
from qcompile.pass_infra import PassBase, PassContext, PassResult
from qcompile.types import PassKind

WEIGHT_READERS = ("MatMul", "Gemm")


class UntieWeightsPass(PassBase):
    name = "untie_weights"
    kind = PassKind.EQUIVALENCE

    def call(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        uniq = NameScope(graph)
        untied: list[str] = []
        nbytes = 0
        for g in iter_graphs(graph):
            copies: dict[str, gs.Constant] = {}
            for node in g.nodes:
                if node.op not in WEIGHT_READERS or len(node.inputs) < 2 or not node.inputs[1].inputs:
                    continue
                tr = node.inputs[1].inputs[0]
                w = const_value(tr.inputs[0]) if tr.op == "Transpose" and tr.inputs else None
                if w is None or w.dtype.kind != "f":
                    continue
                key = tr.outputs[0].name
                if key not in copies:
                    perm = tr.attrs.get("perm")
                    value = np.ascontiguousarray(np.transpose(w, None if perm is None else [int(p) for p in perm]))
                    copies[key] = gs.Constant(uniq(f"{tr.inputs[0].name}_transposed"), value)
                    untied.append(tr.inputs[0].name)
                    nbytes += value.nbytes
                node.inputs[1] = copies[key]
            g.cleanup(remove_unused_graph_inputs=False).toposort()
        return PassResult(graph, bool(untied), {"untied": untied, "bytes_added": nbytes})


__all__ = ["UntieWeightsPass"]
