"""AWQ: the scaling is fp32-exact (numerics instrument), the hints are what insert_qdq stores, and on activations
with outlier channels AWQ beats round-to-nearest int4 blocks on held-out data."""
import helpers
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

from qcompile import ir, quant_math
from qcompile.calibrate import calibrate, float_activations
from qcompile.dataset import split_samples
from qcompile.errors import ConfigError
from qcompile.instruments import CheckerInstrument, NumericsInstrument
from qcompile.observers import make_observer
from qcompile.pass_infra import PassContext, PassManager
from qcompile.passes.awq import AWQConfig, AWQPass, awq_scales
from qcompile.passes.insert_qdq import InsertQDQPass, QDQConfig
from qcompile.types import QuantDType

D, HID, SEQ = 64, 128, 8


def block_model(seed: int = 0) -> onnx.ModelProto:
    """RMSNorm (γ with a few large channels: activation outliers, as in LLMs) -> q/k projections and a SwiGLU MLP
    (gate, up, silu(gate)·up, down); outputs q, k and the MLP output."""
    rng = np.random.default_rng(seed)
    g = np.abs(rng.standard_normal(D)).astype(np.float32) + 0.5
    g[[3, 17, 40]] *= 25.0
    nodes = helpers.rmsnorm("x", "g", "n") + [
        helper.make_node("MatMul", ["n", "wq"], ["q"], name="q_proj"),
        helper.make_node("MatMul", ["n", "wk"], ["k"], name="k_proj"),
        helper.make_node("MatMul", ["n", "wg"], ["gate"], name="gate_proj"),
        helper.make_node("MatMul", ["n", "wu"], ["up"], name="up_proj"),
        helper.make_node("Sigmoid", ["gate"], ["sig"], name="sig"),
        helper.make_node("Mul", ["gate", "sig"], ["silu"], name="silu"),
        helper.make_node("Mul", ["silu", "up"], ["prod"], name="gated"),
        helper.make_node("MatMul", ["prod", "wd"], ["y"], name="down_proj")]
    r = lambda *s: (rng.standard_normal(s) / np.sqrt(s[0])).astype(np.float32)
    inits = [helpers.init("g", g), helpers.init("eps", np.array(1e-6, np.float32)), helpers.init("wq", r(D, D)),
             helpers.init("wk", r(D, D)), helpers.init("wg", r(D, HID)), helpers.init("wu", r(D, HID)),
             helpers.init("wd", r(HID, D))]
    outs = [helpers.vi("q", ["B", SEQ, D]), helpers.vi("k", ["B", SEQ, D]), helpers.vi("y", ["B", SEQ, D])]
    return onnx.shape_inference.infer_shapes(ir.normalize(
        helpers.make(nodes, [helpers.vi("x", ["B", SEQ, D])], outs, inits)))


def data(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, SEQ, D)).astype(np.float32)


W4 = {"weight_only": True, "weight_bits": 4, "weight_granularity": "per_block", "weight_block": 32}


def minmax_calibrator(graph, ctx):
    """What the driver gives insert_qdq (weight-only mode reads no range, but the manager calibrates first)."""
    return calibrate(graph, ctx.model, ctx.samples, float_activations(graph), lambda _n: make_observer("minmax"))


def compile_(model, calib, awq: AWQConfig | None):
    ctx = PassContext(model=model, samples=split_samples(model, {"x": calib}), calibrator=minmax_calibrator)
    passes = ([AWQPass(awq)] if awq is not None else []) + [InsertQDQPass(QDQConfig.from_dict(W4))]
    g = PassManager(passes, [CheckerInstrument(), NumericsInstrument()]).run(ir.to_graph(model), ctx)
    return ir.to_model(g, model), ctx


def run(model, x):
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    s = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in s.get_outputs()], s.run(None, {"x": x})))


def rel_err(out, ref) -> float:
    return sum(float(np.sum((out[k] - ref[k]) ** 2)) for k in ref) / sum(float(np.sum(ref[k] ** 2)) for k in ref)


def test_awq_beats_rtn_on_outlier_channels_held_out():
    model = block_model()
    held = data(16, 1)
    ref = run(model, held)
    rtn, _ = compile_(model, data(32, 0), None)
    awq, ctx = compile_(model, data(32, 0), AWQConfig(weight_block=32))
    e_rtn, e_awq = rel_err(run(rtn, held), ref), rel_err(run(awq, held), ref)
    assert e_awq < 0.7 * e_rtn, (e_awq, e_rtn)
    rec = ctx.records[0]
    assert rec["numerics"]["checked"]  # the scaling alone is fp32-exact (rtol 1e-5, atol 1e-6)
    assert rec["stats"]["scaled"] >= 1 and rec["stats"]["hinted"] == 5
    assert all(e["clipped_rel_err"] <= e["rtn_rel_err"] * 1.0001 for e in rec["stats"]["layers"])
    assert ctx.records[1]["stats"]["hints_used"]["weight"] == 5
    # 1/s went into γ and into up_proj's columns (SwiGLU product): no inserted Mul
    assert rec["stats"]["mul_inserted"] == 0 and set(rec["stats"]["folded"]) <= {"norm", "product"}


