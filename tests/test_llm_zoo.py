"""Issue 16's recipes on the zoo's transformers. SmoothQuant with per-layer alpha: fp32-exact under the numerics
instrument (which still refuses a real 1e-4 weight error on the decoder); the decoder's perplexity within 2 % of fp32,
all-MiniLM-L6-v2's cosine >= 0.995 where plain w8a8 is below. Weight-only int4: AWQ's scaling exact, AWQ better than
round-to-nearest blocks and within 5 % of fp32 perplexity, the file under 0.3x fp32."""
import numpy as np
import onnx
import pytest

import qcompile
from qcompile import dataset, ir, numerics
from qcompile.errors import NumericsError
from qcompile.instruments import NumericsInstrument
from qcompile.pass_infra import PassBase, PassContext, PassManager, PassResult
from qcompile.recipe import Recipe, load_recipe
from qcompile.types import PassKind

zoo = pytest.importorskip("qcompile_zoo")


def _outputs(path, samples):
    sess = numerics.session(str(path), optimize=True)
    outs = [numerics.run(sess, s) for s in samples]
    return {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}


def _test_set(e):
    model = onnx.load(str(e.model))
    with np.load(e.test) as t:
        arrays = {k: t[k] for k in t.files}
    return dataset.split_samples(model, arrays, "test"), arrays


class _Nudge(PassBase):
    """A pretend equivalence pass with a real bug: one weight tensor scaled by 1 + 1e-4."""

    name = "nudge"
    kind = PassKind.EQUIVALENCE

    def __init__(self, node: str) -> None:
        self.node = node

    def call(self, graph, ctx):
        n = next(x for x in graph.nodes if x.name == self.node)
        n.inputs[1].values = (n.inputs[1].values * np.float32(1 + 1e-4)).astype(np.float32)
        return PassResult(graph, True)


def _smooth_with_instrument(name: str, samples: int = 4):
    """The recipe w8a8-smooth's passes up to smooth_quant, numerics instrument on: (model, samples, graph, records)."""
    e = zoo.build(name)
    model = onnx.shape_inference.infer_shapes(ir.normalize(onnx.load(str(e.model))))
    feeds = dataset.load_samples(model, e.calib, max_samples=samples)
    passes = load_recipe("w8a8-smooth").build_passes()
    upto = next(i for i, p in enumerate(passes) if p.name == "smooth_quant") + 1
    ctx = PassContext(model=model, samples=feeds)
    graph = PassManager(passes[:upto], [NumericsInstrument()]).run(ir.to_graph(model), ctx)
    return model, feeds, passes[:upto], graph, ctx.records


@pytest.mark.parametrize("name", ["vit-digits", "minilm", "llama-bytes-dyn"])
def test_smoothing_fp32_exact_on_zoo_transformers(name):
    _, _, _, _, records = _smooth_with_instrument(name, samples=2)
    smooth = records[-1]
    assert smooth["pass"] == "smooth_quant" and smooth["modified"] and smooth["numerics"]["checked"]


def test_decoder_instrument_accepts_smoothing_and_rejects_a_1e4_weight_error():
    model, samples, passes, graph, records = _smooth_with_instrument("llama-bytes")
    smooth = records[-1]
    assert smooth["pass"] == "smooth_quant" and smooth["modified"] and smooth["numerics"]["checked"]
    assert smooth["stats"]["folded"].get("product", 0) >= 1  # the gated MLP's down projection, through up_proj
    assert smooth["stats"]["folded"].get("attention_v", 0) >= 1  # o_proj, through attention into v_proj
    down = next(n.name for n in graph.nodes if n.op == "MatMul" and "layers.1/mlp/down_proj" in n.name)
    ctx = PassContext(model=model, samples=samples)
    with pytest.raises(NumericsError, match="noise floor|fp32 rounding"):
        PassManager(passes[:-1] + [_Nudge(down)], [NumericsInstrument()]).run(ir.to_graph(model), ctx)


