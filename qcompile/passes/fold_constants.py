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


def _fingerprint(graph: gs.Graph) -> tuple:
    """Every graph's nodes in order (op, input and output names) and constant names: what folding, cleanup and the
    topological sort can change (a reordering too: the manager hands on an unmodified pass's input as it was)."""
    return tuple((tuple((n.op, tuple(t.name for t in n.inputs), tuple(t.name for t in n.outputs)) for n in g.nodes),
                  tuple(sorted(k for k, t in g.tensors().items() if isinstance(t, gs.Constant))))
                 for g in iter_graphs(graph))


NEVER_FOLDED = ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear")


def fold_static_shapes(graph: gs.Graph) -> int:
    """Replace every ``Shape`` node whose input shape is fully static by its value, honoring opset 15's
    ``start`` / ``end`` (onnx-graphsurgeon 0.6's ``fold_shapes`` ignores them: ``Shape(x, start=1, end=2)`` of a
    [1, 32] tensor folds to [1, 32] instead of [32], as the dynamo exporter's BERT emits). Returns the count."""
    import numpy as np

    count = 0
    for g in iter_graphs(graph):
        for node in g.nodes:
            if node.op != "Shape" or not node.outputs or node.outputs[0] in g.outputs:
                continue
            shape = node.inputs[0].shape
            if shape is None or any(not isinstance(d, int) or d < 0 for d in shape):
                continue
            rank = len(shape)
            start, end = int(node.attrs.get("start", 0)), node.attrs.get("end")
            end = rank if end is None else int(end)
            start, end = (max(0, min(rank, v + rank if v < 0 else v)) for v in (start, end))
            out = node.outputs[0]
            node.outputs.clear()
            out.to_constant(np.array(shape[start:end], dtype=np.int64))
            count += 1
    return count


def drop_empty_splits(graph: gs.Graph) -> int:
    """Remove the empty pieces of a ``Split`` with constant sizes that only ``Concat`` nodes read (ONNX's
    RotaryEmbedding function splits off a zero-length "not rotated" part and concatenates it back when the whole
    head is rotated): a zero-size tensor is nothing to compute, and a kernel given one fails (TVM's). Returns the
    count."""
    import numpy as np

    from qcompile.match import const_value

    count = 0
    for g in iter_graphs(graph):
        outputs = {t.name for t in g.outputs}
        for node in g.nodes:
            if node.op != "Split" or len(node.inputs) < 2 or (sizes := const_value(node.inputs[1])) is None:
                continue
            sizes = [int(v) for v in np.asarray(sizes).reshape(-1)]
            if len(sizes) != len(node.outputs):
                continue
            empty = [i for i, n in enumerate(sizes) if n == 0 and node.outputs[i].name not in outputs
                     and all(r.op == "Concat" for r in node.outputs[i].outputs)]
            if not empty or len(empty) == len(sizes):
                continue
            for i in empty:
                out = node.outputs[i]
                for r in list(out.outputs):
                    rest = [x for x in r.inputs if x is not out]
                    r.inputs.clear()
                    r.inputs.extend(rest)
            keep = [i for i in range(len(sizes)) if i not in empty]
            rest = [node.outputs[i] for i in keep]
            node.outputs.clear()
            node.outputs.extend(rest)
            node.inputs[1] = gs.Constant(f"{node.name}_split_sizes", np.array([sizes[i] for i in keep], np.int64))
            count += len(empty)
    return count


def fold(graph: gs.Graph, recurse_subgraphs: bool = True) -> None:
    """Fold constants (and static shape computations) in place; Q/DQ never folded; empty Split pieces dropped."""
    fold_static_shapes(graph)
    graph.fold_constants(fold_shapes=True, recurse_subgraphs=recurse_subgraphs, error_ok=True,
                         flatten_subgraphs=False, size_threshold=1 << 26,
                         should_exclude_node=lambda n: n.op in NEVER_FOLDED)
    drop_empty_splits(graph)
    graph.cleanup(remove_unused_graph_inputs=False).toposort()


class FoldConstantsPass(PassBase):
    name = "fold_constants"
    kind = PassKind.EQUIVALENCE

    def call(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        before = _fingerprint(graph)
        ops_before = sum(len(g.nodes) for g in iter_graphs(graph))
        for g in iter_graphs(graph):  # Constant nodes -> initializers (ORT's fusions look for initializers)
            for node in g.nodes:
                val = node.attrs.get("value") if node.op == "Constant" else None
                if isinstance(val, gs.Constant) and node.outputs and node.outputs[0] not in g.outputs:
                    out = node.outputs[0]
                    node.outputs.clear()
                    out.to_constant(val.values)
        fold(graph)
        after = _fingerprint(graph)
        ops_after = sum(len(g.nodes) for g in iter_graphs(graph))
        return PassResult(graph, after != before, {"nodes_removed": ops_before - ops_after})
