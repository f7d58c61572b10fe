import numpy as np
import onnx
from onnx import TensorProto, helper

import qcompile

import helpers


def model(vocab: int, dim: int = 64) -> onnx.ModelProto:
    nodes = [helper.make_node("Gather", ["emb", "ids"], ["e"], name="lookup", axis=0),
             helper.make_node("ReduceMean", ["e"], ["y"], name="mean", axes=[1], keepdims=0)]
    table = helpers.rand(vocab, dim) * np.linspace(0.01, 3.0, vocab, dtype=np.float32)[:, None]  # row norms vary
    return helpers.make(nodes, [helpers.vi("ids", ["N", 7], TensorProto.INT64)], [helpers.vi("y", ["N", dim])],
                        [helpers.init("emb", table)])


def test_large_table_quantized_per_row(tmp_path):
    ids = np.random.default_rng(0).integers(0, 2048, (6, 7)).astype(np.int64)
    art = qcompile.compile(model(2048), calib={"ids": ids}, recipe="w8a8-dynamic", out_dir=tmp_path)
    rec = next(r for r in art.report["passes"] if r["pass"] == "quantize_embedding")
    assert rec["stats"]["quantized_lookups"] == 1
    assert art.report["sizes"]["model"] < art.report["sizes"]["fp32"] / 3.5
    m = onnx.load(str(tmp_path / "model.qdq.onnx"))
    assert {i.data_type for i in m.graph.initializer if i.name.startswith("emb")} == {TensorProto.INT8,
                                                                                       TensorProto.FLOAT}
    assert art.report["outputs"]["y"]["sqnr_db"] > 40  # per-row scales: small-norm rows stay accurate


def test_small_table_declined(tmp_path):
    ids = np.zeros((2, 7), np.int64)
    art = qcompile.compile(model(16), calib={"ids": ids}, recipe="w8a8", out_dir=tmp_path)
    rec = next(r for r in art.report["passes"] if r["pass"] == "quantize_embedding")
    assert rec["modified"] is False and "below min_elements" in rec["declined"][0]["reason"]
