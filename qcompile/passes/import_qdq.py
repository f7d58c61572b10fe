"""A model another quantizer already made (ONNX Runtime's ``quantize_static``, NNCF, Quark, a QAT export) taken as
it is: the ``prequantized`` recipe's one pass.

Such a model's Quantize/DequantizeLinear pairs are its quantization: the pass checks there are some, that they are
the QDQ form every target lowers (not the operator form, ``QLinearConv`` / ``ConvInteger`` ..., which no target
lowers: an error saying so), counts what they quantize, and changes nothing but a QuantizeLinear of constants (a
QAT export's float weight, quantized at run time with a scale the recipe's ``fold_constants`` folded from it), which
it replaces by its integer result, and a float bias of a Conv / Gemm between dequantized operands, which it
quantizes to int32 at ``s_x·s_w`` as ONNX Runtime's quantizer does (half an accumulator step at most); the targets
then lower the model like one qcompile quantized (``docs/integer.md``) and compare each with the integer reference.

The report's float reference is :func:`float_model`: the model without its rounding (quantized constants
dequantized, each Q/DQ pair a Clip to the range it saturates to: ONNX Runtime's quantizer folds a Relu or a Relu6
into the pair after it, which the Clip keeps). The file holds no other float model: per-layer errors then measure
the activations' rounding, not the distance from float weights the file does not hold, nor saturation.
"""
from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from qcompile.errors import PassError
from qcompile.ir import iter_graphs
from qcompile.match import const_value
from qcompile.pass_infra import PassBase, PassContext, PassResult
from qcompile.passes.insert_qdq import INTEGER_OPS
from qcompile.protos import iter_graph_protos
from qcompile.quant_math import QParams, dequantize
from qcompile.types import PassKind

QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")


