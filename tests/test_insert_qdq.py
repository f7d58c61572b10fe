"""Static and dynamic Q/DQ insertion: layout, what stays float, ORT fusion, numerics, determinism."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

import qcompile
from qcompile.errors import ConfigError

import helpers


def nodes(model):
    return {n.name: n for n in model.graph.node}


def optimized_ops(path, tmp_path):
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    so.log_severity_level = 3
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return [n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node]


@pytest.fixture(scope="module")
def cnn_art(tmp_path_factory):
    out = tmp_path_factory.mktemp("cnn")
    return qcompile.compile(helpers.cnn(), calib=helpers.cnn_calib(), recipe="w8a8", out_dir=out / "o")


def test_cnn_layout(cnn_art, tmp_path):
    m = onnx.load(str(cnn_art.out_dir / "model.qdq.onnx"))
    by_out = {o: n for n in m.graph.node for o in n.output}
    inits = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    convs = [n for n in m.graph.node if n.op_type == "Conv"]
    assert len(convs) == 3
    for c in convs:
        w_dq = by_out[c.input[1]]
        assert w_dq.op_type == "DequantizeLinear"
        assert inits[w_dq.input[0]].dtype == np.int8
        assert inits[w_dq.input[1]].shape == (inits[w_dq.input[0]].shape[0],)  # per output channel
        assert by_out[c.input[0]].op_type == "DequantizeLinear"
        if len(c.input) > 2:
            assert inits[by_out[c.input[2]].input[0]].dtype == np.int32
    # Relu / Clip fused: no Q/DQ between a Conv and its activation, the Q follows the activation
    for act in ("relu1", "relu6"):
        a = nodes(m)[act]
        assert by_out[a.input[0]].op_type == "Conv"
    relu_q = [n for n in m.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == nodes(m)["relu1"].output[0]]
    assert relu_q and int(inits[relu_q[0].input[2]]) == 0  # zero point = qmin so ORT drops the Relu
    ops = optimized_ops(cnn_art.out_dir / "model.qdq.onnx", tmp_path)
    assert ops.count("QLinearConv") == 3 and "QLinearAdd" in ops and "QGemm" in ops
    assert "Relu" not in ops and "Clip" not in ops


def test_cnn_accuracy_and_report(cnn_art):
    rep = cnn_art.report
    assert rep["outputs"]["y"]["sqnr_db"] > 25
    assert rep["layers"] and all(r["sqnr_db"] > 15 for r in rep["layers"])
    assert {"fp32", "quantized"} <= set(rep["latency_ms"])


def test_attention_mask_and_residual_stay_float(tmp_path):
    art = qcompile.compile(helpers.attention(), calib=helpers.attention_calib(), recipe="w8a8", out_dir=tmp_path)
    m = onnx.load(str(art.out_dir / "model.qdq.onnx"))
    by_out = {o: n for n in m.graph.node for o in n.output}
    quantized = [n for n in m.graph.node if n.op_type == "QuantizeLinear"]
    assert len(quantized) == 1  # the projections' input only (x, or x smoothed by a Mul: x is a graph input)
    assert quantized[0].input[0] == "x" or by_out[quantized[0].input[0]].input[0] == "x"
    dq = next(n for n in m.graph.node if n.op_type == "DequantizeLinear" and n.input[0] == quantized[0].output[0])
    assert all(nodes(m)[p].input[0] == dq.output[0] for p in ("q_proj", "k_proj", "v_proj"))
    for proj in ("q_proj", "k_proj", "v_proj"):  # MatMul bias becomes int32 so ORT forms QGemm
        add = next(n for n in m.graph.node if n.input and n.input[0] == nodes(m)[proj].output[0])
        assert by_out[add.input[1]].op_type == "DequantizeLinear"
    declined = [d for p in art.report["passes"] for d in p["declined"]]
    assert {d["node"] for d in declined} == {"scores", "context"}
    ops = optimized_ops(art.out_dir / "model.qdq.onnx", tmp_path)
    assert "Gemm" not in ops and "MatMul" in ops  # no float Gemm with run-time weight DQ


def test_activation_matmul_and_sentinels(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: amm\npasses:\n  - fold_constants\n  - name: insert_qdq\n    activation_matmul: true\n"
                      "    chain_ops: [Add, Mul]\n")
    art = qcompile.compile(helpers.attention(), calib=helpers.attention_calib(), recipe=recipe,
                           out_dir=tmp_path / "o")
    m = onnx.load(str(art.out_dir / "model.qdq.onnx"))
    quantized = {n.input[0] for n in m.graph.node if n.op_type == "QuantizeLinear"}
    assert {"p", "q", "kt", "v"} <= quantized
    assert "madd0" not in quantized and "madd" not in quantized and "s2" not in quantized
    assert art.report["calibration"]["table"]["madd0"]["n_sentinel"] > 0
    assert art.report["outputs"]["y"]["cosine"] > 0.99


def test_overrides_exact_and_pattern(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: ov\npasses:\n  - fold_batchnorm\n  - name: insert_qdq\n    overrides:\n"
                      "      conv3: {quantize: false}\n      're:conv[12]': {weight_granularity: per_tensor}\n")
    art = qcompile.compile(helpers.cnn(), calib=helpers.cnn_calib(), recipe=recipe, out_dir=tmp_path / "o")
    m = onnx.load(str(art.out_dir / "model.qdq.onnx"))
    by_out = {o: n for n in m.graph.node for o in n.output}
    inits = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    n = nodes(m)
    assert n["conv3"].input[1] == "w3"  # left float
    assert inits[by_out[n["conv1"].input[1]].input[1]].shape == ()  # per-tensor
    assert any(d["node"] == "conv3" and "override" in d["reason"]
               for p in art.report["passes"] for d in p["declined"])


def test_weight_file_shrinks_4x(tmp_path):
    from onnx import helper
    nodes_ = [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")]
    m = helpers.make(nodes_, [helpers.vi("x", [1, 256])], [helpers.vi("y", [1, 256])],
                     [helpers.init("w", helpers.rand(256, 256))])
    art = qcompile.compile(m, calib={"x": helpers.rand(4, 256)}, recipe="w8a8", out_dir=tmp_path)
    assert art.report["sizes"]["model"] < art.report["sizes"]["fp32"] / 3.8


def test_byte_identical(tmp_path):
    model, calib = helpers.cnn(), helpers.cnn_calib()
    a = qcompile.compile(model, calib=calib, recipe="w8a8", out_dir=tmp_path / "a", measure_latency=False)
    b = qcompile.compile(model, calib=calib, recipe="w8a8", out_dir=tmp_path / "b", measure_latency=False)
    assert (a.out_dir / "model.qdq.onnx").read_bytes() == (b.out_dir / "model.qdq.onnx").read_bytes()


def test_dynamic_recipe_fuses(tmp_path):
    art = qcompile.compile(helpers.attention(), calib=helpers.attention_calib(), recipe="w8a8-dynamic",
                           out_dir=tmp_path)
    ops = optimized_ops(art.out_dir / "model.qdq.onnx", tmp_path)
    assert ops.count("DynamicQuantizeMatMul") + ops.count("MatMulIntegerToFloat") == 3
    assert art.report["outputs"]["y"]["cosine"] > 0.999


def test_unknown_config_key():
    from qcompile.recipe import Recipe
    with pytest.raises(ConfigError, match="unknown key"):
        Recipe.from_dict({"name": "x", "passes": [{"name": "insert_qdq", "weight_dtyp": "int8"}]})
    with pytest.raises(ConfigError, match="not one of"):
        Recipe.from_dict({"name": "x", "passes": [{"name": "insert_qdq", "weight_granularity": "per_row"}]})
    with pytest.raises(ConfigError, match="observer"):
        Recipe.from_dict({"name": "x", "passes": [{"name": "insert_qdq", "observer": "magic"}]})
