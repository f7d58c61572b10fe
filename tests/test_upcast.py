"""Half-precision models (qcompile.upcast): a float16 export is quantized as the same graph in float32, its inputs
and outputs keep float16; weights, constants, type attributes and values in subgraphs are widened exactly."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto as T
from onnx import helper, numpy_helper

import qcompile
from qcompile import ir, upcast


def _half_cnn(dtype=np.float16) -> onnx.ModelProto:
    """Conv -> Relu -> (x + a float16 ConstantOfShape) -> pool -> Gemm, and a Cast to float16 of an integer shape, as
    ``model.half()`` exports write them; float16 input and output with a dynamic batch."""
    rng = np.random.default_rng(0)
    w0 = numpy_helper.from_array((rng.standard_normal((8, 3, 3, 3)) * 0.3).astype(dtype), "w0")
    b0 = numpy_helper.from_array((rng.standard_normal(8) * 0.1).astype(dtype), "b0")
    w1 = numpy_helper.from_array((rng.standard_normal((10, 8)) * 0.3).astype(dtype), "w1")
    half = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    nodes = [helper.make_node("Conv", ["x", "w0", "b0"], ["a"], pads=[1, 1, 1, 1], name="conv"),
             helper.make_node("Relu", ["a"], ["r"], name="relu"),
             helper.make_node("Shape", ["r"], ["shp"], name="shape"),
             helper.make_node("ConstantOfShape", ["shp"], ["bias"], name="fill",
                              value=numpy_helper.from_array(np.array([0.25], dtype), "v")),
             helper.make_node("Add", ["r", "bias"], ["rb"], name="add"),
             helper.make_node("Shape", ["x"], ["xs"], start=3, name="width"),
             helper.make_node("Cast", ["xs"], ["wf"], to=half, name="width_half"),
             helper.make_node("Div", ["rb", "wf"], ["rw"], name="per_width"),
             helper.make_node("GlobalAveragePool", ["rw"], ["g"], name="pool"),
             helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
             helper.make_node("Gemm", ["f", "w1"], ["y"], transB=1, name="fc")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", half, ["N", 3, 16, 16])],
                          [helper.make_tensor_value_info("y", half, ["N", 10])], [w0, b0, w1])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_half_model_widened_exactly_with_half_borders():
    m = _half_cnn()
    assert upcast.half_types(m) == {T.FLOAT16}
    wide = ir.normalize(onnx.ModelProto.FromString(m.SerializeToString()))
    # half only at the borders: a Cast from the input, a Cast to the output
    assert [(n.name, n.attribute[0].i) for n in wide.graph.node if n.op_type == "Cast"] == [
        ("x_to_float32", T.FLOAT), ("width_half", T.FLOAT), ("y_to_half", T.FLOAT16)]
    again = ir.normalize(onnx.ModelProto.FromString(wide.SerializeToString()))  # a widened model read again
    assert [n.name for n in again.graph.node] == [n.name for n in wide.graph.node]
    fill = {n.name: n for n in wide.graph.node}["fill"]
    assert numpy_helper.to_array(fill.attribute[0].t).tolist() == [0.25]
    assert fill.attribute[0].t.data_type == T.FLOAT
    assert [i.type.tensor_type.elem_type for i in wide.graph.input] == [T.FLOAT16]
    assert [o.type.tensor_type.elem_type for o in wide.graph.output] == [T.FLOAT16]
    for t in m.graph.initializer:  # every half weight is the same number in float32
        w = {u.name: u for u in wide.graph.initializer}[t.name]
        assert w.data_type == T.FLOAT
        np.testing.assert_array_equal(numpy_helper.to_array(w), numpy_helper.to_array(t).astype(np.float32))
    x = np.random.default_rng(1).standard_normal((2, 3, 16, 16)).astype(np.float16)
    half_out, = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    wide_out, = ort.InferenceSession(wide.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    assert wide_out.dtype == np.float16  # float32 inside: within float16's rounding of the half model
    np.testing.assert_allclose(wide_out.astype(np.float32), half_out.astype(np.float32), rtol=0.02, atol=0.02)


def test_bfloat16_weights_and_subgraph_values_widened():
    """A bfloat16 weight read inside an If branch from the outer scope, and a half input the branch reads: the
    branch's reads follow the float32 copy of the input, its constant is widened."""
    then = helper.make_graph(
        [helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(np.array([2.0], np.float16), "c")),
         helper.make_node("Mul", ["x", "c"], ["t"])], "then", [],
        [helper.make_tensor_value_info("t", T.FLOAT16, None)])
    other = helper.make_graph([helper.make_node("Identity", ["x"], ["e"])], "else", [],
                              [helper.make_tensor_value_info("e", T.FLOAT16, None)])
    nodes = [helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
             helper.make_node("Cast", ["s"], ["s32"], to=T.FLOAT),
             helper.make_node("Constant", [], ["zero"], value=numpy_helper.from_array(np.array(0.0, np.float32), "z")),
             helper.make_node("Greater", ["s32", "zero"], ["cond"]),
             helper.make_node("If", ["cond"], ["b"], then_branch=then, else_branch=other),
             helper.make_node("Cast", ["w"], ["w16"], to=T.FLOAT16),
             helper.make_node("Add", ["b", "w16"], ["y"])]
    import ml_dtypes

    w = numpy_helper.from_array(np.array([0.5, -1.25, 3.0], ml_dtypes.bfloat16), "w")
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", T.FLOAT16, [3])],
                          [helper.make_tensor_value_info("y", T.FLOAT16, [3])], [w])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    wide = ir.normalize(m)
    assert upcast.half_types(wide) == {T.FLOAT16}  # the borders only
    assert {p.key: p.value for p in wide.metadata_props}[upcast.WIDENED_KEY] == "bfloat16,float16"
    assert numpy_helper.to_array(wide.graph.initializer[0]).tolist() == [0.5, -1.25, 3.0]
    branch = next(a.g for n in wide.graph.node if n.op_type == "If" for a in n.attribute if a.name == "then_branch")
    assert branch.node[1].input[0] == "x" + upcast.BORDER_SUFFIX
    assert numpy_helper.to_array(branch.node[0].attribute[0].t).dtype == np.float32
    sess = ort.InferenceSession(wide.SerializeToString(), providers=["CPUExecutionProvider"])
    out, = sess.run(None, {"x": np.array([1.0, 2.0, -0.5], np.float16)})
    assert out.dtype == np.float16 and out.tolist() == [2.5, 2.75, 2.0]