def test_scaling_is_fp32_exact_and_hints_are_stored_as_they_are():
    model = block_model(seed=2)
    calib = data(16, 3)
    ctx = PassContext(model=model, samples=split_samples(model, {"x": calib}))
    g = AWQPass(AWQConfig(weight_block=32))(ir.to_graph(model), ctx).graph
    scaled = ir.to_model(g, model)
    before, after = run(model, calib[:4]), run(scaled, calib[:4])
    for k in before:
        np.testing.assert_allclose(after[k], before[k], rtol=1e-5, atol=1e-6 * float(np.abs(before[k]).max()))
    gamma_old = numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "g"))
    gamma_new = next(n for n in g.nodes if n.name == "n_gamma").inputs[1].values
    assert not np.allclose(gamma_old, gamma_new)  # 1/s folded into the RMSNorm weight
    clipped = 0
    for node in (n for n in g.nodes if n.op == "MatMul"):
        w = node.inputs[1].values
        q, qp = ctx.weight_hints[node.inputs[1].name]
        rtn = quant_math.block_qparams(w, 0, 32, QuantDType.INT8, True, 4)
        assert np.all(qp.scale <= rtn.scale * (1 + 1e-6))  # clipping only shrinks ranges
        clipped += int(np.sum(qp.scale < rtn.scale * 0.999))
        np.testing.assert_array_equal(q, quant_math.quantize_weight(w, qp, QuantDType.INT8, True, 4))
    assert clipped > 0
    out = ir.to_model(InsertQDQPass(QDQConfig.from_dict(W4))(g, ctx).graph, model)
    inits = {i.name: numpy_helper.to_array(i) for i in out.graph.initializer}
    for dq in (n for n in out.graph.node if n.op_type == "DequantizeLinear"):
        node = next(n for n in out.graph.node if dq.output[0] in n.input)
        hint = next(h for name, h in ctx.weight_hints.items() if dq.input[0].startswith(name + "_quantized"))
        assert node.op_type == "MatMul"
        np.testing.assert_array_equal(np.asarray(inits[dq.input[0]]).astype(np.int8), hint[0])
        np.testing.assert_array_equal(inits[dq.input[1]], hint[1].scale)


def test_alpha_zero_only_is_rtn_scales_with_clipping():
    model = block_model()
    ctx = PassContext(model=model, samples=split_samples(model, {"x": data(8, 0)}))
    res = AWQPass(AWQConfig(alpha_grid=(0.0,)))(ir.to_graph(model), ctx)
    assert res.modified is False and res.stats["scaled"] == 0 and res.stats["hinted"] == 5


def test_awq_scales_normalized():
    s = awq_scales(np.array([0.0, 1.0, 4.0, 16.0]), 0.5)
    assert s.max() * s.min() == pytest.approx(1.0) and s[0] == s[1]  # an inactive channel as the least active
    assert np.all(awq_scales(np.array([1.0, 5.0]), 0.0) == 1.0)


def test_declined_without_samples_and_config_errors():
    model = block_model()
    res = AWQPass()(ir.to_graph(model), PassContext(model=model))
    assert res.modified is False and "no calibration samples" in res.declined[0].reason
    with pytest.raises(ConfigError, match="unknown key"):
        AWQConfig.from_dict({"alpha": 0.5}, "awq")
    with pytest.raises(ConfigError, match="weight_block"):
        AWQConfig.from_dict({"weight_block": 48}, "awq")
    with pytest.raises(ConfigError, match="clip_grid"):
        AWQConfig.from_dict({"clip_grid": [1.2]}, "awq")


def test_builtin_recipes_end_to_end(tmp_path):
    """w4a16 / w4a16-awq through the driver: MatMulNBits model, AWQ checked fp32-exact, AWQ closer to fp32."""
    import qcompile

    model = block_model()
    onnx.save(model, tmp_path / "m.onnx")
    held = data(16, 1)
    ref = run(model, held)
    errs = {}
    for name in ("w4a16", "w4a16-awq"):
        art = qcompile.compile(str(tmp_path / "m.onnx"), calib={"x": data(32, 0)}, recipe=name,
                               out_dir=str(tmp_path / name), measure_latency=False)
        q = onnx.load(str(tmp_path / name / "model.qdq.onnx"))
        assert [n.op_type for n in q.graph.node].count("MatMulNBits") == 5
        assert not any(n.op_type == "QuantizeLinear" for n in q.graph.node)
        errs[name] = rel_err(run(q, held), ref)
        if name == "w4a16-awq":
            rec = next(p for p in art.report["passes"] if p["pass"] == "awq")
            assert rec["numerics"]["checked"] and rec["numerics"]["within_fixed_tolerance"]
    assert errs["w4a16-awq"] < 0.7 * errs["w4a16"], errs
