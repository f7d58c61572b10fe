"""Cutting a QDQ graph's quantized I/O: where every graph input is read only by per-tensor QuantizeLinear nodes and
every output is a DequantizeLinear, the graph between them takes and returns the integer tensors
(:func:`strip_quantized_io`); firmware then skips the float conversion at its boundary."""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from qcompile.lowering import node_attrs, outer_names
from qcompile.protos import graph_constants

logger = logging.getLogger(__name__)

Q_IO_DTYPES = (np.int8, np.uint8, np.int16, np.uint16)  # input types a float32 QuantizeLinear saturates exactly


@dataclass(frozen=True)
class IoQuant:
    """A float graph input (output) and the integer tensor ``q`` its QuantizeLinear (DequantizeLinear) takes it to
    (from): ``q = saturate(round_half_even(x / scale) + zero_point)``, ``y = float32(q - zero_point)·scale``.
    ``scale`` is float32 (size 1, or one per channel along ``axis`` for an output); ``zero_point`` keeps its
    ONNX dtype (None: absent, i.e. 0)."""
    name: str
    q: str
    scale: np.ndarray
    zero_point: np.ndarray | None
    axis: int


@dataclass
class StrippedIO:
    """An integer ONNX graph cut at its float I/O borders (:func:`strip_quantized_io`)."""
    model: onnx.ModelProto
    inputs: list[IoQuant]
    outputs: list[IoQuant]


class NotStrippable(Exception):
    """The graph's inputs or outputs are not all Quantize/DequantizeLinear borders; the message says which."""


