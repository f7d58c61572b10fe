"""Half-precision models computed in float32: a model exported in float16 or bfloat16 (``model.half()`` before
``torch.onnx.export``, a GPU deployment's file) becomes the same graph in float32 -- every half initializer,
constant and value widened (exactly: each half value is a float32 value), every ``Cast`` to half a ``Cast`` to
float32 -- while its inputs and outputs keep their half types through a ``Cast`` at each border, so callers feed and
read what they did before.

Why: ``QuantizeLinear`` takes float32 only before opset 19, ONNX Runtime's integer kernels want float32 scales, and
calibration statistics of half activations are coarser than the quantization grid they choose. Neither ONNX
Runtime's quantizer nor the TVM importer's QDQ path takes a float16 model; users had ONNX Runtime's "Type
'tensor(float16)' of input parameter ... of operator (QuantizeLinear) is invalid" after the passes ran.
"""
from __future__ import annotations

import logging

import numpy as np
import onnx
from onnx import AttributeProto, TensorProto, helper, numpy_helper

from qcompile.protos import iter_graph_protos

logger = logging.getLogger(__name__)

HALF = (TensorProto.FLOAT16, TensorProto.BFLOAT16)
# ops whose attribute names the element type of what they make (``Cast``'s ``to``; the others' ``dtype``)
_DTYPE_ATTRS = {"Cast": "to", "EyeLike": "dtype", "RandomNormal": "dtype", "RandomUniform": "dtype",
                "RandomNormalLike": "dtype", "RandomUniformLike": "dtype", "Bernoulli": "dtype"}
BORDER_SUFFIX = "__float32"
WIDENED_KEY = "qcompile.widened_from"  # metadata of a widened model: the half types it had (the report shows it)


def _widen_tensor(t: TensorProto) -> bool:
    if t.data_type not in HALF:
        return False
    t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float32), t.name))
    return True


def _widen_type(tp: onnx.TypeProto) -> bool:
    if tp.HasField("tensor_type") and tp.tensor_type.elem_type in HALF:
        tp.tensor_type.elem_type = TensorProto.FLOAT
        return True
    return False


def half_types(model: onnx.ModelProto) -> set[int]:
    """The half element types (float16, bfloat16) of the model's tensors, values and type attributes, subgraphs
    included; empty for a model with none."""
    found: set[int] = set()
    for g in iter_graph_protos(model.graph):
        found.update(t.data_type for t in g.initializer)
        found.update(v.type.tensor_type.elem_type for v in (*g.input, *g.output, *g.value_info)
                     if v.type.HasField("tensor_type"))
        for node in g.node:
            for a in node.attribute:
                if a.type == AttributeProto.TENSOR:
                    found.add(a.t.data_type)
                elif a.type == AttributeProto.INT and a.name == _DTYPE_ATTRS.get(node.op_type):
                    found.add(a.i)
    return found & set(HALF)


def to_float32(model: onnx.ModelProto) -> int:
    """Widen the model in place (module docstring); returns how many initializers, constants, values and type
    attributes changed (0: nothing was half)."""
    kinds = half_types(model)
    if not kinds:
        return 0
    main = model.graph
    graphs = list(iter_graph_protos(main))
    readers: dict[str, list[onnx.NodeProto]] = {}
    for g in graphs:
        for node in g.node:
            for name in node.input:
                readers.setdefault(name, []).append(node)
    produced_by = {o: node for node in main.node for o in node.output}

    def cast_to(node: onnx.NodeProto | None, types) -> bool:
        return node is not None and node.op_type == "Cast" and any(a.name == "to" and a.i in types
                                                                   for a in node.attribute)

    initialized = {t.name for t in main.initializer}  # an input with a default is a weight, widened as one
    # a border already there (a model this module widened before) is kept, not doubled
    borders_in = [(v.name, v.type.tensor_type.elem_type) for v in main.input
                  if v.type.HasField("tensor_type") and v.type.tensor_type.elem_type in HALF
                  and v.name not in initialized
                  and not all(cast_to(r, (TensorProto.FLOAT,)) for r in readers.get(v.name, []))]
    kept_tail = {id(produced_by[v.name]) for v in main.output if cast_to(produced_by.get(v.name), HALF)}
    borders_out = [(v.name, v.type.tensor_type.elem_type) for v in main.output
                   if v.type.HasField("tensor_type") and v.type.tensor_type.elem_type in HALF
                   and id(produced_by.get(v.name)) not in kept_tail]
    changed = 0
    for g in graphs:
        changed += sum(_widen_tensor(t) for t in g.initializer)
        values = list(g.value_info) + ([] if g is main else [*g.input, *g.output])
        changed += sum(_widen_type(v.type) for v in values)
        for node in g.node:
            for a in node.attribute:
                if a.type == AttributeProto.TENSOR:
                    changed += _widen_tensor(a.t)
                elif (a.type == AttributeProto.INT and a.name == _DTYPE_ATTRS.get(node.op_type) and a.i in HALF
                      and id(node) not in kept_tail):
                    a.i = TensorProto.FLOAT
                    changed += 1
    for v in main.input:
        if v.name in initialized:
            changed += _widen_type(v.type)
    if not changed and not borders_in and not borders_out:
        return 0
    taken = set(readers) | set(produced_by) | {v.name for v in (*main.input, *main.output)} | initialized

    def fresh(name: str) -> str:
        out, i = name + BORDER_SUFFIX, 1
        while out in taken:
            out, i = f"{name}{BORDER_SUFFIX}_{i}", i + 1
        taken.add(out)
        return out

    rename = {name: fresh(name) for name, _ in borders_in}
    for g in graphs:  # subgraphs read the outer scope's names too (a branch may even return one as it is)
        for node in g.node:
            node.input[:] = [rename.get(i, i) for i in node.input]
        if g is not main:
            for v in g.output:
                v.name = rename.get(v.name, v.name)
    tail = []
    for name, dt in borders_out:
        src = produced_by.get(name)
        if src is not None:
            inner = fresh(name)
            src.output[list(src.output).index(name)] = inner
            for g in graphs:
                for node in g.node:
                    node.input[:] = [inner if i == name else i for i in node.input]
        else:  # an output that is an input (or an initializer): cast what it is now
            inner = rename.get(name, name)
        tail.append(helper.make_node("Cast", [inner], [name], to=dt, name=name + "_to_half"))
    head = [helper.make_node("Cast", [name], [rename[name]], to=TensorProto.FLOAT, name=name + "_to_float32")
            for name, _ in borders_in]
    nodes = head + list(main.node) + tail
    del main.node[:]
    main.node.extend(nodes)
    changed += len(borders_in) + len(borders_out)
    names = ",".join(sorted(TensorProto.DataType.Name(dt).lower() for dt in kinds))
    helper.set_model_props(model, {**{p.key: p.value for p in model.metadata_props}, WIDENED_KEY: names})
    logger.info("%s model computed in float32 (%d tensors, values and types widened; inputs and outputs keep their "
                "types)", names, changed)
    return changed
