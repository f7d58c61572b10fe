"""Per-token dynamic activations (passes/_dynamic.py): what insert_qdq's per_token: auto selects, what the emitted
ops compute in ONNX Runtime, and insert_dynamic's per_token mode at both ReduceMax opsets."""
import numpy as np
import onnx
import pytest
from onnx import helper

import qcompile
from qcompile import numerics
from qcompile.passes._dynamic import range_mismatch_bits
from qcompile.recipe import Recipe

import helpers

K, N, S = 32, 24, 16


def two_layers(opset: int = 13) -> onnx.ModelProto:
    """x -> MatMul(W1) -> Add(b1) -> Relu -> h -> MatMul(W2) -> y: h's per-tensor range is what a massive token
    sets. (The bias Add is what ONNX Runtime fuses into MatMulIntegerToFloat with the rescale.)"""
    rng = np.random.default_rng(0)
    w1 = rng.normal(0, 0.3, (K, K)).astype(np.float32)
    b1 = rng.normal(0, 0.3, (K,)).astype(np.float32)
    w2 = rng.normal(0, 0.3, (K, N)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["a0"], name="fc1"),
             helper.make_node("Add", ["a0", "b1"], ["a"], name="fc1_bias"),
             helper.make_node("Relu", ["a"], ["h"], name="relu"),
             helper.make_node("MatMul", ["h", "w2"], ["y"], name="fc2")]
    return helpers.make(nodes, [helpers.vi("x", [1, S, K])], [helpers.vi("y", [1, S, N])],
                        [helpers.init("w1", w1), helpers.init("b1", b1), helpers.init("w2", w2)], opset=opset)


def samples(massive: bool, n: int = 16) -> dict[str, np.ndarray]:
    """Token 0 of every sample 500x the others in two channels when ``massive`` (a decoder's first token)."""
    rng = np.random.default_rng(1)
    x = rng.normal(0, 1, (n, 1, S, K)).astype(np.float32)
    if massive:
        x[:, :, 0, :2] = 500.0
    return {"x": x}


def recipe(mode: str, **extra) -> Recipe:
    return Recipe.from_dict({"name": f"pt-{mode}", "passes": [
        {"name": "insert_qdq", "chain_ops": [], "per_token": mode, **extra}]})


def typical_sqnr(art, calib) -> float:
    """Output SQNR over every token but the first (the tokens a massive first token would starve)."""
    sess = numerics.session(str(art.out_dir / "model.qdq.onnx"), optimize=True)
    ref = numerics.session(two_layers().SerializeToString())
    x = calib["x"][:4]
    got = np.concatenate([sess.run(None, {"x": v})[0] for v in x])
    want = np.concatenate([ref.run(None, {"x": v})[0] for v in x])
    return numerics.sqnr_db(want[:, 1:], got[:, 1:])


def test_range_mismatch_measure():
    starved, clipped = range_mismatch_bits(np.full(100, 2.0), -2.0, 2.0, 8)
    assert starved == pytest.approx(0.0, abs=0.02) and clipped == 0.0
    m = np.concatenate([[1000.0], np.ones(99)])
    starved, clipped = range_mismatch_bits(m, -1000.0, 1000.0, 8)  # a min/max range: the others starve
    assert starved == pytest.approx(np.log2(1000), abs=0.02) and clipped == 0.0
    starved, clipped = range_mismatch_bits(m, -1.0, 1.0, 8)  # a clipping range: the big one is cut 1000x
    assert starved == pytest.approx(0.0, abs=0.02) and clipped == pytest.approx(np.log2(1000))
    assert range_mismatch_bits(np.zeros(5), -1.0, 1.0, 8) == (0.0, 0.0)


def test_massive_token_goes_per_token(tmp_path):
    calib = samples(massive=True)
    auto = qcompile.compile(two_layers(), calib=calib, recipe=recipe("auto"), out_dir=tmp_path / "auto",
                            measure_latency=False)
    off = qcompile.compile(two_layers(), calib=calib, recipe=recipe("off"), out_dir=tmp_path / "off",
                           measure_latency=False)
    st = next(r for r in auto.report["passes"] if r["pass"] == "insert_qdq")["stats"]
    assert st["per_token_inputs"] == 2 and st["per_token_layers"] == 2  # x and h: both carry the token
    ops = [n.op_type for n in onnx.load(auto.out_dir / "model.qdq.onnx").graph.node]
    assert ops.count("MatMulInteger") == 2 and "QuantizeLinear" not in ops
    # the static range leaves the other tokens ~3 levels; per token they keep 8 bits
    assert typical_sqnr(auto, calib) > typical_sqnr(off, calib) + 15


