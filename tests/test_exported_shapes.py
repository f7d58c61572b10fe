"""What other exporters write and ONNX Runtime accepts: negative dims for dynamic axes, no declared shape, a network
inside an If whose branch returns an outer-scope value through an Identity. Each compiles, and the output loads in
ONNX Runtime; a pass that would make an unloadable model fails at that pass, with its name."""
import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

import qcompile
from qcompile import dataset, ir
from qcompile.errors import PassError
from qcompile.instruments import CheckerInstrument
from qcompile.match import MATCHED
from qcompile.pass_infra import PassBase, PassContext, PassManager, PassResult
from qcompile.types import PassKind
from qcompile.passes.eliminate_identity import EliminateIdentityPass

import helpers


def _neg_dim_cnn() -> onnx.ModelProto:
    """helpers.cnn() with its input declared [-1, 3, -1, ?] (dim_value -1 twice, an empty dim) as some exporters do."""
    m = helpers.cnn()
    dims = m.graph.input[0].type.tensor_type.shape.dim
    dims[0].dim_value = -1
    dims[2].dim_value = -1
    dims[3].Clear()
    m.graph.output[0].type.tensor_type.shape.dim[0].dim_value = -1
    return m


def test_negative_dims_are_dynamic(tmp_path):
    m = _neg_dim_cnn()
    ort.InferenceSession(m.SerializeToString())  # ONNX Runtime takes it: so must we
    specs = dataset.input_specs(m)
    assert specs[0].shape[0] is None and specs[0].shape[2] is None and specs[0].shape[1] == 3
    assert dataset.split_samples(m, {"x": helpers.rand(6, 3, 8, 8)})[5]["x"].shape == (1, 3, 8, 8)
    norm = ir.normalize(m)
    dims = norm.graph.input[0].type.tensor_type.shape.dim
    assert [d.HasField("dim_value") for d in dims] == [False, True, False, False] and dims[0].dim_param
    art = qcompile.compile(m, calib={"x": helpers.rand(8, 3, 8, 8)}, recipe="w8a8", out_dir=tmp_path,
                           measure_latency=False)
    sess = ort.InferenceSession(str(tmp_path / "model.qdq.onnx"))
    y = sess.run(None, {"x": helpers.rand(2, 3, 8, 8)})[0]  # the batch axis stayed dynamic
    assert y.shape == (2, 10)
    assert art.report["outputs"]["y"]["sqnr_db"] > 25


def test_input_without_declared_shape_takes_one_tensor_per_sample():
    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    ort.InferenceSession(m.SerializeToString())
    assert dataset.input_specs(m)[0].shape is None
    s = dataset.split_samples(m, {"x": helpers.rand(3, 1, 5)})
    assert len(s) == 3 and s[1]["x"].shape == (1, 5)


def _if_returning_outer_value() -> onnx.ModelProto:
    """Conv in the main graph; If: then returns the Conv's output through an Identity, else its Relu."""
    then_g = helper.make_graph([helper.make_node("Identity", ["h"], ["t_out"], name="then_id")], "then", [],
                               [helpers.vi("t_out", [1, 4, 8, 8])])
    else_g = helper.make_graph([helper.make_node("Relu", ["h"], ["e_out"], name="else_relu")], "else", [],
                               [helpers.vi("e_out", [1, 4, 8, 8])])
    return helpers.make([helper.make_node("Conv", ["x", "w"], ["h"], name="conv", pads=[1, 1, 1, 1]),
                         helper.make_node("If", ["flag"], ["y"], name="br", then_branch=then_g, else_branch=else_g)],
                        [helpers.vi("x", [1, 3, 8, 8]), helpers.vi("flag", [], TensorProto.BOOL)],
                        [helpers.vi("y", [1, 4, 8, 8])],
                        [helpers.init("w", np.random.default_rng(5).standard_normal((4, 3, 3, 3)).astype(np.float32))])


@pytest.mark.parametrize("recipe", ["fp32", "w8a8"])
def test_if_branch_returning_an_outer_scope_value_keeps_its_identity(tmp_path, recipe):
    m = _if_returning_outer_value()
    rng = np.random.default_rng(6)  # its own draws: the shared RNG's state depends on which tests ran before
    calib = {"x": rng.standard_normal((4, 3, 8, 8)).astype(np.float32), "flag": np.array([True, False, True, False])}
    art = qcompile.compile(m, calib=calib, recipe=recipe, out_dir=tmp_path, measure_latency=False)
    out = onnx.load(str(tmp_path / "model.qdq.onnx"))
    ifn = next(n for n in out.graph.node if n.op_type == "If")
    then_ops = [n.op_type for n in next(a.g for a in ifn.attribute if a.name == "then_branch").node]
    assert "Identity" in then_ops
    declined = [d for p in art.report["passes"] if p["pass"] == "eliminate_identity" for d in p["declined"]]
    assert any("enclosing scope" in d["reason"] for d in declined)
    sess = ort.InferenceSession(str(tmp_path / "model.qdq.onnx"))
    x = rng.standard_normal((1, 3, 8, 8)).astype(np.float32)
    h = ort.InferenceSession(m.SerializeToString()).run(None, {"x": x, "flag": np.array(True)})[0]
    got = sess.run(None, {"x": x, "flag": np.array(True)})[0]
    assert np.allclose(got, h, atol=0.1 * np.abs(h).max())  # the then-branch still returns the Conv output


