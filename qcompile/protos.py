"""Walks over ONNX protobuf graphs, for the modules that read or edit a ModelProto in place (:mod:`.ir`,
:mod:`.upcast`, :mod:`.lowering`, :mod:`.recurrent`) without importing each other."""
from __future__ import annotations

from typing import Iterator

import numpy as np
import onnx
from onnx import numpy_helper


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


def graph_constants(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    """The values of ``graph``'s initializers and of its ``Constant`` nodes holding a tensor, by name."""
    consts = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    for n in graph.node:
        if n.op_type == "Constant" and len(n.attribute) == 1 and n.attribute[0].name == "value":
            consts[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    return consts
