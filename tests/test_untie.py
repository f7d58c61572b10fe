"""Tied LM heads: untie_weights (passes/untie.py) makes a head's Transpose(table) its own constant, exactly, so the
weight quantizers see it; quantize_embedding (tied: true) lets the head read the same int8 table as the lookups."""
import helpers
import numpy as np
import onnx
from onnx import TensorProto, helper

import qcompile
from qcompile import ir, numerics
from qcompile.instruments import NumericsInstrument
from qcompile.pass_infra import PassContext, PassManager
from qcompile.passes.untie import UntieWeightsPass
from qcompile.recipe import Recipe

V, D = 256, 64


def tied_lm() -> onnx.ModelProto:
    """ids -> Gather(E) -> MatMul(W) -> Relu -> MatMul(Transpose(E)) logits: the head tied to the table."""
    rng = np.random.default_rng(0)
    inits = [helpers.init("E", rng.normal(0, 1, (V, D)).astype(np.float32)),
             helpers.init("W", rng.normal(0, 0.2, (D, D)).astype(np.float32))]
    nodes = [helper.make_node("Gather", ["E", "ids"], ["h"], name="embed"),
             helper.make_node("MatMul", ["h", "W"], ["a"], name="fc"),
             helper.make_node("Relu", ["a"], ["r"], name="relu"),
             helper.make_node("Transpose", ["E"], ["Et"], name="tie", perm=[1, 0]),
             helper.make_node("MatMul", ["r", "Et"], ["logits"], name="head")]
    return ir.normalize(helpers.make(nodes, [helpers.vi("ids", ["B", 8], TensorProto.INT64)],
                                     [helpers.vi("logits", ["B", 8, V])], inits, opset=21))


def ids(n: int, seed: int) -> dict[str, np.ndarray]:
    return {"ids": np.random.default_rng(seed).integers(0, V, (n, 8)).astype(np.int64)}


def test_untie_is_exact_and_gives_the_head_a_constant_weight():
    model = tied_lm()
    ctx = PassContext(model=model, samples=[ids(2, 1)])
    graph = PassManager([UntieWeightsPass()], [NumericsInstrument()]).run(ir.to_graph(model), ctx)
    rec = ctx.records[0]
    assert rec["modified"] and rec["stats"]["untied"] == ["E"] and rec["stats"]["bytes_added"] == V * D * 4
    nodes = {n.name: n for n in graph.nodes}
    assert "tie" not in nodes and nodes["embed"].inputs[0].name == "E"  # the Gather keeps the table
    e = np.asarray(graph.tensors()["E"].values)
    np.testing.assert_array_equal(np.asarray(nodes["head"].inputs[1].values), e.T)
    out = ir.to_model(graph, model)
    feed = ids(4, 2)
    np.testing.assert_array_equal(numerics.run(numerics.session(model), feed)["logits"],
                                  numerics.run(numerics.session(out), feed)["logits"])


def test_nothing_to_untie_is_not_modified():
    model = tied_lm()
    ctx = PassContext(model=model)
    graph = ir.to_graph(model)
    graph.nodes = [n for n in graph.nodes if n.name != "tie"]
    head = next(n for n in graph.nodes if n.name == "head")
    head.inputs[1] = graph.tensors()["W"]  # an untied constant head
    rec = UntieWeightsPass()(graph, ctx)
    assert not rec.modified and rec.stats["untied"] == []


def float_bytes(path) -> int:
    m = onnx.load(str(path))
    return sum(onnx.numpy_helper.to_array(i).nbytes for i in m.graph.initializer if i.data_type == TensorProto.FLOAT)


