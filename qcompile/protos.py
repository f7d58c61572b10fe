"""Walks over ONNX protobuf graphs, for the modules that read or edit a ModelProto in place (:mod:`.ir`,
:mod:`.upcast`) without importing each other."""
from __future__ import annotations

from typing import Iterator

import onnx


def iter_graph_protos(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """The graph and every subgraph (If/Loop/Scan bodies) of a GraphProto, depth first."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from iter_graph_protos(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from iter_graph_protos(g)