class _ReturnOuterDirectly(EliminateIdentityPass):
    """A broken rewrite (eliminate_identity before this fix): removes every Identity, so the then-branch returns the
    outer-scope value directly under the branch output's name. The ONNX checker passes it; ONNX Runtime refuses it."""

    name = "broken_rewrite"

    def _match(self, node, graph):
        return MATCHED


def test_checker_instrument_names_the_pass_that_breaks_the_model():
    m = _if_returning_outer_value()
    with pytest.raises(PassError, match="pass broken_rewrite produced .*(outer scope|not an output of any node)"):
        PassManager([_ReturnOuterDirectly()], [CheckerInstrument()]).run(ir.to_graph(m), PassContext(model=m))


class _UnknownOp(PassBase):
    """Appends a node of a domain ONNX Runtime has no kernels for: the ONNX checker cannot judge it, ORT refuses it."""

    name = "unknown_op"
    kind = PassKind.EQUIVALENCE

    def call(self, graph, ctx):
        y = graph.outputs[0]
        t = gs.Variable("pre_" + y.name, dtype=y.dtype, shape=y.shape)
        producer = y.inputs[0]
        producer.outputs = [t]
        graph.nodes.append(gs.Node("Passthrough", "odd", inputs=[t], outputs=[y], domain="com.example.nokernels"))
        graph.import_domains = list(graph.import_domains or []) + [onnx.helper.make_opsetid("com.example.nokernels", 1)]
        return PassResult(graph, True)


def test_checker_instrument_loads_the_model_in_onnxruntime():
    m = helpers.cnn()
    broken = ir.to_model(_UnknownOp()(ir.to_graph(m), PassContext(model=m)).graph, m)
    onnx.checker.check_model(broken)  # the ONNX checker alone lets it through
    with pytest.raises(PassError, match="pass unknown_op produced a model ONNX Runtime cannot load"):
        PassManager([_UnknownOp()], [CheckerInstrument()]).run(ir.to_graph(m), PassContext(model=m))


def test_outputs_get_the_users_umask(tmp_path):
    """Files are created as a plain open() would create them (they were 0600: mkstemp's mode)."""
    qcompile.compile(helpers.cnn(), calib=helpers.cnn_calib(4), recipe="w8a8", out_dir=tmp_path / "o",
                     measure_latency=False)
    (tmp_path / "plain").write_bytes(b"")
    want = (tmp_path / "plain").stat().st_mode & 0o777
    for f in ("model.qdq.onnx", "report.json", "report.html"):
        assert (tmp_path / "o" / f).stat().st_mode & 0o777 == want, f


def test_an_already_quantized_model_is_declined_with_the_reason(tmp_path):
    """ONNX Runtime's dynamic int8 format (ConvInteger / MatMulInteger after DynamicQuantizeLinear), as some wheels
    ship their models: w8a8 leaves it as it is and says why."""
    from onnxruntime.quantization import quantize_dynamic
    onnx.save(helpers.cnn(), str(tmp_path / "f.onnx"))
    quantize_dynamic(str(tmp_path / "f.onnx"), str(tmp_path / "dyn.onnx"))
    art = qcompile.compile(str(tmp_path / "dyn.onnx"), calib=helpers.cnn_calib(4), recipe="w8a8",
                           out_dir=tmp_path / "o", measure_latency=False)
    q = next(p for p in art.report["passes"] if p["pass"] == "insert_qdq")
    assert q["modified"] is False
    assert any("already quantized" in d["reason"] and "DynamicQuantizeLinear" in d["reason"] for d in q["declined"])


def test_shape_start_end_folds_to_the_slice_it_names():
    """opset 15 ``Shape(x, start=1, end=2)`` of a static [1, 32] input is [32] (the dynamo exporter's BERT slices
    ``position_ids`` with it); onnx-graphsurgeon's own shape folding returns the whole shape [1, 32]."""
    from qcompile.passes.fold_constants import fold

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 32])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    table = helper.make_tensor("table", TensorProto.FLOAT, [1, 64], np.arange(64, dtype=np.float32))
    zero = helper.make_tensor("zero", TensorProto.INT64, [1], [0])
    one = helper.make_tensor("one", TensorProto.INT64, [1], [1])
    nodes = [helper.make_node("Shape", ["x"], ["len"], start=1, end=2),
             helper.make_node("Slice", ["table", "zero", "len", "one", "one"], ["pos"]),
             helper.make_node("Add", ["x", "pos"], ["y"])]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y], [table, zero, one]),
                              opset_imports=[helper.make_opsetid("", 17)])
    g = gs.import_onnx(onnx.shape_inference.infer_shapes(model))
    fold(g)
    folded = gs.export_onnx(g)
    assert [n.op_type for n in folded.graph.node] == ["Add"]
    feed = {"x": np.ones((1, 32), np.float32)}
    want = ort.InferenceSession(model.SerializeToString()).run(None, feed)[0]
    got = ort.InferenceSession(folded.SerializeToString()).run(None, feed)[0]
    np.testing.assert_array_equal(got, want)