@pytest.mark.parametrize("target", ["onnxruntime", "tvm-x86", "tvm-opencl"])
def test_half_model_quantized_with_half_calibration(target, tmp_path):
    """Before: ONNX Runtime refused the quantized model ("Type 'tensor(float16)' of input parameter (x) of operator
    (QuantizeLinear) ... is invalid"). Now: the convs and the Gemm quantized, float16 in and out, close to the
    model's own output; on tvm-x86 and tvm-opencl (POCL: no cl_khr_fp16, so the border casts are vload_half /
    vstore_half_rte) every integer tensor and the float16 outputs equal to the reference."""
    if target != "onnxruntime":
        pytest.importorskip("tvm", reason="the tvm extra is part of the CI install")
    rng = np.random.default_rng(2)
    calib = {"x": rng.uniform(0, 1, (8, 3, 16, 16)).astype(np.float16)}
    art = qcompile.compile(_half_cnn(), calib=calib, recipe="w8a8", target=target, out_dir=tmp_path / "out",
                           measure_latency=False)
    q = onnx.load(str(art.out_dir / "model.qdq.onnx"))
    assert [i.type.tensor_type.elem_type for i in q.graph.input] == [T.FLOAT16]
    inits = {t.name: t.data_type for t in q.graph.initializer}
    int8_weights = [n for n in q.graph.node if n.op_type == "DequantizeLinear" and inits.get(n.input[0]) == T.INT8]
    assert len(int8_weights) == 2  # the conv's and the Gemm's
    assert art.report["outputs"]["y"]["cosine"] > 0.999
    assert art.report["model"]["computed_in_float32_from"] == "float16"
    out = art.run(calib)["y"]
    assert out.dtype == np.float16 and out.shape == (8, 10)
    if target != "onnxruntime":
        lsb = art.report["lsb_vs_reference"][target]
        assert lsb["integer_ops_exact"] and lsb["equal"] == 1.0, lsb
        assert [o["equal"] for o in lsb["float_outputs"] + lsb["main_outputs"]] == [1.0, 1.0], lsb


