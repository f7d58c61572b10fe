"""A network inside an If is calibrated branch by branch and quantized, never handed back unchanged in silence."""
import numpy as np
import onnx

import qcompile

import helpers


def _calib(n, flags):
    return {"x": helpers.rand(n, 3, 8, 8), "flag": np.array(flags, dtype=bool)}


def _branch_ops(model):
    ifn = next(n for n in model.graph.node if n.op_type == "If")
    return {a.name: [n.op_type for n in a.g.node] for a in ifn.attribute}


def test_if_branches_are_quantized(tmp_path):
    art = qcompile.compile(helpers.if_model(), calib=_calib(8, [True, False] * 4), recipe="w8a8", out_dir=tmp_path)
    m = onnx.load(str(tmp_path / "model.qdq.onnx"))
    ops = _branch_ops(m)
    assert ops["then_branch"].count("QuantizeLinear") >= 2 and ops["then_branch"].count("Conv") == 2
    assert ops["else_branch"].count("QuantizeLinear") >= 1
    table = art.report["calibration"]["table"]
    assert {"t1", "t2", "e_out"} <= set(table)
    q = art.report["passes"][-1]
    assert q["stats"]["quantized_nodes"]["Conv"] == 3 and q["stats"]["graphs"] == 3
    assert art.report["outputs"]["y"]["sqnr_db"] > 25
    x = _calib(4, [True, False, True, False])
    ref = onnx.load(str(tmp_path / "model.qdq.onnx"))
    assert ref.graph.node  # and the quantized model runs on both branches
    out = art.run(x)
    assert out["y"].shape == (4, 1, 10) and np.all(np.isfinite(out["y"]))  # stacked: flag is given per sample


def test_untaken_branch_is_reported(tmp_path):
    art = qcompile.compile(helpers.if_model(), calib=_calib(4, [True] * 4), recipe="w8a8", out_dir=tmp_path)
    ops = _branch_ops(onnx.load(str(tmp_path / "model.qdq.onnx")))
    # x's range is known from the main graph, the branch's own tensors are not: only the input side is quantized
    assert ops["else_branch"].count("QuantizeLinear") == 1 and "e_out" not in art.report["calibration"]["table"]
    reasons = [d["reason"] for p in art.report["passes"] for d in p["declined"]]
    assert any("taken by no calibration sample" in r for r in reasons)


def test_dynamic_recipe_walks_if_branches(tmp_path):
    from onnx import helper
    then_g = helper.make_graph([helper.make_node("MatMul", ["x", "w1"], ["t"], name="then_mm")], "then", [],
                               [helpers.vi("t", None)])
    else_g = helper.make_graph([helper.make_node("MatMul", ["x", "w2"], ["e"], name="else_mm")], "else", [],
                               [helpers.vi("e", None)])
    m = helpers.make([helper.make_node("If", ["flag"], ["y"], name="br", then_branch=then_g, else_branch=else_g)],
                     [helpers.vi("x", [1, 32]), helpers.vi("flag", [], onnx.TensorProto.BOOL)],
                     [helpers.vi("y", [1, 16])],
                     [helpers.init("w1", helpers.rand(32, 16)), helpers.init("w2", helpers.rand(32, 16))])
    art = qcompile.compile(m, calib={"x": helpers.rand(2, 32), "flag": np.array([True, False])},
                           recipe="w8a8-dynamic", out_dir=tmp_path)
    ops = _branch_ops(onnx.load(str(tmp_path / "model.qdq.onnx")))
    assert "MatMulInteger" in ops["then_branch"] and "MatMulInteger" in ops["else_branch"]
    assert art.report["outputs"]["y"]["cosine"] > 0.999