def _smoothed(name: str, out_dir):
    """(entry, test arrays, fp32 outputs, w8a8-smooth outputs) on the zoo model's test set."""
    e = zoo.build(name)
    samples, arrays = _test_set(e)
    art = qcompile.compile(str(e.model), calib=str(e.calib), recipe="w8a8-smooth", out_dir=out_dir,
                           measure_latency=False)
    return e, arrays, _outputs(e.model, samples), _outputs(art.out_dir / "model.qdq.onnx", samples)


def test_decoder_w8a8_smooth_perplexity(tmp_path):
    _, arrays, ref, q = _smoothed("llama-bytes", tmp_path)
    m = zoo.lm_metrics(q, ref, arrays)
    assert m["ratio"] <= 1.02 and m["agreement"] >= 0.95, m


def test_minilm_w8a8_smooth_cosine(tmp_path):
    e, _, ref, q = _smoothed("minilm", tmp_path)
    assert zoo.evaluate("minilm", q, ref, e) >= 0.995


def test_decoder_w4a16_awq_beats_rtn_blocks(tmp_path):
    e = zoo.build("llama-bytes")
    samples, arrays = _test_set(e)
    ref = _outputs(e.model, samples)
    res = {}
    for recipe in ("w4a16", "w4a16-awq"):
        art = qcompile.compile(str(e.model), calib=str(e.calib), recipe=recipe, out_dir=tmp_path / recipe,
                               measure_latency=False)
        res[recipe] = zoo.lm_metrics(_outputs(art.out_dir / "model.qdq.onnx", samples), ref, arrays)
        assert (art.out_dir / "model.qdq.onnx").stat().st_size < 0.3 * e.model.stat().st_size
    awq = next(r for r in art.report["passes"] if r["pass"] == "awq")
    assert awq["modified"] and awq["numerics"]["checked"]
    assert res["w4a16-awq"]["ratio"] <= 1.05 and res["w4a16-awq"]["ratio"] < res["w4a16"]["ratio"], res


def test_decoder_w4a8_smooth_perplexity(tmp_path):
    """W4A8: int4 blocks in MatMulNBits at accuracy level 4 (int8 activations inside ORT's kernel)."""
    e = zoo.build("llama-bytes")
    samples, arrays = _test_set(e)
    art = qcompile.compile(str(e.model), calib=str(e.calib), recipe="w4a8-smooth", out_dir=tmp_path,
                           measure_latency=False)
    nbits = [n for n in onnx.load(str(art.out_dir / "model.qdq.onnx")).graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) == 29 and all(  # 4 blocks x 7 linears and the head
        onnx.helper.get_attribute_value(next(a for a in n.attribute if a.name == "accuracy_level")) == 4
        for n in nbits)
    m = zoo.lm_metrics(_outputs(art.out_dir / "model.qdq.onnx", samples), _outputs(e.model, samples), arrays)
    assert m["ratio"] <= 1.10, m


RTN_W4A4 = {"name": "rtn-w4a4", "passes": [
    "fold_constants", {"name": "insert_qdq", "weight_bits": 4, "activation_bits": 4, "per_token": "all",
                       "chain_ops": ["Add", "Concat", "GlobalAveragePool"], "observer": "percentile",
                       "observer_params": {"percentile": 99.99}}]}


def test_decoder_rotation_closes_most_of_w4a4_gap(tmp_path):
    """Issue 17 on the byte decoder: W4A4 with the residual rotation and online rotations before the residual writers
    (w4a4-rotate) closes >= 70 % of the perplexity gap of round-to-nearest W4A4 with the same per-token int4
    activations (measured 1.085x -> 1.024x fp32); the learned rotations of w4a4-spin (SpinQuant) do better than the
    randomized Hadamard ones (measured 1.016x); w4a8-rotate within 1 %. The online rotations are Kronecker products
    of two Hadamards applied as reshaped MatMuls, kept float."""
    e = zoo.build("llama-bytes")
    samples, arrays = _test_set(e)
    ref = _outputs(e.model, samples)
    res = {}
    for name, recipe in (("rtn", Recipe.from_dict(RTN_W4A4)), ("w4a4-rotate", "w4a4-rotate"),
                         ("w4a4-spin", "w4a4-spin"), ("w4a8-rotate", "w4a8-rotate")):
        art = qcompile.compile(str(e.model), calib=str(e.calib), recipe=recipe, out_dir=tmp_path / name,
                               measure_latency=False)
        res[name] = zoo.lm_metrics(_outputs(art.out_dir / "model.qdq.onnx", samples), ref, arrays)["ratio"]
        if name != "rtn":
            rot = next(p for p in art.report["passes"] if p["pass"] == "rotate_residual")
            assert rot["numerics"]["checked"] and sum(rot["stats"]["online"].values()) == 8
            q = next(p for p in art.report["passes"] if p["pass"] == "insert_qdq")
            # each online rotation is two MatMuls (A ⊗ B: 8x16 before the output projections, 12x32 before the
            # down projections), kept float
            assert sum("online_rotation" in d["node"] for d in q["declined"]) == 16
            assert rot["stats"]["rotation"] == ("learned from hadamard" if name == "w4a4-spin" else "hadamard")
    closed = (res["rtn"] - res["w4a4-rotate"]) / (res["rtn"] - 1.0)
    assert closed >= 0.7 and res["w4a4-spin"] < res["w4a4-rotate"] and res["w4a8-rotate"] <= 1.01, res


