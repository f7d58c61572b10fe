import os

import onnx
import pytest
from onnx import helper

from qcompile import ir
from qcompile.errors import ModelError

import helpers


def test_missing_and_corrupt(tmp_path):
    with pytest.raises(ModelError, match="not found"):
        ir.load_model(tmp_path / "nope.onnx")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x00garbage\xff" * 10)
    with pytest.raises(ModelError):
        ir.load_model(bad)


def test_opset_10_refused_and_11_upgraded(tmp_path):
    m = helpers.cnn()
    m.opset_import[0].version = 10
    with pytest.raises(ModelError, match="unsupported opset 10"):
        ir.normalize(m)
    m2 = helpers.make([helper.make_node("Relu", ["x"], ["y"])], [helpers.vi("x", [1, 4])],
                      [helpers.vi("y", [1, 4])], [], opset=11)
    assert ir.default_opset(ir.normalize(m2)) == 13


def test_unused_custom_domain_dropped():
    m = helpers.cnn()
    m.opset_import.append(helper.make_opsetid("com.example.custom", 1))
    out = ir.normalize(m)
    assert [i.domain for i in out.opset_import] == [""]


def test_external_data_escaping_folder(tmp_path):
    m = helpers.cnn()
    sub = tmp_path / "m"
    sub.mkdir()
    onnx.save_model(m, str(sub / "model.onnx"), save_as_external_data=True, location="w.bin",
                    size_threshold=0)
    assert isinstance(ir.load_model(sub / "model.onnx"), onnx.ModelProto)
    loaded = onnx.load(str(sub / "model.onnx"), load_external_data=False)
    for t in loaded.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = "../../etc/passwd"
    with open(sub / "evil.onnx", "wb") as f:
        f.write(loaded.SerializeToString())
    with pytest.raises(ModelError, match="outside the model folder"):
        ir.load_model(sub / "evil.onnx")


def test_atomic_save_leaves_no_temp(tmp_path):
    m = helpers.cnn()
    ir.save_model(m, tmp_path / "a.onnx")
    assert os.listdir(tmp_path) == ["a.onnx"]
    assert onnx.load(str(tmp_path / "a.onnx")).graph.node[0].op_type == "Conv"


def test_unnamed_and_repeated_node_names_made_unique():
    """Passes address nodes by name: unnamed nodes (hand-built graphs, some converters) and a repeated name get a
    name of their own, in an If's branches too; named nodes keep theirs."""
    x, y = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2]), helper.make_tensor_value_info(
        "y", onnx.TensorProto.FLOAT, [2])
    branch = helper.make_graph([helper.make_node("Relu", ["x"], ["b"])], "then",
                               [], [helper.make_tensor_value_info("b", onnx.TensorProto.FLOAT, [2])])
    other = helper.make_graph([helper.make_node("Neg", ["x"], ["b2"], name="Relu_0")], "else",
                              [], [helper.make_tensor_value_info("b2", onnx.TensorProto.FLOAT, [2])])
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Relu", ["r"], ["r2"], name="act"),
             helper.make_node("Relu", ["r2"], ["r3"], name="act"),
             helper.make_node("ReduceSum", ["r3"], ["s"], keepdims=0),
             helper.make_node("Greater", ["s", "zero"], ["c"]),
             helper.make_node("If", ["c"], ["y"], then_branch=branch, else_branch=other)]
    g = helper.make_graph(nodes, "g", [x], [y], [helper.make_tensor("zero", onnx.TensorProto.FLOAT, [], [0.0])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    assert ir.unique_node_names(m) == 6  # 4 unnamed at top, the second "act", the then-branch's Relu
    names = [n.name for n in m.graph.node] + [n.name for a in m.graph.node[-1].attribute for n in a.g.node]
    assert len(set(names)) == len(names) and all(names) and {"act", "Relu_0"} <= set(names)  # named ones kept
    assert ir.unique_node_names(m) == 0
