"""Equivalence passes: positive case, declined case and fp32 numerics through the NumericsInstrument."""
import numpy as np
import pytest
from onnx import helper

from qcompile import ir
from qcompile.errors import NumericsError, PassError
from qcompile.instruments import CheckerInstrument, NumericsInstrument
from qcompile.pass_infra import PassBase, PassContext, PassManager, PassResult
from qcompile.passes.eliminate_identity import EliminateIdentityPass
from qcompile.passes.fold_batchnorm import FoldBatchNormPass
from qcompile.passes.fold_constants import FoldConstantsPass
from qcompile.passes.fuse_bias import FuseConvBiasPass
from qcompile.types import PassKind

import helpers
from helpers import bn, bn_params, init, make, rand, vi


def run(model, passes, samples=None):
    model = ir.normalize(model)
    ctx = PassContext(model=model, samples=samples or [])
    g = PassManager(passes, [CheckerInstrument(), NumericsInstrument()]).run(ir.to_graph(model), ctx)
    return g, ctx.records


def ops(g):
    return [n.op for n in g.nodes]


def test_fold_bn_conv_cnn():
    g, rec = run(helpers.cnn(), [FoldBatchNormPass()], [{"x": rand(1, 3, 8, 8)}])
    assert "BatchNormalization" not in ops(g)
    assert rec[0]["modified"] and rec[0]["stats"]["folded"] == 2
    assert rec[0]["numerics"]["checked"] and rec[0]["numerics"]["max_abs"] < 1e-4


def test_fold_bn_conv_transpose_grouped_and_gemm_and_matmul():
    nodes = [helper.make_node("ConvTranspose", ["x", "wt"], ["t"], name="ct", group=2, strides=[2, 2]),
             bn("bn_t", "t", "tb"),
             helper.make_node("Flatten", ["tb"], ["f"], name="fl"),
             helper.make_node("Gemm", ["f", "wg", "cg"], ["gm"], name="gemm", transB=0, beta=0.5),
             bn("bn_g", "gm", "gb"),
             helper.make_node("Gemm", ["gb", "wg2"], ["gm2"], name="gemm2", transB=1),
             bn("bn_g2", "gm2", "gb2"),
             helper.make_node("MatMul", ["gb2", "wm"], ["mm"], name="mm"),
             helper.make_node("Add", ["mm", "bm"], ["ma"], name="mm_bias"),
             bn("bn_m", "ma", "mb"),
             helper.make_node("MatMul", ["mb", "wm2"], ["mm2"], name="mm2"),
             bn("bn_m2", "mm2", "y")]
    inits = [init("wt", rand(4, 3, 2, 2)), init("wg", rand(6 * 4 * 4, 5, scale=0.1)), init("cg", rand(5)),
             init("wg2", rand(7, 5)), init("wm", rand(7, 6)), init("bm", rand(6)), init("wm2", rand(6, 3))]
    inits += bn_params("bn_t", 6) + bn_params("bn_g", 5) + bn_params("bn_g2", 7) + bn_params("bn_m", 6) \
        + bn_params("bn_m2", 3)
    m = make(nodes, [vi("x", [1, 4, 2, 2])], [vi("y", [1, 3])], inits)
    from onnx import shape_inference
    m = shape_inference.infer_shapes(m)
    g, rec = run(m, [FoldBatchNormPass()], [{"x": rand(1, 4, 2, 2)}])
    assert "BatchNormalization" not in ops(g), rec[0]["declined"]
    assert rec[0]["stats"]["folded"] == 5


def test_fold_bn_declined_without_producer():
    nodes = [helper.make_node("Add", ["x", "x"], ["a"], name="add"), bn("bn0", "a", "y")]
    m = make(nodes, [vi("x", [1, 4, 3, 3])], [vi("y", [1, 4, 3, 3])], bn_params("bn0", 4))
    g, rec = run(m, [FoldBatchNormPass()])
    assert rec[0]["modified"] is False
    assert "not MatMul + constant bias" in rec[0]["declined"][0]["reason"]


def test_identity_and_dropout_removed_including_graph_output():
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"),
             helper.make_node("Identity", ["r"], ["i"], name="id"),
             helper.make_node("Dropout", ["i"], ["d"], name="drop"),
             helper.make_node("Identity", ["d"], ["y"], name="id_out")]
    m = make(nodes, [vi("x", [2, 3])], [vi("y", [2, 3])], [])
    g, rec = run(m, [EliminateIdentityPass()])
    assert ops(g) == ["Relu"] and g.outputs[0].name == "y"
    assert rec[0]["stats"]["removed"] == 3


