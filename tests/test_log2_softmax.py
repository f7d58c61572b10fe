import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from qcompile import ir, numerics
from qcompile.errors import ConfigError
from qcompile.instruments import CheckerInstrument, NumericsInstrument
from qcompile.pass_infra import PassContext, PassManager
from qcompile.passes.log2_softmax import (Log2SoftmaxConfig, Log2SoftmaxPass, dequantize, log2_quantize,
                                          shift_tables, thresholds)
from qcompile.recipe import Recipe

import helpers

N = 16  # columns of the probe: A [rows, N] @ identity [N, N] returns the dequantized A itself


def probe(bits: int, mode: str, scale: float = 1.0) -> onnx.ModelProto:
    """Softmax -> MatMul(identity) rewritten by the pass, then the Softmax turned into Identity so the quantizer
    reads arbitrary values; outputs: the MatMul result (dequantized A) and the uint8 levels."""
    nodes = [helper.make_node("Softmax", ["a"], ["p"], name="softmax", axis=-1),
             helper.make_node("MatMul", ["p", "eye"], ["y"], name="context")]
    m = helpers.make(nodes, [helpers.vi("a", ["R", N])], [helpers.vi("y", ["R", N])],
                     [helpers.init("eye", np.eye(N, dtype=np.float32))])
    m = onnx.shape_inference.infer_shapes(m)
    cfg = Log2SoftmaxConfig(bits=bits, mode=mode, scale="one" if scale == 1.0 else "mse")
    ctx = PassContext(model=m, samples=[{"a": np.zeros((1, N), np.float32)}])
    res = _FixedScale(cfg, scale)(ir.to_graph(m), ctx)
    assert res.modified and res.stats["per_softmax"]["softmax"]["scale"] == scale
    g = res.graph
    sm = next(n for n in g.nodes if n.op == "Softmax")
    sm.op, sm.attrs = "Identity", {}
    g.outputs.append(g.tensors()["p_log2_levels"])
    return ir.to_model(g, m)


class _FixedScale(Log2SoftmaxPass):
    """The pass with a given scale s instead of a calibrated one."""

    def __init__(self, cfg, scale):
        super().__init__(cfg)
        self.scale = scale

    def _calibrate(self, graph, ctx, nodes):
        return {n.name: self.scale for n, _ in nodes}


def run_probe(model, a: np.ndarray):
    flat = np.asarray(a, np.float32).reshape(-1)
    pad = (-flat.size) % N
    x = np.concatenate([flat, np.zeros(pad, np.float32)]).reshape(-1, N)
    out = numerics.run(numerics.session(model), {"a": x})
    return out["p_log2_levels"].reshape(-1)[: flat.size], out["y"].reshape(-1)[: flat.size]


def probe_values(bits: int, mode: str, scale: float = 1.0) -> np.ndarray:
    """Random softmax rows (with masked exact zeros), ones, tiny and subnormal values, and every float32 within
    64 ulps of every decision boundary."""
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((64, 197)).astype(np.float32) * 4
    logits[:, 150:] = np.finfo(np.float32).min  # masked positions -> exact 0
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    soft = (e / e.sum(axis=1, keepdims=True)).astype(np.float32)
    special = np.array([0.0, 1.0, np.float32(scale), 0.5, 2.0 ** -0.5, 1e-3, 1e-7, 1e-20, 1e-38, 1e-40, 1e-45,
                        np.finfo(np.float32).tiny, np.nextafter(np.float32(1), np.float32(0))], np.float32)
    near = []
    for c in thresholds(bits, mode, scale):
        if c > 0:
            bits32 = np.float32(c).view(np.int32) + np.arange(-64, 65, dtype=np.int32)
            near.append(bits32[bits32 > 0].view(np.float32))
    powers = np.ldexp(np.float32(1), -np.arange(0, 150)).astype(np.float32)
    return np.concatenate([soft.reshape(-1), special, powers, *near])


