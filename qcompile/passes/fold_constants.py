"""Constant folding: evaluate every subgraph whose inputs are all constants (ONNX Runtime does the arithmetic).

Identity: a node whose inputs are constants is replaced by its value, which ORT computes with the same kernels
the unfolded graph would have run, so outputs are unchanged bit for bit. Constant nodes become initializers.
Shape computations on static shapes fold too (``fold_shapes``). Quantize/DequantizeLinear are never folded.
"""
from __future__ import annotations

import logging

import onnx_graphsurgeon as gs

from qcompile.ir import iter_graphs
from qcompile.pass_infra import PassBase, PassContext, PassResult
from qcompile.types import PassKind

logger = logging.getLogger(__name__)


def _fingerprint(graph: gs.Graph) -> tuple[int, int]:
    nodes = sum(len(g.nodes) for g in iter_graphs(graph))
    consts = sum(1 for g in iter_graphs(graph) for t in g.tensors().values() if isinstance(t, gs.Constant))
    return nodes, consts


class FoldConstantsPass(PassBase):
    name = "fold_constants"
    kind = PassKind.EQUIVALENCE

    def call(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        before = _fingerprint(graph)
        ops_before = sum(len(g.nodes) for g in iter_graphs(graph))
        for g in iter_graphs(graph):  # Constant nodes -> initializers (ORT's fusions look for initializers)
            for node in g.nodes:
                val = node.attrs.get("value") if node.op == "Constant" else None
                if isinstance(val, gs.Constant) and node.outputs and not node.outputs[0] in g.outputs:
                    out = node.outputs[0]
                    node.outputs.clear()
                    out.to_constant(val.values)
        graph.fold_constants(fold_shapes=True, recurse_subgraphs=True, error_ok=True,
                             flatten_subgraphs=False, size_threshold=1 << 26, should_exclude_node=lambda n: n.op in (
                                 "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"))
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
        after = _fingerprint(graph)
        ops_after = sum(len(g.nodes) for g in iter_graphs(graph))
        return PassResult(graph, after != before, {"nodes_removed": ops_before - ops_after})