def test_minilm_w4a4_online_rotations_on_a_post_norm_model(tmp_path):
    """all-MiniLM-L6-v2 is post-norm: w4a4-rotate declines the stream by name but rotates the inputs of the 12
    residual writers at run time, which lifts the W4A4 embedding cosine well above round-to-nearest W4A4's (measured
    with these 16 calibration samples: 0.760 -> 0.848)."""
    e = zoo.build("minilm")
    samples, _ = _test_set(e)
    ref = _outputs(e.model, samples)
    got = {}
    for name, recipe in (("rtn", Recipe.from_dict(RTN_W4A4)), ("w4a4-rotate", "w4a4-rotate")):
        art = qcompile.compile(str(e.model), calib=str(e.calib), recipe=recipe, out_dir=tmp_path / name,
                               measure_latency=False, max_samples=16)
        got[name] = zoo.evaluate("minilm", _outputs(art.out_dir / "model.qdq.onnx", samples), ref, e)
        if name != "rtn":
            rot = next(p for p in art.report["passes"] if p["pass"] == "rotate_residual")
            assert rot["stats"]["rotation"] == "none (post-norm)" and rot["numerics"]["checked"]
    assert got["w4a4-rotate"] >= got["rtn"] + 0.05, got


def test_rotated_w4a4_decoder_on_tvm_x86(tmp_path):
    """The rotated W4A4 decoder (dynamic batch and sequence axes) compiled for tvm-x86 like any model: the static
    executor, integer ops exact against the reference, and the logits of ONNX Runtime on the QDQ model. The rotations
    before the per-token int4 quantizers are float, so a code may flip at a rounding border and, through causal
    attention, move every later position (measured: 1 window of 8, from position 29; ONNX Runtime's own optimized
    and unoptimized sessions differ the same way on another): most windows equal, and the next-byte agreement with
    fp32 the same as ONNX Runtime's."""
    from qcompile.targets import get_target

    e = zoo.build("llama-bytes-dyn")
    samples, _ = _test_set(e)
    art = qcompile.compile(str(e.model), calib=str(e.calib), recipe="w4a4-rotate", target="tvm-x86",
                           out_dir=tmp_path, max_samples=4, measure_latency=False)
    lsb = art.report["lsb_vs_reference"]["tvm-x86"]
    assert lsb["integer_ops_exact"], lsb
    run = get_target("tvm-x86").runner(tmp_path)
    assert run.meta["executor"] == "static"
    sess, ref = numerics.session(str(tmp_path / "model.qdq.onnx"), optimize=True), numerics.session(str(e.model))
    equal, gaps = 0, []
    for s in samples[:4]:
        got, want, fp = run(s)["logits"], numerics.run(sess, s)["logits"], numerics.run(ref, s)["logits"]
        assert got.shape == want.shape
        equal += bool(np.median(np.abs(got - want)) < 1e-4)
        gaps.append(abs(np.mean(got.argmax(-1) == fp.argmax(-1)) - np.mean(want.argmax(-1) == fp.argmax(-1))))
    assert equal >= 3 and max(gaps) <= 0.03, (equal, gaps)