def ulps(a: np.ndarray, b: np.ndarray) -> int:
    ia = a.astype(np.float32).view(np.int32).astype(np.int64)
    ib = b.astype(np.float32).view(np.int32).astype(np.int64)
    return int(np.abs(ia - ib).max())


@pytest.mark.parametrize("mode", ["log2", "log_sqrt2"])
@pytest.mark.parametrize("bits", [3, 4, 6, 8])
def test_onnx_subgraph_matches_reference_exactly(bits, mode):
    model = probe(bits, mode)
    a = probe_values(bits, mode)
    q, y = run_probe(model, a)
    q_ref, d_ref = log2_quantize(a, bits, mode)
    assert q.dtype == np.uint8
    np.testing.assert_array_equal(q, q_ref)  # levels bit-exact, boundaries included
    assert ulps(y, d_ref) <= 1
    levels = 2 ** bits - 1
    zero = a == 0
    assert np.all(q[zero] == levels) and np.all(y[zero] == 0) and np.all(np.isfinite(y))  # masked -> top -> 0
    assert np.all(q[a == 1] == 0) and np.all(y[a == 1] == 1)


def test_scale_other_than_one_matches_reference():
    s = float(np.float32(0.37))
    for mode in ("log2", "log_sqrt2"):
        model = probe(4, mode, scale=s)
        a = probe_values(4, mode, s)
        q, y = run_probe(model, a)
        q_ref, d_ref = log2_quantize(a, 4, mode, s)
        np.testing.assert_array_equal(q, q_ref)
        assert ulps(y, d_ref) <= 1
        assert np.all(q[a >= s] == 0)


def test_reference_is_the_log_formula_away_from_boundaries():
    rng = np.random.default_rng(1)
    a = rng.uniform(0, 1, 100000).astype(np.float32) ** 6
    for mode, m in (("log2", 1), ("log_sqrt2", 2)):
        u = -m * np.log2(a.astype(np.float64))
        clear = np.abs(u - np.floor(u) - 0.5) > 1e-6
        q, d = log2_quantize(a, 6, mode)
        expect = np.clip(np.round(u), 0, 63)
        np.testing.assert_array_equal(q[clear], expect[clear])
        live = expect < 63
        np.testing.assert_allclose(d[clear & live], 2.0 ** (-expect[clear & live] / m), rtol=1e-7)
        assert np.all(d[expect == 63] == 0)


@pytest.mark.parametrize("bits", [4, 8])
def test_log_sqrt2_to_log2_reparameterization_is_exact(bits):
    """s·2^(-q/2) == s·2^(-(q>>1))·(1 if q even else 1/√2) == s·E[q] + (s/√2)·O[q] for every level."""
    q = np.arange(2 ** bits, dtype=np.uint8)
    even, odd = shift_tables(bits, "log_sqrt2")
    for s in (1.0, float(np.float32(0.37))):
        direct = dequantize(q, bits, "log_sqrt2", s)
        split = np.float32(s) * even[q] + np.float32(s * 2 ** -0.5) * odd[q]
        assert ulps(split, direct) <= (0 if s == 1.0 else 1)
        e = (q >> 1).astype(np.int64)
        live = q < 2 ** bits - 1
        assert np.all(np.where(live & (q % 2 == 0), even[q] == np.ldexp(1.0, -e), even[q] == 0))
        assert np.all(np.where(live & (q % 2 == 1), odd[q] == np.ldexp(1.0, -e), odd[q] == 0))
    if bits == 8:
        np.testing.assert_array_equal(dequantize(q, bits, "log_sqrt2")[:254:2], dequantize(q[:127], bits, "log2"))


def run_pass(model, cfg, calib=None):
    model = onnx.shape_inference.infer_shapes(ir.normalize(model))
    samples = [] if calib is None else [{k: v[i:i + 1] for k, v in calib.items()} for i in range(len(calib["x"]))]
    ctx = PassContext(model=model, samples=samples)
    g = PassManager([Log2SoftmaxPass(cfg)], [CheckerInstrument(), NumericsInstrument()]).run(ir.to_graph(model), ctx)
    return model, ir.to_model(g, model), g, ctx.records[0]


