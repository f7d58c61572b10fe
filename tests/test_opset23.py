"""Opset-23 function ops (Attention, RMSNormalization, RotaryEmbedding: what torch.onnx's dynamo exporter writes
when asked for opset 23) are expanded on load into their ONNX function bodies, computing what ONNX Runtime's own
kernels compute; the integer targets then read primitive ops (TVM's importer has none of the three)."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import helpers
from qcompile import ir, numerics

D, HEADS, KV_HEADS, SEQ = 32, 4, 2, 6
HD = D // HEADS


def block23(rotary: bool = True) -> onnx.ModelProto:
    """RMSNormalization -> q/k/v projections -> RotaryEmbedding on q and k (3-D, interleaved off) -> grouped-query
    causal Attention (3-D inputs, q_num_heads / kv_num_heads) -> output projection, at opset 23."""
    nodes = [helper.make_node("RMSNormalization", ["x", "g"], ["n"], name="rms", axis=-1, epsilon=1e-6)]
    for t, width in (("q", D), ("k", KV_HEADS * HD), ("v", KV_HEADS * HD)):
        nodes.append(helper.make_node("MatMul", ["n", f"w{t}"], [f"{t}0"], name=f"{t}_proj"))
    q, k = "q0", "k0"
    if rotary:
        for t, heads in (("q", HEADS), ("k", KV_HEADS)):
            nodes.append(helper.make_node("RotaryEmbedding", [f"{t}0", "cos", "sin", "pos"], [f"{t}r"],
                                          name=f"{t}_rope", num_heads=heads))
        q, k = "qr", "kr"
    nodes += [helper.make_node("Attention", [q, k, "v0"], ["a"], name="attn", q_num_heads=HEADS,
                               kv_num_heads=KV_HEADS, is_causal=1),
              helper.make_node("MatMul", ["a", "wo"], ["y"], name="o_proj")]
    ang = np.outer(np.arange(SEQ), 1.0 / 10000 ** (np.arange(0, HD, 2) / HD))
    inits = [helpers.init("g", np.abs(helpers.rand(D)) + 0.5), helpers.init("wq", helpers.rand(D, D, scale=D ** -0.5)),
             helpers.init("wk", helpers.rand(D, KV_HEADS * HD, scale=D ** -0.5)),
             helpers.init("wv", helpers.rand(D, KV_HEADS * HD, scale=D ** -0.5)),
             helpers.init("wo", helpers.rand(D, D, scale=D ** -0.5)),
             helpers.init("cos", np.cos(ang).astype(np.float32)), helpers.init("sin", np.sin(ang).astype(np.float32)),
             helpers.init("pos", np.arange(SEQ, dtype=np.int64)[None])]
    return helpers.make(nodes, [helpers.vi("x", [1, SEQ, D])], [helpers.vi("y", [1, SEQ, D], TensorProto.FLOAT)],
                        inits, opset=23)


def test_function_ops_expanded_and_equal_to_onnxruntimes_kernels():
    model = block23()
    out = ir.normalize(onnx.ModelProto.FromString(model.SerializeToString()))
    ops = {n.op_type for n in out.graph.node}
    assert not ops & set(ir.EXPANDED_OPS) and {"MatMul", "Softmax"} <= ops, ops
    assert not out.functions and all(o.domain in ("", "ai.onnx") for o in out.opset_import)
    x = {"x": helpers.rand(1, SEQ, D)}
    want = numerics.run(numerics.session(model), x)
    got = numerics.run(numerics.session(out), x)
    np.testing.assert_allclose(got["y"], want["y"], rtol=1e-4, atol=1e-5)


def test_an_untyped_input_is_one_clear_error():
    model = block23(rotary=False)
    model.graph.input[0].type.tensor_type.elem_type = 0  # no element type: nothing to build the function for
    with pytest.raises(Exception, match="RMSNormalization|type"):
        ir.normalize(model)


def test_opset23_block_bit_exact_on_tvm_x86(tmp_path):
    pytest.importorskip("tvm", reason="the tvm extra is part of the CI install")
    art, lsb = helpers.compile_exact(tmp_path, block23(), "tvm-x86")
    helpers.assert_main_build_equal(lsb)


@pytest.mark.parametrize("op, opset, attrs", [("Celu", 13, {}), ("Celu", 13, {"alpha": 0.4}), ("Swish", 24, {}),
                                              ("Swish", 24, {"alpha": 1.7})])
def test_activation_function_ops_expanded(op, opset, attrs):
    """Celu and Swish (no TVM importer): their function bodies, the node's attribute or the schema's default."""
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="fc"), helper.make_node(op, ["h"], ["a"], **attrs),
             helper.make_node("MatMul", ["a", "w"], ["y"], name="fc2")]  # "a": no declared type (the inliner's)
    model = helpers.make(nodes, [helpers.vi("x", [4, D])], [helpers.vi("y", [4, D])],
                         [helpers.init("w", helpers.rand(D, D, scale=D ** -0.5))], opset=opset)
    out = ir.normalize(onnx.ModelProto.FromString(model.SerializeToString()))
    assert op not in {n.op_type for n in out.graph.node} and not out.functions
    x = {"x": helpers.rand(4, D)}
    np.testing.assert_allclose(numerics.run(numerics.session(out), x)["y"],
                               numerics.run(numerics.session(model), x)["y"], rtol=1e-5, atol=1e-6)