def test_clipped_token_goes_per_token(tmp_path):
    """A percentile range cuts the massive token instead of starving the others: chosen for the clipping."""
    art = qcompile.compile(two_layers(), calib=samples(massive=True), out_dir=tmp_path, measure_latency=False,
                           recipe=recipe("auto", observer="percentile", observer_params={"percentile": 99.0}))
    st = next(r for r in art.report["passes"] if r["pass"] == "insert_qdq")["stats"]
    assert st["per_token_inputs"] == 2
    starved, clipped = st["per_token_mismatch_bits"]["x"]
    assert starved < 1 and clipped > 6


def test_flat_tokens_stay_static(tmp_path):
    art = qcompile.compile(two_layers(), calib=samples(massive=False), recipe=recipe("auto"), out_dir=tmp_path,
                           measure_latency=False)
    st = next(r for r in art.report["passes"] if r["pass"] == "insert_qdq")["stats"]
    assert st["per_token_inputs"] == 0
    assert "MatMulInteger" not in [n.op_type for n in onnx.load(art.out_dir / "model.qdq.onnx").graph.node]


@pytest.mark.parametrize("opset", [13, 18])
def test_per_token_arithmetic(tmp_path, opset):
    """ORT's result is the per-token formula: symmetric int8 per row, int32 GEMM, then s_t·s_w."""
    rec = Recipe.from_dict({"name": "dyn-token", "passes": [
        {"name": "insert_dynamic", "activation_granularity": "per_token"}]})
    model = two_layers(opset)
    art = qcompile.compile(model, calib=samples(massive=True, n=4), recipe=rec, out_dir=tmp_path,
                           measure_latency=False)
    q = onnx.load(art.out_dir / "model.qdq.onnx")
    assert [n.op_type for n in q.graph.node].count("MatMulInteger") == 2
    assert not any(n.op_type == "DynamicQuantizeLinear" for n in q.graph.node)
    w = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    x = samples(massive=True, n=1)["x"][0]

    def layer(v, wf):
        s = np.maximum(np.abs(v).max(-1, keepdims=True) / np.float32(127), np.float32(1e-30))
        xi = np.clip(np.round(v / s), -127, 127).astype(np.int64)
        sw = np.abs(wf).max(0) / np.float32(127)
        wi = np.clip(np.round(wf / sw), -127, 127).astype(np.int64)
        return (xi @ wi).astype(np.float32) * (s * sw).astype(np.float32)

    want = layer(np.maximum(layer(x, w["w1"]) + w["b1"], 0), w["w2"])
    for optimize in (False, True):  # ORT's fusions must not change it (MatMulIntegerToFloat takes no per-row scale)
        got = numerics.session(q.SerializeToString(), optimize=optimize).run(None, {"x": x})[0]
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


def test_per_token_config_errors():
    from qcompile.errors import ConfigError
    with pytest.raises(ConfigError, match="per_token must be one of"):
        recipe("sometimes")
    with pytest.raises(ConfigError, match="per_token_bits"):
        recipe("auto", per_token_bits=17)
    with pytest.raises(ConfigError, match="activation_granularity"):
        Recipe.from_dict({"name": "x", "passes": [{"name": "insert_dynamic", "activation_granularity": "per_block"}]})




def test_smoothing_search_models_per_token():
    """With a massive row, the per-tensor model of the search sees the others starved; the per-token one does not,
    and for per-token activations smoothing must still pay where channels (not tokens) carry the outliers."""
    from qcompile.passes.smooth import quantized_error, smoothing_scales
    rng = np.random.default_rng(2)
    x = rng.normal(0, 1, (256, 64)).astype(np.float32)
    w = rng.normal(0, 0.1, (64, 32)).astype(np.float32)
    xm = x.copy()
    xm[0, :2] = 1000.0  # one massive token (in two channels)
    assert quantized_error(xm, w, None, 8, 8, per_token=True) * 10 < quantized_error(xm, w, None, 8, 8)
    xc = x.copy()
    xc[:, :2] *= 100.0  # two outlier channels in every token
    s = smoothing_scales(np.abs(xc).max(0), np.abs(w).max(1), 0.5)
    assert quantized_error(xc, w, s, 8, 8, per_token=True) * 4 < quantized_error(xc, w, None, 8, 8, per_token=True)