def test_attention_graph_and_accuracy_at_8_bits():
    fp32, q, g, rec = run_pass(helpers.attention(), Log2SoftmaxConfig(bits=8))
    assert rec["modified"] and rec["stats"]["softmax"] == 1 and rec["stats"]["matmuls"] == 1
    ops = [n.op for n in g.nodes]
    assert ops.count("MatMul") == 6 and ops.count("Gather") == 3  # 5 + the odd half of the context MatMul
    levels = g.tensors()["p_log2_levels"]
    assert levels.dtype == np.uint8 and levels.inputs[0].op == "Cast"
    even, odd = g.tensors()["p_log2_shift_even"], g.tensors()["p_log2_shift_odd"]
    assert {n.name for n in even.outputs} == {"context"} and len(odd.outputs) == 1
    y = g.tensors()["o"]
    assert y.inputs[0].op == "Add"
    calib = helpers.attention_calib()  # rows of masked keys: Softmax gives exact zeros there
    ref = numerics.run(numerics.session(fp32), calib)["y"]
    out = numerics.run(numerics.session(q), calib)["y"]
    assert numerics.cosine(ref, out) > 0.99 and np.all(np.isfinite(out))
    lv = numerics.run(numerics.session(_with_output(q, "p_log2_levels")), calib)["p_log2_levels"]
    assert np.all(lv[3, :, -3:] == 255)  # sample 3 masks its last 3 keys


def _with_output(model, name):
    m = onnx.ModelProto()
    m.CopyFrom(model)
    m.graph.output.append(helper.make_tensor_value_info(name, TensorProto.UINT8, None))
    return m


def test_log2_mode_single_matmul_and_other_reader_kept_float():
    nodes = [helper.make_node("Softmax", ["s"], ["p"], name="softmax", axis=-1),
             helper.make_node("MatMul", ["p", "v"], ["o"], name="context"),
             helper.make_node("ReduceMax", ["p"], ["pm"], name="peak", axes=[-1], keepdims=0)]
    m = helpers.make(nodes, [helpers.vi("s", [2, 4, 4]), helpers.vi("v", [2, 4, 3])],
                     [helpers.vi("o", [2, 4, 3]), helpers.vi("pm", [2, 4])], [])
    _, q, g, rec = run_pass(m, Log2SoftmaxConfig(bits=4, mode="log2"))
    assert rec["modified"]
    t = g.tensors()
    mm = next(n for n in g.nodes if n.name == "context")
    assert mm.inputs[0].name == "p_log2_shift" and mm.outputs[0].name == "o"
    assert [n.name for n in t["p"].outputs if n.op == "ReduceMax"] == ["peak"]
    assert [n.op for n in g.nodes].count("MatMul") == 1


def test_declined_without_matmul_and_by_override():
    nodes = [helper.make_node("Softmax", ["s"], ["p"], name="softmax", axis=-1),
             helper.make_node("Mul", ["p", "w"], ["y"], name="weigh")]
    m = helpers.make(nodes, [helpers.vi("s", [2, 4])], [helpers.vi("y", [2, 4])],
                     [helpers.init("w", helpers.rand(4))])
    _, _, _, rec = run_pass(m, Log2SoftmaxConfig())
    assert rec["modified"] is False and "feeds no MatMul" in rec["declined"][0]["reason"]
    _, _, _, rec = run_pass(helpers.attention(), Log2SoftmaxConfig(overrides={"softmax": {"log2": False}}))
    assert rec["modified"] is False and rec["declined"][0]["reason"] == "excluded by override"
    _, _, _, rec = run_pass(helpers.attention(), Log2SoftmaxConfig(scale="mse"))
    assert rec["modified"] is False and "no calibration samples" in rec["declined"][0]["reason"]


