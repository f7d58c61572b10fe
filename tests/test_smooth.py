import onnx
from onnx import helper

from qcompile import ir
from qcompile.instruments import CheckerInstrument, NumericsInstrument
from qcompile.pass_infra import PassContext, PassManager
from qcompile.passes.smooth import SmoothConfig, SmoothQuantPass
from qcompile.dataset import split_samples

import helpers


def run(model, calib, cfg=None):
    model = onnx.shape_inference.infer_shapes(ir.normalize(model))
    ctx = PassContext(model=model, samples=split_samples(model, calib))
    g = PassManager([SmoothQuantPass(cfg)], [CheckerInstrument(), NumericsInstrument()]).run(ir.to_graph(model), ctx)
    return g, ctx.records[0]


def test_shared_input_with_residual_gets_mul_and_stays_exact():
    calib = helpers.attention_calib()
    calib["x"][..., 3] *= 30.0  # an outlier channel
    g, rec = run(helpers.attention(), calib)
    assert rec["stats"]["mul_inserted"] == 1 and rec["numerics"]["checked"]
    mul = next(n for n in g.nodes if n.op == "Mul" and n.name.endswith("smooth_Mul"))
    readers = {n.name for n in mul.outputs[0].outputs}
    assert readers == {"q_proj", "k_proj", "v_proj"}  # the residual Add still reads x
    assert rec["stats"]["max_channel_outlier_ratio"] > 10


def test_layernorm_affine_fold():
    d = 32
    nodes = [helper.make_node("Mul", ["x", "gamma"], ["xg"], name="ln_gamma"),
             helper.make_node("Add", ["xg", "beta"], ["ln"], name="ln_beta"),
             helper.make_node("MatMul", ["ln", "w1"], ["h"], name="fc1"),
             helper.make_node("MatMul", ["ln", "w2"], ["y"], name="fc2")]
    inits = [helpers.init("gamma", helpers.rand(d)), helpers.init("beta", helpers.rand(d)),
             helpers.init("w1", helpers.rand(d, 8)), helpers.init("w2", helpers.rand(d, 8))]
    m = helpers.make(nodes, [helpers.vi("x", [1, 4, d])], [helpers.vi("h", [1, 4, 8]), helpers.vi("y", [1, 4, 8])],
                     inits)
    g, rec = run(m, {"x": helpers.rand(4, 4, d)}, SmoothConfig(alpha=0.5))
    assert rec["stats"]["folded_into_layernorm"] == 1 and rec["stats"]["mul_inserted"] == 0
    assert [n.op for n in g.nodes].count("Mul") == 1


def test_declined_without_samples():
    model = ir.normalize(helpers.attention())
    ctx = PassContext(model=model)
    res = SmoothQuantPass()(ir.to_graph(model), ctx)
    assert res.modified is False and "no calibration samples" in res.declined[0].reason
