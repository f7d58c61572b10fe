"""Remove Identity and inference-time Dropout nodes.

Identity: ``y = x``. Dropout at inference (no ``training_mode`` input set to true): ``y = x`` (ONNX opset 12+ ratio is
ignored when not training; older opsets have ``is_test`` semantics at inference). A Dropout whose mask output is used
is kept (declined). When the removed node's output is a graph output, the input tensor takes its name, unless the
input is itself a graph input/output or a constant (then the node is kept and the reason recorded).
"""
from __future__ import annotations

import onnx_graphsurgeon as gs

from qcompile.ir import iter_graphs
from qcompile.match import MATCHED, Declined, MatchResult, const_value
from qcompile.pass_infra import PassBase, PassContext, PassResult
from qcompile.types import PassKind


class EliminateIdentityPass(PassBase):
    name = "eliminate_identity"
    kind = PassKind.EQUIVALENCE

    def _match(self, node: gs.Node, graph: gs.Graph) -> MatchResult:
        if node.op == "Dropout":
            if len(node.outputs) > 1 and node.outputs[1].outputs:
                return MatchResult.fail("Dropout mask output is used")
            if len(node.inputs) > 2 and node.inputs[2].name:
                mode = const_value(node.inputs[2])
                if mode is None or bool(mode):
                    return MatchResult.fail("Dropout training_mode is not a constant false")
        out = node.outputs[0]
        if out in graph.outputs:
            src = node.inputs[0]
            if src in graph.outputs or isinstance(src, gs.Constant) or src in graph.inputs:
                return MatchResult.fail("output is a graph output and the input cannot take its name")
            if not any(src in n.outputs for n in graph.nodes if n is not node):
                return MatchResult.fail("output is a graph output and the input is a value of an enclosing "
                                        "scope (ONNX Runtime needs a node between them)")
        return MATCHED

    def call(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        removed = 0
        declined: list[Declined] = []
        for g in iter_graphs(graph):
            for node in list(g.nodes):
                if node.op not in ("Identity", "Dropout"):
                    continue
                m = self._match(node, g)
                if not m:
                    declined.append(Declined(self.name, node.name, node.op, m.reason))
                    continue
                src, out = node.inputs[0], node.outputs[0]
                for consumer in list(out.outputs):
                    consumer.inputs = [src if t is out else t for t in consumer.inputs]
                if out in g.outputs:
                    idx = g.outputs.index(out)
                    name = out.name
                    out.name = name + "__removed"
                    src.name = name
                    if src.dtype is None:
                        src.dtype = out.dtype
                    if src.shape is None:  # a graph output needs a declared shape (the checker requires one)
                        src.shape = out.shape
                    g.outputs[idx] = src
                node.outputs.clear()
                node.inputs.clear()
                removed += 1
            g.cleanup(remove_unused_graph_inputs=False)
        return PassResult(graph, removed > 0, {"removed": removed}, declined)