def test_int4_recipe_quantizes_the_tied_head_and_the_table(tmp_path):
    model = tied_lm()
    path = tmp_path / "lm.onnx"
    onnx.save(model, path)
    np.savez(tmp_path / "calib.npz", **ids(16, 3))
    q = {"name": "insert_qdq", "weight_only": True, "weight_bits": 4, "weight_granularity": "per_block",
         "weight_block": 32, "weight_format": "matmulnbits"}
    emb = {"name": "quantize_embedding", "min_elements": 1024, "tied": False}  # untie alone (tied: the next test)
    sizes = {}
    for untie in (False, True):
        # no fold_constants: it would fold this small table's Transpose (smollm2's is above its size threshold)
        passes = (["untie_weights"] if untie else []) + [emb, q]
        out = tmp_path / f"out{int(untie)}"
        qcompile.compile(str(path), calib=str(tmp_path / "calib.npz"), out_dir=str(out), measure_latency=False,
                         recipe=Recipe.from_dict({"name": "t", "passes": passes}))
        m = onnx.load(str(out / "model.qdq.onnx"))
        ops = [n.op_type for n in m.graph.node]
        sizes[untie] = float_bytes(out / "model.qdq.onnx")
        feed = ids(4, 4)
        ref = numerics.run(numerics.session(model), feed)["logits"]
        got = numerics.run(numerics.session(m), feed)["logits"]
        sqnr = 10 * np.log10(np.sum(ref ** 2) / np.sum((ref - got) ** 2))
        assert sqnr > 15, sqnr  # int4 blocks of 32 on Gaussian weights: ~20 dB
        if untie:
            assert ops.count("MatMulNBits") == 2 and "Transpose" not in ops
        else:  # the head reads the float table through the Transpose: the table stays in the file
            assert ops.count("MatMulNBits") == 1 and "Transpose" in ops
    # float bytes left: the table itself without untie; only scales with it (row scales, block scales)
    assert sizes[False] >= V * D * 4 and sizes[True] < 0.1 * V * D * 4


def test_tied_table_is_quantized_once_for_the_lookup_and_the_head(tmp_path):
    """quantize_embedding tied: the head reads DequantizeLinear of the same int8 table the lookup reads."""
    model = tied_lm()
    path = tmp_path / "lm.onnx"
    onnx.save(model, path)
    feed = ids(4, 5)
    ref = numerics.run(numerics.session(model), feed)["logits"]
    for tied in (True, False):
        out = tmp_path / f"out{int(tied)}"
        art = qcompile.compile(str(path), calib={"ids": ids(8, 6)["ids"]}, out_dir=str(out), measure_latency=False,
                               recipe=Recipe.from_dict({"name": "t", "passes": [
                                   {"name": "quantize_embedding", "min_elements": 1024, "tied": tied}]}))
        rec = next(r for r in art.report["passes"] if r["pass"] == "quantize_embedding")
        m = onnx.load(str(out / "model.qdq.onnx"))
        kinds = sorted(i.data_type for i in m.graph.initializer if i.dims == [V, D])
        got = numerics.run(numerics.session(m), feed)["logits"]
        sqnr = 10 * np.log10(np.sum(ref ** 2) / np.sum((ref - got) ** 2))
        assert sqnr > 35, sqnr  # int8 with a scale per vocabulary row, in the lookup and in the head
        if tied:
            assert rec["stats"]["tied_readers"] == 1 and kinds == [TensorProto.INT8]
            deq = next(n for n in m.graph.node if n.op_type == "Mul" and n.name.startswith("E_dequantize"))
            assert next(n for n in m.graph.node if n.op_type == "Transpose").input[0] == deq.output[0]
        else:  # the head keeps the float table: both are in the file
            assert rec["stats"]["tied_readers"] == 0 and kinds == [TensorProto.FLOAT, TensorProto.INT8]


def test_tied_head_declined_with_the_reason_in_int4_recipes(tmp_path):
    """w4a16 leaves the tied head on the int8 table and says so (not 'left float')."""
    path = tmp_path / "lm.onnx"
    onnx.save(tied_lm(), path)
    q = {"name": "insert_qdq", "weight_only": True, "weight_bits": 4, "weight_granularity": "per_block",
         "weight_block": 32, "weight_format": "matmulnbits"}
    art = qcompile.compile(str(path), calib={"ids": ids(8, 7)["ids"]}, out_dir=str(tmp_path / "o"),
                           measure_latency=False, recipe=Recipe.from_dict({"name": "t", "passes": [
                               {"name": "quantize_embedding", "min_elements": 1024}, q]}))
    rec = next(r for r in art.report["passes"] if r["pass"] == "insert_qdq")
    head = [d for d in rec["declined"] if d["node"] == "head"]
    assert len(head) == 1 and "int8 embedding table" in head[0]["reason"], rec["declined"]