def test_shape_chains_fold_however_deep():
    """tf2onnx's Einsum decomposition (a Keras MultiHeadAttention) computes each Reshape target from the Shape of the
    Reshape before it (Shape -> Gather -> ReduceProd -> Concat), several deep per layer. Specializing to the input's
    shape folds one level per round of shape inference; four rounds left the deeper targets computed, and TVM's
    importer declined the model ("Reshape requires the input new shape to be Shape"). Now it runs to a fixed point."""
    from qcompile.lowering import specialize

    depth = 7
    nodes, t = [], "x"
    inits = [helpers.init("first_two", np.array([0, 1], np.int64)), helpers.init("third", np.array([2], np.int64)),
             helpers.init("one", np.array([1], np.int64))]
    for i in range(depth):  # [a, b, c] -> [a * b, c, 1], the product computed by ReduceProd (no data propagation)
        nodes += [helper.make_node("Shape", [t], [f"s{i}"]),
                  helper.make_node("Gather", [f"s{i}", "first_two"], [f"ab{i}"]),
                  helper.make_node("ReduceProd", [f"ab{i}"], [f"p{i}"], keepdims=1),
                  helper.make_node("Gather", [f"s{i}", "third"], [f"c{i}"]),
                  helper.make_node("Concat", [f"p{i}", f"c{i}", "one"], [f"to{i}"], axis=0),
                  helper.make_node("Reshape", [t, f"to{i}"], [f"t{i}"])]
        t = f"t{i}"
    nodes.append(helper.make_node("Relu", [t], ["y"]))
    model = helpers.make(nodes, [helpers.vi("x", ["n", 4, 8])], [helpers.vi("y", [None, None, 1])], inits, opset=15)
    s = specialize(model, {"x": [2, 4, 8]})
    inits_after = {i.name for i in s.graph.initializer}
    assert not [n for n in s.graph.node if n.op_type in ("Shape", "ReduceProd", "Concat")]
    assert all(n.input[1] in inits_after for n in s.graph.node if n.op_type == "Reshape")
    x = np.random.default_rng(0).normal(size=(2, 4, 8)).astype(np.float32)
    run = ort.InferenceSession(s.SerializeToString(), providers=["CPUExecutionProvider"]).run
    assert np.array_equal(run(None, {"x": x})[0], np.maximum(x, 0).reshape(64, 1, 1))


def test_modules_exported_as_functions_are_inlined_and_quantized(tmp_path):
    """TorchScript's ``export_modules_as_functions``: each transformer block a model-local function call. Before,
    the passes saw two opaque ``Block`` nodes (only the head quantized), the integer reference could not run the
    model ("Node type 'Block' ... is unknown") and TVM's importer refused it. Now the functions are inlined at load:
    the blocks' Linear layers are quantized too and tvm-x86 equals the reference."""
    torch = pytest.importorskip("torch", reason="torch is part of the CI install (zoo extra)")
    pytest.importorskip("tvm", reason="the tvm extra is part of the CI install")

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.ln = torch.nn.Linear(16, 16), torch.nn.LayerNorm(16)

        def forward(self, x):
            return x + torch.nn.functional.gelu(self.fc(self.ln(x)))

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.b1, self.b2, self.head = Block(), Block(), torch.nn.Linear(16, 4)

        def forward(self, x):
            return self.head(self.b2(self.b1(x)))

    torch.manual_seed(0)
    path = tmp_path / "blocks.onnx"
    torch.onnx.export(Net().eval(), (torch.randn(2, 16),), str(path), dynamo=False, opset_version=17,
                      export_modules_as_functions={Block}, input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {0: "N"}})
    exported = onnx.load(str(path))
    assert [f.name for f in exported.functions] == ["Block"]
    loaded = ir.load_model(path)
    assert not loaded.functions and "Block" not in {n.op_type for n in loaded.graph.node}
    assert {i.domain for i in loaded.opset_import} <= {"", "ai.onnx"}  # the functions' domain, unused now, dropped
    calib = {"x": np.random.default_rng(0).standard_normal((8, 16)).astype(np.float32)}
    art = qcompile.compile(str(path), calib=calib, recipe="w8a8", target="tvm-x86", out_dir=tmp_path / "out",
                           measure_latency=False)
    inits = {t.name: t.data_type for t in onnx.load(str(art.out_dir / "model.qdq.onnx")).graph.initializer}
    weights = [n for n in onnx.load(str(art.out_dir / "model.qdq.onnx")).graph.node
               if n.op_type == "DequantizeLinear" and inits.get(n.input[0]) == TensorProto.INT8]
    assert len(weights) == 3  # both blocks' Linear and the head
    lsb = art.report["lsb_vs_reference"]["tvm-x86"]
    assert lsb["integer_ops_exact"] and lsb["equal"] == 1.0, lsb