def test_identity_declined_when_input_is_graph_input():
    m = make([helper.make_node("Identity", ["x"], ["y"], name="id")], [vi("x", [2])], [vi("y", [2])], [])
    g, rec = run(m, [EliminateIdentityPass()])
    assert rec[0]["modified"] is False and rec[0]["declined"]


def test_conv_bias_fusion_and_decline():
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
             helper.make_node("Add", ["c", "b"], ["a"], name="add_bias"),
             helper.make_node("Conv", ["a", "w2"], ["c2"], name="conv2"),
             helper.make_node("Add", ["c2", "bad"], ["y"], name="add_spatial")]
    inits = [init("w", rand(4, 3, 1, 1)), init("b", rand(1, 4, 1, 1)), init("w2", rand(4, 4, 1, 1)),
             init("bad", rand(1, 1, 5, 5))]
    m = make(nodes, [vi("x", [1, 3, 5, 5])], [vi("y", [1, 4, 5, 5])], inits)
    g, rec = run(m, [FuseConvBiasPass()], [{"x": rand(1, 3, 5, 5)}])
    assert ops(g) == ["Conv", "Conv", "Add"]
    assert rec[0]["stats"]["fused"] == 1
    assert "not per-channel" in rec[0]["declined"][0]["reason"]


def test_fold_constants_turns_constant_nodes_into_initializers():
    nodes = [helper.make_node("Constant", [], ["k"], name="k", value=helpers.init("kv", np.float32([2.0]))),
             helper.make_node("Mul", ["k", "k"], ["k2"], name="kk"),
             helper.make_node("Mul", ["x", "k2"], ["y"], name="mul")]
    m = make(nodes, [vi("x", [3])], [vi("y", [3])], [])
    g, rec = run(m, [FoldConstantsPass()])
    assert ops(g) == ["Mul"] and rec[0]["modified"]


class _BrokenPass(PassBase):
    """Claims equivalence but scales a weight: the numerics instrument must catch it."""

    name = "broken"
    kind = PassKind.EQUIVALENCE

    def call(self, graph, ctx):
        for t in graph.tensors().values():
            if t.name == "w1":
                t.values = t.values * 1.001
        return PassResult(graph, True)


def test_numerics_instrument_catches_inexact_pass():
    with pytest.raises(NumericsError, match="broken"):
        run(helpers.cnn(), [_BrokenPass()], [{"x": rand(1, 3, 8, 8)}])


class _QuietEditPass(PassBase):
    """Scales a weight in place and says it modified nothing."""
    name = "quiet_edit"
    kind = PassKind.EQUIVALENCE

    def call(self, graph, ctx):
        for t in graph.tensors().values():
            if getattr(t, "values", None) is not None and t.values.ndim == 4:
                t.values *= 2.0  # in place: the same array object
                break
        return PassResult(graph, False)


class _CountingChecker(CheckerInstrument):
    def __init__(self):
        self.checked = []

    def after_pass(self, p, before, after, result, ctx, record):
        was = after.checked
        super().after_pass(p, before, after, result, ctx, record)
        if not was:
            self.checked.append(p.name)


def test_unmodified_pass_hands_on_its_input_checked_once():
    """Passes that change nothing pass on the snapshot they started from: the checker runs on the first one only,
    the numerics instrument records them unchanged without running, and the final snapshot is the model."""
    model = ir.normalize(helpers.cnn())
    ctx = PassContext(model=model, samples=[{"x": rand(1, 3, 8, 8)}])
    checker = _CountingChecker()
    manager = PassManager([EliminateIdentityPass(), FuseConvBiasPass(), EliminateIdentityPass()],
                          [checker, NumericsInstrument()], verify_unmodified=True)
    manager.run(ir.to_graph(model), ctx)
    assert [r["modified"] for r in ctx.records] == [False, False, False]
    assert checker.checked == ["eliminate_identity"]
    assert [r["numerics"] for r in ctx.records] == [{"checked": True, "unchanged": True}] * 3
    assert manager.last is not None and manager.last.model.graph.node  # the model the passes left


def test_pass_that_hides_an_edit_is_caught_under_verification():
    model = ir.normalize(helpers.cnn())
    graph = ir.to_graph(model)
    with pytest.raises(PassError, match="quiet_edit reported no modification but changed the graph"):
        PassManager([EliminateIdentityPass(), _QuietEditPass()], [CheckerInstrument(), NumericsInstrument()],
                    verify_unmodified=True).run(graph, PassContext(model=model, samples=[{"x": rand(1, 3, 8, 8)}]))