def test_opencl_half_borders_round_to_nearest_even_as_the_reference(tmp_path):
    """``y = half(float(x) · 1.37)`` over 4096 float16 values spread from subnormals to past float16's largest
    (inf): the OpenCL kernels store through ``vstore_half_rte`` (no ``half`` arithmetic, which POCL refuses), equal to
    the reference's float16 rounding everywhere, ties, subnormals and overflow included."""
    pytest.importorskip("tvm", reason="the tvm extra is part of the CI install")
    from qcompile.targets.tvm.executors.gpu.opencl import half_storage_only

    nodes = [helper.make_node("Mul", ["x", "k"], ["y"], name="scale")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", T.FLOAT16, [1, 4096])],
                          [helper.make_tensor_value_info("y", T.FLOAT16, [1, 4096])],
                          [numpy_helper.from_array(np.array(1.37, np.float16), "k")])
    rng = np.random.default_rng(4)
    mags = np.exp2(rng.uniform(-26, 15.99, 4096)).astype(np.float16)  # finite inputs; x·1.37 past 65504: inf
    x = (mags * rng.choice([-1, 1], 4096)).astype(np.float16)[None]
    art = qcompile.compile(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), calib={"x": x},
                           recipe="w8a8", target="tvm-opencl", out_dir=tmp_path / "out", measure_latency=False)
    kernels = (art.out_dir / "tvm-opencl" / "main" / "kernels.cl").read_text()
    assert "vstore_half_rte(" in kernels and "vload_half(" in kernels and "cl_khr_fp16" not in kernels
    got = art.run({"x": x})["y"]
    with np.errstate(over="ignore"):
        want = (x.astype(np.float32) * np.float32(np.float16(1.37))).astype(np.float16)
    assert np.isinf(want).any() and (np.abs(want[np.isfinite(want)]) < 6.2e-5).any()  # overflow and subnormals
    np.testing.assert_array_equal(got.view(np.uint16), want.view(np.uint16))
    # half arithmetic left in a kernel: the source stays as TVM wrote it (the device needs cl_khr_fp16)
    src = ("#ifdef cl_khr_fp16\n#pragma OPENCL EXTENSION cl_khr_fp16 : enable\n#endif\n"
           "__kernel void k(__global half* restrict a_ptr) {\n  half t = a_ptr[0];\n  a_ptr[1] = t;\n}\n")
    assert half_storage_only(src) == src


def test_float64_tensors_are_declined_not_quantized(tmp_path):
    """A float32 model with a float64 island (an export's ``x.double()`` around a scaling) and a float64 model:
    QuantizeLinear takes float32 only, so float64 tensors are declined with that reason; the float32 MatMuls around
    the island are quantized. (Before: "pass insert_qdq produced an invalid model ... tensor(double)".)"""
    rng = np.random.default_rng(3)
    w = numpy_helper.from_array((rng.standard_normal((16, 8)) * 0.3).astype(np.float32), "w")
    w2 = numpy_helper.from_array((rng.standard_normal((8, 4)) * 0.3).astype(np.float32), "w2")
    k = numpy_helper.from_array(np.array(1.5, np.float64), "k")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["a"], name="fc0"),
             helper.make_node("Cast", ["a"], ["a64"], to=T.DOUBLE, name="to_double"),
             helper.make_node("Mul", ["a64", "k"], ["m64"], name="scale"),
             helper.make_node("Relu", ["m64"], ["r64"], name="relu"),
             helper.make_node("Cast", ["r64"], ["r"], to=T.FLOAT, name="to_float"),
             helper.make_node("MatMul", ["r", "w2"], ["y"], name="fc1")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", T.FLOAT, ["N", 16])],
                          [helper.make_tensor_value_info("y", T.FLOAT, ["N", 4])], [w, w2, k])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    calib = {"x": rng.standard_normal((8, 16)).astype(np.float32)}
    art = qcompile.compile(model, calib=calib, recipe="w8a8", target="onnxruntime", out_dir=tmp_path / "mixed",
                           measure_latency=False)
    q = onnx.load(str(art.out_dir / "model.qdq.onnx"))
    inits = {t.name: t.data_type for t in q.graph.initializer}
    assert sum(n.op_type == "DequantizeLinear" and inits.get(n.input[0]) == T.INT8 for n in q.graph.node) == 2
    assert art.report["outputs"]["y"]["cosine"] > 0.99

    g64 = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["a"], name="fc0"),
                             helper.make_node("Relu", ["a"], ["y"], name="relu")], "g",
                            [helper.make_tensor_value_info("x", T.DOUBLE, ["N", 16])],
                            [helper.make_tensor_value_info("y", T.DOUBLE, ["N", 8])],
                            [numpy_helper.from_array(numpy_helper.to_array(w).astype(np.float64), "w")])
    art = qcompile.compile(helper.make_model(g64, opset_imports=[helper.make_opsetid("", 17)]),
                           calib={"x": calib["x"].astype(np.float64)}, recipe="w8a8", target="onnxruntime",
                           out_dir=tmp_path / "double", measure_latency=False)
    declined = [d["reason"] for p in art.report["passes"] for d in p["declined"]]
    assert "tensor x is not float32" in declined
    assert not any(n.op_type == "QuantizeLinear" for n in onnx.load(str(art.out_dir / "model.qdq.onnx")).graph.node)