def test_mse_scale_and_overrides():
    cfg = Log2SoftmaxConfig(bits=4, scale="mse", overrides={"re:soft.*": {"bits": 6, "mode": "log2"}})
    _, q, g, rec = run_pass(helpers.attention(), cfg, helpers.attention_calib())
    st = rec["stats"]["per_softmax"]["softmax"]
    s = st["scale"]
    assert 0 < s <= 1 and rec["modified"] and (st["bits"], st["mode"]) == (6, "log2")
    thr = next(t for n, t in g.tensors().items() if n == "p_log2_thresholds")
    np.testing.assert_array_equal(thr.values, thresholds(6, "log2", s))


def test_config_validation_and_recipe():
    with pytest.raises(ConfigError):
        Log2SoftmaxConfig.from_dict({"bits": 9})
    with pytest.raises(ConfigError):
        Log2SoftmaxConfig.from_dict({"mode": "log3"})
    with pytest.raises(ConfigError):
        Log2SoftmaxConfig.from_dict({"overrides": {"softmax": {"bits": 1}}})
    with pytest.raises(ConfigError):
        Log2SoftmaxConfig.from_dict({"overrides": {"softmax": {"shift": 1}}})
    r = Recipe.from_dict({"name": "x", "passes": ["eliminate_identity", {"name": "log2_softmax", "bits": 6}]})
    assert r.build_passes()[1].config.bits == 6


def test_pass_inside_if_branch():
    inner = helper.make_graph([helper.make_node("Softmax", ["s"], ["p"], name="softmax_in", axis=-1),
                               helper.make_node("MatMul", ["p", "v"], ["o"], name="context_in")],
                              "then", [], [helpers.vi("o", [2, 4, 3])])
    other = helper.make_graph([helper.make_node("Identity", ["v"], ["o2"], name="pass_v")],
                              "else", [], [helpers.vi("o2", [2, 4, 3])])
    nodes = [helper.make_node("If", ["flag"], ["y"], name="branch", then_branch=inner, else_branch=other)]
    m = helpers.make(nodes, [helpers.vi("s", [2, 4, 4]), helpers.vi("v", [2, 4, 3]),
                             helpers.vi("flag", [], TensorProto.BOOL)], [helpers.vi("y", [2, 4, 3])], [])
    fp32, q, g, rec = run_pass(m, Log2SoftmaxConfig(bits=8))
    assert rec["stats"]["softmax"] == 1
    feeds = {"s": helpers.rand(2, 4, 4), "v": helpers.rand(2, 4, 3), "flag": np.array(True)}
    ref = numerics.run(numerics.session(fp32), feeds)["y"]
    out = numerics.run(numerics.session(q), feeds)["y"]
    assert numerics.cosine(ref, out) > 0.99


def test_insert_qdq_keeps_shift_operands_and_quantizes_v(tmp_path):
    import qcompile

    recipe = Recipe.from_dict({"name": "l2", "passes": [
        "fold_constants", {"name": "log2_softmax", "bits": 4, "mode": "log_sqrt2"},
        {"name": "insert_qdq", "activation_matmul": True, "activation_bits": 4, "weight_bits": 4}]})
    art = qcompile.compile(helpers.attention(), calib=helpers.attention_calib(), recipe=recipe, out_dir=tmp_path)
    m = onnx.load(str(tmp_path / "model.qdq.onnx"))
    by_out = {o: n for n in m.graph.node for o in n.output}
    quantized = {n.input[0] for n in m.graph.node if n.op_type == "QuantizeLinear"}
    shifts = [t for t in (o for n in m.graph.node for o in n.output) if "_log2_shift" in t]
    assert shifts and not set(shifts) & quantized  # the exact power-of-two operands are not requantized
    pv = [n for n in m.graph.node if n.op_type == "MatMul" and any(i in shifts for i in n.input)]
    assert len(pv) == 2  # even and odd parity MatMuls
    for n in pv:
        other = next(i for i in n.input if i not in shifts)
        assert by_out[other].op_type == "DequantizeLinear"  # V is quantized for both
    assert art.report["outputs"]["y"]["cosine"] > 0.95