def strip_quantized_io(model: onnx.ModelProto) -> StrippedIO:
    """Cut an integer ONNX graph (:func:`lower`'s) so it takes the quantized inputs and returns the integer outputs.

    Why: on a microcontroller the caller usually has integer data already (sensor samples, pixels) and wants
    integers back; the input QuantizeLinear and output DequantizeLinear are then float work on a core that may
    have no FPU, and float I/O buffers are 4x the bytes. The cut is exact: what is removed is given back as
    :class:`IoQuant` so a caller can run it with the reference's own Quantize/DequantizeLinear.

    Strippable when every graph input is read only by QuantizeLinear nodes with one constant per-tensor scale and
    zero point (an 8- or 16-bit type) between them, and every graph output is the output of a DequantizeLinear
    (constant scale, per tensor or per axis, one zero point) of a tensor some other node computes, read by nothing
    else. Raises :class:`NotStrippable` naming the first input/output that is not.
    """
    g = model.graph
    src = list(g.node)
    consts = graph_constants(g)
    consumers: dict[str, list[int]] = {}
    for k, n in enumerate(src):
        for i in set(n.input) | _outer_names_of(n):
            consumers.setdefault(i, []).append(k)
    producer = {o: k for k, n in enumerate(src) for o in n.output}
    out_names = [o.name for o in g.output]
    inputs = [i for i in g.input if i.name not in consts]
    if not inputs:
        raise NotStrippable("the model has no inputs")

    def param(node: onnx.NodeProto, k: int) -> np.ndarray | None:
        return consts.get(node.input[k]) if len(node.input) > k and node.input[k] else None

    drop: set[int] = set()
    replace: dict[int, onnx.NodeProto] = {}
    new_inputs, in_q = [], []
    for vi in inputs:
        cons = consumers.get(vi.name, [])
        if vi.name in out_names or not cons or any(src[k].op_type != "QuantizeLinear" or src[k].input[0] != vi.name
                                                   or vi.name in src[k].input[1:] for k in cons):
            raise NotStrippable(f"input {vi.name!r} is not read by QuantizeLinear alone "
                                f"({', '.join(sorted({src[k].op_type for k in cons})) or 'unused'})")
        keys = set()
        for k in cons:
            c = src[k]
            s, z = param(c, 1), param(c, 2)
            if s is None or s.size != 1 or (len(c.input) > 2 and c.input[2] and (z is None or z.size != 1)):
                raise NotStrippable(f"input {vi.name!r}: QuantizeLinear {c.name!r} has no constant per-tensor "
                                    "scale / zero point")
            if z is None and any(a.name == "output_dtype" for a in c.attribute):
                raise NotStrippable(f"input {vi.name!r}: QuantizeLinear {c.name!r} has no zero point")
            z = np.zeros((), np.uint8) if z is None else z
            if z.dtype.type not in Q_IO_DTYPES:
                raise NotStrippable(f"input {vi.name!r} is quantized to {z.dtype} (8- or 16-bit integers only)")
            keys.add((s.astype(np.float32).tobytes(), int(z.reshape(-1)[0]), z.dtype.str))
        if len(keys) != 1:
            raise NotStrippable(f"input {vi.name!r} is quantized with {len(keys)} different scales / zero points")
        first = src[cons[0]]
        z = param(first, 2)
        z = np.zeros((), np.uint8) if z is None else z.reshape(())
        in_q.append(IoQuant(vi.name, first.output[0], param(first, 1).astype(np.float32).reshape(()), z, 0))
        dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                for d in vi.type.tensor_type.shape.dim]
        new_inputs.append(helper.make_tensor_value_info(first.output[0], helper.np_dtype_to_tensor_dtype(z.dtype),
                                                        dims))
        drop.add(cons[0])
        for k in cons[1:]:  # the same parameters: the same integers
            replace[k] = helper.make_node("Identity", [first.output[0]], [src[k].output[0]], name=src[k].name)

    out_q: list[IoQuant] = []
    for name in out_names:
        k = producer.get(name)
        if k is None or src[k].op_type != "DequantizeLinear":
            raise NotStrippable(f"output {name!r} is not computed by a DequantizeLinear "
                                f"({src[k].op_type if k is not None else 'a graph input or constant'})")
        dq = src[k]
        s, z, x = param(dq, 1), param(dq, 2), dq.input[0]
        if s is None or (len(dq.input) > 2 and dq.input[2] and z is None):
            raise NotStrippable(f"output {name!r}: DequantizeLinear {dq.name!r} has no constant scale / zero point")
        if z is not None and np.unique(z).size > 1:
            raise NotStrippable(f"output {name!r}: DequantizeLinear {dq.name!r} has one zero point per channel")
        if x in consts or x not in producer or producer[x] in drop:
            raise NotStrippable(f"output {name!r} dequantizes a model input or a constant")
        if consumers.get(name):
            raise NotStrippable(f"output {name!r} is also read inside the graph")
        if x in out_names or any(o.q == x for o in out_q):
            raise NotStrippable(f"output {name!r}: its integer tensor {x!r} is returned twice")
        scale = s.astype(np.float32)
        out_q.append(IoQuant(name, x, scale.reshape(-1) if s.size > 1 else scale.reshape(()),
                             None if z is None else z.reshape(-1)[:1].reshape(()), int(node_attrs(dq).get("axis", 1))))
        drop.add(k)

    nodes = [replace.get(k, n) for k, n in enumerate(src) if k not in drop]
    used = {i for n in nodes for i in set(n.input) | _outer_names_of(n)}
    inits = [i for i in g.initializer if i.name in used]
    outputs = [helper.make_tensor_value_info(o.q, onnx.TensorProto.UNDEFINED, None) for o in out_q]
    graph = helper.make_graph(nodes, g.name, new_inputs, outputs, inits)
    stripped = helper.make_model(graph, opset_imports=list(model.opset_import), producer_name=model.producer_name)
    stripped.ir_version = model.ir_version
    logger.info("quantized I/O: %d input(s), %d output(s) left to the caller", len(in_q), len(out_q))
    return StrippedIO(stripped, in_q, out_q)


def _outer_names_of(node: onnx.NodeProto) -> set[str]:
    """Names a node's subgraphs (If/Loop bodies) read from the enclosing graph."""
    out: set[str] = set()
    for a in node.attribute:
        if a.type == onnx.AttributeProto.GRAPH:
            out |= outer_names(a.g)
    return out