class ImportQDQPass(PassBase):
    name = "import_qdq"
    kind = PassKind.QUANTIZE

    def requires(self, graph: gs.Graph, ctx: PassContext) -> None:
        ops = Counter(n.op for g in iter_graphs(graph) for n in g.nodes)
        integer = sorted(op for op in ops if op in INTEGER_OPS)
        if integer:  # ONNX Runtime runs these itself; no target lowers them and no float reference is in them
            raise PassError(f"the model is quantized in ONNX's operator form ({', '.join(integer)}), not with "
                            "Quantize/DequantizeLinear pairs: export it in QDQ form (ONNX Runtime's "
                            "quant_format=QDQ) for the prequantized recipe")
        if not any(ops.get(op) for op in QDQ_OPS):
            raise PassError("the model holds no Quantize/DequantizeLinear nodes: the prequantized recipe takes a "
                            "model another quantizer made (ONNX Runtime, NNCF, Quark); quantize a float model with "
                            "another recipe (w8a8)")

    def call(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        ops: Counter = Counter()
        readers: Counter = Counter()
        tensors = set()
        ahead = biases = 0
        for g in iter_graphs(graph):
            a = sum(_quantize_constant(g, node) for node in list(g.nodes))
            b = sum(_quantize_bias(g, node) for node in list(g.nodes))
            ahead, biases = ahead + a, biases + b
            if a or b:
                g.cleanup(remove_unused_graph_inputs=False).toposort()
            for node in g.nodes:
                ops[node.op] += 1
                if node.op == "DequantizeLinear":
                    tensors.add(node.inputs[0].name)
                    for reader in node.outputs[0].outputs:
                        readers[reader.op] += 1
        stats = {"quantized_tensors": len(tensors), "quantize_linear": ops["QuantizeLinear"],
                 "dequantize_linear": ops["DequantizeLinear"], "ops_reading_dequantized": dict(sorted(readers.items())),
                 "constants_quantized_ahead": ahead, "float_biases_quantized": biases}
        return PassResult(graph, bool(ahead or biases), stats)


def _quantize_constant(graph: gs.Graph, node: gs.Node) -> int:
    """A QuantizeLinear of constants only (a QAT export's float weight, its scale folded from the weight by
    fold_constants) replaced by its integer result (ONNX's ``saturate(round_half_even(x / s) + z)``), so its
    DequantizeLinear reads an integer constant as the lowering's weights do; 1 if replaced. Exact: the same values."""
    if node.op != "QuantizeLinear" or node.attrs.get("block_size") or node.outputs[0] in graph.outputs:
        return 0
    # (a constant's values are read only when the node qualifies: reading them changes how the model serializes)
    if not all(isinstance(t, gs.Constant) for t in node.inputs if t.name):
        return 0
    x, scale = (const_value(t) for t in node.inputs[:2])
    has_zp = len(node.inputs) > 2 and bool(node.inputs[2].name)
    zp = const_value(node.inputs[2]) if has_zp else None
    if x is None or scale is None or (has_zp and zp is None) or x.dtype != np.float32:
        return 0
    dtype = np.asarray(zp).dtype if zp is not None else np.dtype(np.uint8)
    if not np.issubdtype(dtype, np.integer) or node.attrs.get("output_dtype"):
        return 0
    shape = [1] * x.ndim
    if np.size(scale) > 1:
        shape[int(node.attrs.get("axis", 1)) % x.ndim] = -1
    s = np.asarray(scale, np.float32).reshape(shape if np.size(scale) > 1 else ())
    z = np.asarray(zp if zp is not None else 0).astype(np.int64).reshape(shape if np.size(scale) > 1 else ())
    info = np.iinfo(dtype)
    q = np.asarray(np.clip(np.rint(x / s).astype(np.int64) + z, info.min, info.max), dtype)  # (0-d: an array)
    out = node.outputs[0]
    _uses_replaced(graph, out, gs.Constant(out.name + "_quantized", q))
    node.outputs.clear()
    return 1


def _float_range(q: gs.Node) -> tuple[float, float] | None:
    """The float interval a per-tensor QuantizeLinear saturates to, ``[(qmin − z)·s, (qmax − z)·s]``; None for
    per-axis or non-constant parameters."""
    scale = const_value(q.inputs[1]) if len(q.inputs) > 1 else None
    has_zp = len(q.inputs) > 2 and bool(q.inputs[2].name)
    zp = const_value(q.inputs[2]) if has_zp else None
    if scale is None or np.size(scale) != 1 or (has_zp and (zp is None or np.size(zp) != 1)):
        return None
    if zp is not None:
        dtype = np.asarray(zp).dtype
    elif q.attrs.get("output_dtype"):
        dtype = onnx.helper.tensor_dtype_to_np_dtype(int(q.attrs["output_dtype"]))
    else:
        dtype = np.dtype(np.uint8)
    if not np.issubdtype(dtype, np.integer):
        return None  # float8 and the like: no integer grid to saturate to
    info, z, s = np.iinfo(dtype), int(np.asarray(zp if zp is not None else 0).reshape(())), float(
        np.asarray(scale).reshape(()))
    return (info.min - z) * s, (info.max - z) * s


def _dq_params(t: gs.Tensor) -> tuple[np.ndarray, int | None] | None:
    """(scale, axis) of the constant-parameter DequantizeLinear that produces ``t`` with a zero zero point (what a
    bias scale is the product of), else None."""
    dq = t.inputs[0] if len(t.inputs) == 1 else None
    if dq is None or dq.op != "DequantizeLinear":
        return None
    scale = const_value(dq.inputs[1])
    zp = const_value(dq.inputs[2]) if len(dq.inputs) > 2 and dq.inputs[2].name else 0
    if scale is None or zp is None or np.any(np.asarray(zp) != 0) or dq.attrs.get("block_size"):
        return None
    return np.asarray(scale, np.float32), (int(dq.attrs.get("axis", 1)) if np.size(scale) > 1 else None)


def _quantize_bias(graph: gs.Graph, node: gs.Node) -> int:
    """A Conv / Gemm whose input and weight are dequantized (symmetric weights) and whose bias is a float constant
    (a QAT export's, NNCF's): the bias as ``DequantizeLinear(round(b / (s_x·s_w)), s_x·s_w)`` in int32, the form
    ONNX Runtime's quantizer writes and the integer lowering runs (each value off by at most half an accumulator
    step, s_x·s_w / 2); 1 if rewritten."""
    if node.op not in ("Conv", "Gemm") or len(node.inputs) < 3 or not node.inputs[2].name:
        return 0
    if not isinstance(node.inputs[2], gs.Constant):  # (read no constant before: see _quantize_constant)
        return 0
    bias = const_value(node.inputs[2])
    if bias is None or bias.dtype != np.float32 or bias.ndim != 1:
        return 0
    x, w = _dq_params(node.inputs[0]), _dq_params(node.inputs[1])
    if x is None or w is None or x[1] is not None:
        return 0
    if node.op == "Gemm" and (node.attrs.get("transA", 0) or float(node.attrs.get("beta", 1.0)) != 1.0):
        return 0
    out_axis = 0 if node.op == "Conv" or node.attrs.get("transB", 0) else 1
    if w[1] is not None and w[1] % 2 != out_axis:
        return 0
    scale = (x[0].reshape(()) * np.broadcast_to(w[0].reshape(-1), bias.shape)).astype(np.float32)
    q = np.rint(bias / scale)
    if np.any(scale <= 0) or np.any(np.abs(q) > np.iinfo(np.int32).max):
        return 0
    name = node.inputs[2].name
    out = gs.Variable(f"{name}_dequantized", np.float32, bias.shape)
    graph.nodes.append(gs.Node("DequantizeLinear", name=f"{node.name}_bias_dq", attrs={"axis": 0}, outputs=[out],
                               inputs=[gs.Constant(f"{name}_int32", q.astype(np.int32)),
                                       gs.Constant(f"{name}_scale", scale),
                                       gs.Constant(f"{name}_zero_point", np.zeros(bias.shape, np.int32))]))
    node.inputs[2] = out
    return 1


def _uses_replaced(graph: gs.Graph, old: gs.Tensor, new: gs.Tensor) -> None:
    for g in iter_graphs(graph):
        for node in g.nodes:
            node.inputs = [new if t is old else t for t in node.inputs]


def float_model(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """``model`` (a QDQ model) without its rounding: every DequantizeLinear of a constant replaced by the dequantized
    float constant; every per-tensor QuantizeLinear whose readers are all DequantizeLinear replaced by a Clip to the
    range it saturates to, its readers by Identity. Returns the float model and the number of Q/DQ nodes left in it
    (a DequantizeLinear of a model input, a pair with a Transpose between: computed as they are)."""
    graph = gs.import_onnx(model)
    for g in iter_graphs(graph):
        for node in list(g.nodes):
            q = const_value(node.inputs[0]) if node.op == "DequantizeLinear" else None
            has_zp = len(node.inputs) > 2 and bool(node.inputs[2].name)
            scale = const_value(node.inputs[1]) if q is not None else None
            zp = const_value(node.inputs[2]) if scale is not None and has_zp else None
            if scale is None or (has_zp and zp is None) or node.outputs[0] in g.outputs:
                continue
            block = node.attrs.get("block_size") or None
            axis = int(node.attrs.get("axis", 1)) % q.ndim if np.size(scale) > 1 else None
            qp = QParams(np.asarray(scale, np.float32),
                         np.asarray(zp) if zp is not None else np.zeros(np.shape(scale), np.int32), axis, block)
            out = node.outputs[0]
            _uses_replaced(graph, out, gs.Constant(out.name + "_float", np.asarray(dequantize(q, qp), np.float32)))
            node.outputs.clear()
        for node in list(g.nodes):
            readers = list(node.outputs[0].outputs) if node.op == "QuantizeLinear" and node.outputs else []
            bounds = _float_range(node) if readers else None
            if bounds is None or node.outputs[0] in g.outputs or any(r.op != "DequantizeLinear" for r in readers):
                continue
            # the pair's saturation stays (a Relu or Clip before it that ONNX Runtime's quantizer removed because the
            # quantized range does the same: without it the float model was a different function), its rounding goes
            node.op, node.attrs = "Clip", {}
            node.inputs = [node.inputs[0], *(gs.Constant(f"{node.name or node.outputs[0].name}_{k}",
                                                         np.asarray(v, np.float32)) for k, v in zip("lh", bounds))]
            node.outputs[0].dtype = np.float32
            for r in readers:
                r.op, r.attrs, r.inputs = "Identity", {}, [node.outputs[0]]
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    float_m = gs.export_onnx(graph)
    del float_m.opset_import[:]
    float_m.opset_import.extend(model.opset_import)
    left = sum(n.op_type in QDQ_OPS for g in iter_graph_protos(float_m.graph) for n in g.node)
    return float_m, left


__all__ = ["ImportQDQPass", "float_model"]
