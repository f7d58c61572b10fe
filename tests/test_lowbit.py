"""Low bit widths in insert_qdq (b-bit grids in int8/uint8, integer Clip, INT4 storage) and quantizer hints."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

import qcompile
from qcompile import ir, numerics, quant_math
from qcompile.dataset import split_samples
from qcompile.driver import _calibrator
from qcompile.errors import ConfigError, PassError
from qcompile.instruments import CheckerInstrument
from qcompile.pass_infra import PassContext, PassManager
from qcompile.passes.insert_qdq import InsertQDQPass, QDQConfig
from qcompile.recipe import EQUIVALENCE, Recipe, load_recipe
from qcompile.types import QParams, QuantDType

import helpers

RNG = np.random.default_rng(7)


def rand(*shape, scale=1.0):
    return (RNG.standard_normal(shape) * scale).astype(np.float32)


def qdq_recipe(**cfg) -> Recipe:
    return Recipe.from_dict({"name": "t", "passes": list(EQUIVALENCE) + [{"name": "insert_qdq", **cfg}]})


def mlp(opset: int = 13) -> onnx.ModelProto:
    """x -> MatMul(w1) + b1 -> Relu -> Gemm(w2, b2, transB) -> y."""
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h0"], name="mm"),
             helper.make_node("Add", ["h0", "b1"], ["h1"], name="bias"),
             helper.make_node("Relu", ["h1"], ["h"], name="relu"),
             helper.make_node("Gemm", ["h", "w2", "b2"], ["y"], name="fc", transB=1)]
    inits = [helpers.init("w1", rand(16, 32, scale=0.3)), helpers.init("b1", rand(32, scale=0.1)),
             helpers.init("w2", rand(8, 32, scale=0.3)), helpers.init("b2", rand(8, scale=0.1))]
    return helpers.make(nodes, [helpers.vi("x", ["N", 16])], [helpers.vi("y", ["N", 8])], inits, opset=opset)


MLP_CALIB = {"x": rand(16, 16)}


def compiled(tmp_path, model, calib, **cfg):
    art = qcompile.compile(model, calib=calib, recipe=qdq_recipe(**cfg), out_dir=tmp_path, measure_latency=False)
    m = onnx.load(str(art.out_dir / "model.qdq.onnx"))
    stats = next(p for p in art.report["passes"] if p["pass"] == "insert_qdq")
    return art, m, stats


def by_output(m):
    return {o: n for n in m.graph.node for o in n.output}


def inits(m):
    return {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}


def run_qdq(model, calib, cfg: QDQConfig, qparam_hints=None, weight_hints=None):
    """insert_qdq alone on a model, with hints placed in the context as an earlier pass would."""
    fp32 = ir.normalize(model)
    p = InsertQDQPass(cfg)
    ctx = PassContext(model=fp32, samples=split_samples(fp32, calib), calibrator=_calibrator([p]),
                      qparam_hints=dict(qparam_hints or {}), weight_hints=dict(weight_hints or {}))
    graph = PassManager([p], [CheckerInstrument()]).run(ir.to_graph(fp32), ctx)
    return ir.to_model(graph, fp32), ctx.records[-1]


# ---------------------------------------------------------------- quant_math


def test_quant_math_bits():
    w = rand(6, 5)
    qp = quant_math.weight_qparams(w, 0, QuantDType.INT8, bits=4)
    np.testing.assert_allclose(qp.scale, np.abs(w).max(axis=1) / 7, rtol=1e-6)
    q = quant_math.quantize_weight(w, qp, QuantDType.INT8, bits=4)
    assert q.dtype == np.int8 and q.min() >= -7 and q.max() <= 7 and np.abs(q).max(axis=1).tolist() == [7] * 6
    qa = quant_math.weight_qparams(w, 0, QuantDType.INT8, symmetric=False, bits=3)
    qa_q = quant_math.quantize_weight(w, qa, QuantDType.INT8, symmetric=False, bits=3)
    assert qa_q.min() >= -4 and qa_q.max() <= 3
    a = quant_math.activation_qparams(-1.0, 2.0, QuantDType.UINT8, False, bits=4)
    assert float(a.scale) == pytest.approx(3.0 / 15) and int(a.zero_point) == 5
    s = quant_math.activation_qparams(-1.0, 2.0, QuantDType.INT8, True, bits=4)
    assert float(s.scale) == pytest.approx(2.0 / 7.5) and int(s.zero_point) == 0
    assert int(quant_math.activation_qparams(-1.0, 2.0, QuantDType.UINT8, True, bits=6).zero_point) == 32
    x = np.linspace(-10, 10, 101, dtype=np.float32)
    assert quant_math.quantize(x, a, QuantDType.UINT8, bits=4).max() == 15
    # 8 bits is the default, value for value
    for sym in (True, False):
        for dt in QuantDType:
            p8, p = quant_math.weight_qparams(w, 1, dt, sym, bits=8), quant_math.weight_qparams(w, 1, dt, sym)
            assert np.array_equal(p8.scale, p.scale) and np.array_equal(p8.zero_point, p.zero_point)
            q8, q = quant_math.quantize_weight(w, p8, dt, sym, 8), quant_math.quantize_weight(w, p, dt, sym)
            assert np.array_equal(q8, q)
    with pytest.raises(ValueError):
        quant_math.weight_qparams(w, 0, QuantDType.INT8, bits=9)


@pytest.mark.parametrize("cfg", [{"weight_bits": 1}, {"activation_bits": 9}, {"weight_bits": True},
                                 {"weight_bits": 8, "weight_storage": "int4"},
                                 {"weight_bits": 4, "weight_storage": "int4", "weight_dtype": "uint8"},
                                 {"weight_storage": "int2"}])
def test_config_validation(cfg):
    with pytest.raises(ConfigError):
        qdq_recipe(**cfg)


def test_builtin_recipes():
    rs = {n: load_recipe(n) for n in ("w8a8", "w6a6", "w4a4")}
    for n, bits in (("w6a6", 6), ("w4a4", 4)):
        assert [p.name for p in rs[n].passes] == [p.name for p in rs["w8a8"].passes]
        cfg = rs[n].passes[-1].config
        assert cfg["weight_bits"] == cfg["activation_bits"] == bits and cfg["observer"] == "percentile"
    assert "weight_bits" not in rs["w8a8"].passes[-1].config
    assert Recipe.from_yaml(rs["w4a4"].to_yaml()).to_dict() == rs["w4a4"].to_dict()


# ---------------------------------------------------------------- b-bit activations and weights


def test_4bit_layout_clip_and_fusion(tmp_path):
    art, m, stats = compiled(tmp_path / "o", helpers.cnn(), helpers.cnn_calib(), weight_bits=4, activation_bits=4)
    bo, vals = by_output(m), inits(m)
    for n in m.graph.node:
        if n.op_type in ("Conv", "Gemm"):
            wq = vals[bo[n.input[1]].input[0]]
            assert wq.dtype == np.int8 and wq.min() >= -7 and wq.max() <= 7 and np.abs(wq).max() == 7
    qs = [n for n in m.graph.node if n.op_type == "QuantizeLinear"]
    consumers = {i: n for n in m.graph.node for i in n.input}
    for q in qs:  # every Q -> Clip(0, 15) on uint8 -> DQ, but after a same-scale op (Flatten): levels stay in range
        clip = consumers[q.output[0]]
        if q.input[0] in bo and bo[q.input[0]].op_type == "Flatten":
            assert clip.op_type == "DequantizeLinear"
            continue
        assert clip.op_type == "Clip" and vals[clip.input[1]].dtype == np.uint8
        assert (int(vals[clip.input[1]]), int(vals[clip.input[2]])) == (0, 15)
        assert consumers[clip.output[0]].op_type == "DequantizeLinear"
    assert stats["stats"]["inserted"]["Clip"] == len(qs) - 1
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    so.log_severity_level = 3
    ort.InferenceSession(str(art.out_dir / "model.qdq.onnx"), so, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node]
    assert ops.count("QLinearConv") == 3 and "QGemm" in ops  # the integer Clip keeps ORT's fusions


def test_covered_activation_bypass_is_exact(tmp_path, monkeypatch):
    """ReLU6 (Clip 0..6) before a 4-bit QuantizeLinear whose grid it covers is bypassed, with the same outputs."""
    from qcompile.passes import insert_qdq

    model, calib, x = helpers.cnn(), helpers.cnn_calib(), rand(32, 3, 8, 8) * 3
    _, m, st = compiled(tmp_path / "a", model, calib, weight_bits=4, activation_bits=4, observer="minmax")
    names = {n.name for n in m.graph.node}
    assert "relu6" not in names and "relu1" not in names and st["stats"]["inserted"]["bypassed_activations"] >= 2
    monkeypatch.setattr(insert_qdq, "_covered_activation", lambda *a: False)
    _, m_keep, _ = compiled(tmp_path / "b", model, calib, weight_bits=4, activation_bits=4, observer="minmax")
    assert "relu6" in {n.name for n in m_keep.graph.node}
    y, y_keep = (numerics.run(numerics.session(mm), {"x": x})["y"] for mm in (m, m_keep))
    np.testing.assert_array_equal(y, y_keep)


def test_8bit_adds_no_clip(tmp_path):
    _, m, stats = compiled(tmp_path, helpers.cnn(), helpers.cnn_calib())
    qouts = {o for n in m.graph.node if n.op_type == "QuantizeLinear" for o in n.output}
    assert not any(n.op_type == "Clip" and n.input[0] in qouts for n in m.graph.node)
    assert "Clip" not in stats["stats"]["inserted"]


@pytest.mark.parametrize("sym,lo,hi", [(False, 0, 7), (True, -4, 3)])
def test_activation_levels_stay_in_b_bits(tmp_path, sym, lo, hi):
    """Inputs far outside the calibrated range still land on the b-bit grid (QuantizeLinear alone would give
    levels up to the 8-bit type's limits)."""
    dtype = "int8" if sym else "uint8"
    _, m, _ = compiled(tmp_path, mlp(), MLP_CALIB, weight_bits=3, activation_bits=3, activation_symmetric=sym,
                       activation_dtype=dtype, observer="minmax")
    dq = next(n for n in m.graph.node if n.op_type == "DequantizeLinear" and n.output[0].startswith("x_"))
    m.graph.output.append(helper.make_tensor_value_info(dq.output[0], onnx.TensorProto.FLOAT, None))
    x = MLP_CALIB["x"] * 50
    xd = numerics.run(numerics.session(m), {"x": x}, [dq.output[0]])[dq.output[0]]
    vals = inits(m)
    s, z = float(vals[dq.input[1]]), int(vals[dq.input[2]])
    levels = np.rint(xd / s) + z
    assert np.allclose(levels * s, xd + z * s, atol=1e-5 * np.abs(xd).max())
    assert levels.min() == lo and levels.max() == hi


def test_6bit_better_than_4bit(tmp_path):
    model, calib = helpers.cnn(), helpers.cnn_calib()
    sq = {b: compiled(tmp_path / str(b), model, calib, weight_bits=b, activation_bits=b)[0]
          .report["outputs"]["y"]["sqnr_db"] for b in (4, 6, 8)}
    assert sq[4] < sq[6] < sq[8]


# ---------------------------------------------------------------- INT4 storage


def test_int4_storage_at_opset21_is_exact_and_smaller(tmp_path):
    model21 = mlp(opset=21)
    x = rand(8, 16)
    _, m8, s8 = compiled(tmp_path / "a", model21, MLP_CALIB, weight_bits=4, activation_bits=4,
                         weight_storage="int8")
    _, m4, s4 = compiled(tmp_path / "b", model21, MLP_CALIB, weight_bits=4, activation_bits=4, weight_storage="int4")
    assert s8["stats"]["weight_storage"] == "int8" and s4["stats"]["weight_storage"] == "int4"
    w4 = [i for i in m4.graph.initializer if i.data_type == onnx.TensorProto.INT4]
    assert len(w4) == 4  # two weights and their zero points
    nbytes = (16 * 32 + 8 * 32) // 2
    assert s4["stats"]["weight_bytes_quantized"] == nbytes == s8["stats"]["weight_bytes_quantized"] // 2
    assert m4.ir_version >= 10 and m4.ByteSize() < m8.ByteSize()
    y8, y4 = (numerics.run(numerics.session(m), {"x": x})["y"] for m in (m8, m4))
    np.testing.assert_array_equal(y8, y4)  # the same graph semantics
    # optimized, ORT runs int8 weights in integer kernels and INT4 ones dequantized in float: fp32 rounding apart
    y8, y4 = (numerics.run(numerics.session(m, optimize=True), {"x": x})["y"] for m in (m8, m4))
    assert numerics.within_fp32_tolerance(y8, y4)
    _, m8x, _ = compiled(tmp_path / "c", model21, MLP_CALIB, weight_bits=4, activation_bits=4, weight_storage="int4")
    assert m8x.SerializeToString() == m4.SerializeToString()  # deterministic, INT4 packing included


def test_int4_auto_keeps_int8_below_opset21_and_forced_upgrades(tmp_path):
    _, m, st = compiled(tmp_path / "a", mlp(), MLP_CALIB, weight_bits=4, activation_bits=4)
    assert st["stats"]["weight_storage"] == "int8" and ir.default_opset(m) == 13
    _, m, st = compiled(tmp_path / "b", mlp(), MLP_CALIB, weight_bits=4, activation_bits=4, weight_storage="int4")
    assert st["stats"]["weight_storage"] == "int4" and ir.default_opset(m) == 21
    assert any(i.data_type == onnx.TensorProto.INT4 for i in m.graph.initializer)
    numerics.run(numerics.session(m, optimize=True), {"x": rand(2, 16)})
    _, m, st = compiled(tmp_path / "c", mlp(opset=21), MLP_CALIB, weight_bits=5, activation_bits=4)
    assert st["stats"]["weight_storage"] == "int8"  # 5-bit values do not fit INT4


def test_int4_forced_upgrade_failure_is_config_error(tmp_path, monkeypatch):
    from qcompile.passes import insert_qdq

    def boom(model, version):
        raise RuntimeError("no adapter for op Foo")
    monkeypatch.setattr(insert_qdq.version_converter, "convert_version", boom)
    with pytest.raises(ConfigError, match="opset 21.*no adapter"):
        compiled(tmp_path, mlp(), MLP_CALIB, weight_bits=4, activation_bits=4, weight_storage="int4")


# ---------------------------------------------------------------- hints


def test_activation_hint_used_verbatim():
    hint = QParams(np.array(0.0123, np.float32), np.array(17, np.uint8))
    m, rec = run_qdq(mlp(), MLP_CALIB, QDQConfig(), qparam_hints={"x": hint, "not_a_tensor": hint})
    q = next(n for n in m.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "x")
    vals = inits(m)
    assert vals[q.input[1]].dtype == np.float32 and vals[q.input[1]] == hint.scale
    assert vals[q.input[2]].dtype == np.uint8 and vals[q.input[2]] == hint.zero_point
    assert rec["stats"]["hints_used"] == {"activation": 1, "weight": 0}
    assert any(d["node"] == "not_a_tensor" and "hint not used" in d["reason"] for d in rec["declined"])
    # the bias of the MatMul is quantized at the hinted input scale times the weight scale
    bo = by_output(m)
    add = next(n for n in m.graph.node if n.op_type == "Add")
    w_dq = bo[next(n for n in m.graph.node if n.op_type == "MatMul").input[1]]
    np.testing.assert_allclose(vals[bo[add.input[1]].input[1]], np.float32(0.0123) * vals[w_dq.input[1]], rtol=1e-7)


def test_weight_hint_used_verbatim_and_bias_from_hinted_scale():
    w1 = numpy_helper.to_array(next(i for i in mlp().graph.initializer if i.name == "w1"))
    q = RNG.integers(-7, 8, w1.shape).astype(np.int8)
    scale = RNG.uniform(0.01, 0.02, w1.shape[1]).astype(np.float32)
    hint = (q, QParams(scale, np.zeros(w1.shape[1], np.int8), 1))
    m, rec = run_qdq(mlp(), MLP_CALIB, QDQConfig(weight_bits=4, activation_bits=4), weight_hints={"w1": hint})
    bo, vals = by_output(m), inits(m)
    mm = next(n for n in m.graph.node if n.op_type == "MatMul")
    dq = bo[mm.input[1]]
    assert np.array_equal(vals[dq.input[0]], q) and vals[dq.input[0]].dtype == np.int8
    assert np.array_equal(vals[dq.input[1]], scale)
    add = next(n for n in m.graph.node if n.op_type == "Add")
    x_scale = vals[bo[mm.input[0]].input[1]]
    np.testing.assert_allclose(vals[bo[add.input[1]].input[1]], x_scale * scale, rtol=1e-7)
    assert rec["stats"]["hints_used"] == {"activation": 0, "weight": 1}


@pytest.mark.parametrize("bad,match", [
    (lambda q, qp: (q[:, :5], qp), "shape"),
    (lambda q, qp: (q, QParams(qp.scale, qp.zero_point, 0)), "axis"),
    (lambda q, qp: (q, QParams(qp.scale[:3], qp.zero_point[:3], 1)), "scale shape"),
    (lambda q, qp: (q.astype(np.float32), qp), "integer"),
    (lambda q, qp: (q * 3, qp), "outside the 4-bit"),
    (lambda q, qp: (q, QParams(qp.scale.astype(np.float64), qp.zero_point, 1)), "float32"),
])
def test_weight_hint_mismatch_is_pass_error(bad, match):
    q = RNG.integers(-7, 8, (16, 32)).astype(np.int8)
    qp = QParams(np.full(32, 0.01, np.float32), np.zeros(32, np.int8), 1)
    with pytest.raises(PassError, match=f"w1.*{match}"):
        run_qdq(mlp(), MLP_CALIB, QDQConfig(weight_bits=4), weight_hints={"w1": bad(q, qp)})


def test_activation_hint_mismatch_is_pass_error():
    per_channel = QParams(np.full(16, 0.1, np.float32), np.zeros(16, np.uint8), 1)
    with pytest.raises(PassError, match="x.*per tensor"):
        run_qdq(mlp(), MLP_CALIB, QDQConfig(), qparam_hints={"x": per_channel})
    wide_zp = QParams(np.array(0.1, np.float32), np.array(200, np.uint8))
    with pytest.raises(PassError, match="4-bit"):
        run_qdq(mlp(), MLP_CALIB, QDQConfig(activation_bits=4), qparam_hints={"x": wide_zp})


def test_auto_storage_is_int8_even_at_opset21(tmp_path):
    model21 = mlp(opset=21)
    _, m, st = compiled(tmp_path / "a", model21, MLP_CALIB, weight_bits=4, activation_bits=4)
    assert st["stats"]["weight_storage"] == "int8"
