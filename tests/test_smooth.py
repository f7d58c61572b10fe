import helpers
import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from qcompile import ir
from qcompile.dataset import split_samples
from qcompile.errors import ConfigError, NumericsError
from qcompile.instruments import CheckerInstrument, NumericsInstrument
from qcompile.pass_infra import PassBase, PassContext, PassManager, PassResult
from qcompile.passes.smooth import SmoothConfig, SmoothQuantPass
from qcompile.types import PassKind


def _i64(name, v):
    return helpers.init(name, np.array(v, np.int64))


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
    mul = next(n for n in g.nodes if n.op == "Mul" and n.name.endswith("smoothed_Mul"))
    readers = {n.name for n in mul.outputs[0].outputs}
    assert readers == {"q_proj", "k_proj", "v_proj"}  # the residual Add still reads x
    assert rec["stats"]["max_channel_outlier_ratio"] > 10


@pytest.mark.parametrize("between", ["Relu", "GlobalAveragePool"])
def test_no_mul_after_an_op_that_stays_integer(between):
    """A CNN head (conv -> Relu -> [GlobalAveragePool ->] Flatten -> Gemm) with an outlier channel: 1/s folds
    nowhere, and a Mul after the Relu or pool would be a float island between integer ops: declined, saying so."""
    c = 16
    nodes = [helper.make_node("Conv", ["x", "wc"], ["y"], name="conv"),
             helper.make_node("Relu", ["y"], ["r"], name="relu")]
    if between == "GlobalAveragePool":
        nodes.append(helper.make_node("GlobalAveragePool", ["r"], ["p"], name="gap"))
        flat, shape = "p", [1, 3, 2, 2]
    else:
        flat, shape = "r", [1, 3, 1, 1]
    nodes += [helper.make_node("Flatten", [flat], ["f"], name="flat"),
              helper.make_node("Gemm", ["f", "wg"], ["out"], name="head")]
    wc = helpers.rand(c, 3, 1, 1)
    wc[3] *= 50.0  # channel 3 of the head's input: an outlier
    model = helpers.make(nodes, [helpers.vi("x", shape)], [helpers.vi("out", [1, 10])],
                         [helpers.init("wc", wc), helpers.init("wg", helpers.rand(c, 10, scale=0.2))])
    g, rec = run(model, {"x": np.abs(helpers.rand(16, *shape[1:]))}, SmoothConfig(search=True))
    assert rec["stats"]["smoothed"] == 0 and not any(n.op == "Mul" for n in g.nodes)
    why = next(d["reason"] for d in rec["declined"] if d["node"] == "head")
    assert "would cut the integer pipeline" in why and ("Relu" if between == "Relu" else between) in why


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
    assert rec["stats"]["folded"] == {"norm": 1} and rec["stats"]["mul_inserted"] == 0
    assert [n.op for n in g.nodes].count("Mul") == 1


def test_declined_without_samples():
    model = ir.normalize(helpers.attention())
    ctx = PassContext(model=model)
    res = SmoothQuantPass()(ir.to_graph(model), ctx)
    assert res.modified is False and "no calibration samples" in res.declined[0].reason


def decoder_block(d: int = 32, hidden: int = 64, seq: int = 8, shape_reader: bool = False) -> onnx.ModelProto:
    """A pre-norm Llama block without the attention mixing: RMSNorm (decomposed) -> q/k/v, o_proj on v, residual;
    RMSNorm -> SwiGLU (gate, up, silu(gate)*up, down), residual. Outputs: the block output and q, k."""
    nodes = helpers.rmsnorm("x", "g1", "n1") + [
        helper.make_node("MatMul", ["n1", "wq"], ["q"], name="q_proj"),
        helper.make_node("MatMul", ["n1", "wk"], ["k"], name="k_proj"),
        helper.make_node("MatMul", ["n1", "wv"], ["v"], name="v_proj"),
        helper.make_node("MatMul", ["v", "wo"], ["o"], name="o_proj"),
        helper.make_node("Add", ["x", "o"], ["h"], name="res1")] + helpers.rmsnorm("h", "g2", "n2") + [
        helper.make_node("MatMul", ["n2", "wg"], ["gate"], name="gate_proj"),
        helper.make_node("MatMul", ["n2", "wu"], ["up"], name="up_proj"),
        helper.make_node("Sigmoid", ["gate"], ["sig"], name="sig"),
        helper.make_node("Mul", ["gate", "sig"], ["silu"], name="silu"),
        helper.make_node("Mul", ["silu", "up"], ["prod"], name="gated"),
        helper.make_node("MatMul", ["prod", "wd"], ["down"], name="down_proj"),
        helper.make_node("Add", ["h", "down"], ["y"], name="res2")]
    g1, g2 = 1 + helpers.rand(d, scale=0.1), 1 + helpers.rand(d, scale=0.1)
    g1[5] = g2[5] = 30.0  # RMSNorm weights with an outlier channel, as trained decoders have
    inits = [helpers.init("eps", np.array(1e-6, np.float32)), helpers.init("g1", g1), helpers.init("g2", g2)]
    inits += [helpers.init(n, helpers.rand(a, b, scale=a ** -0.5)) for n, a, b in
              (("wq", d, d), ("wk", d, d), ("wv", d, d), ("wo", d, d), ("wg", d, hidden), ("wu", d, hidden),
               ("wd", hidden, d))]
    outputs = [helpers.vi("y", [1, seq, d]), helpers.vi("q", [1, seq, d]), helpers.vi("k", [1, seq, d])]
    if shape_reader:  # exporters take the hidden size from the normalized activation
        nodes.append(helper.make_node("Shape", ["n1"], ["n1_shape"], name="n1_shape"))
        outputs.append(helpers.vi("n1_shape", [3], onnx.TensorProto.INT64))
    return helpers.make(nodes, [helpers.vi("x", [1, seq, d])], outputs, inits)


def decoder_calib(n: int = 8, seq: int = 8, d: int = 32) -> dict[str, np.ndarray]:
    x = helpers.rand(n, seq, d)
    x[..., 5] *= 40.0  # a massive-activation channel, as decoders have
    return {"x": x}


@pytest.mark.parametrize("shape_reader", [False, True])
def test_decoder_block_folds_into_rmsnorm_and_the_gated_product(shape_reader):
    """q/k/v (one s, into RMSNorm 1's weight), o_proj (into v_proj's columns), gate/up (into RMSNorm 2) and down
    (into up_proj's columns, through silu(gate)*up): no Mul inserted, fp32-exact under the instrument; a Shape
    reader of the normalized activation does not stop the fold."""
    g, rec = run(decoder_block(shape_reader=shape_reader), decoder_calib(), SmoothConfig(alpha=0.5))
    st = rec["stats"]
    assert st["smoothed"] == 4 and st["mul_inserted"] == 0, st
    assert st["folded"] == {"norm": 2, "linear": 1, "product": 1}
    assert rec["numerics"]["checked"]
    ops = [n.op for n in g.nodes]
    assert ops.count("Mul") == 2 * 2 + 2  # the two RMSNorms' (x*x, gamma), silu and the gate: nothing new


def test_fold_is_exact_and_moves_the_outlier():
    """After smoothing, the q/k/v input's channel 5 no longer dominates: its range over the median channel's drops."""
    from qcompile.calibrate import channel_absmax
    model = onnx.shape_inference.infer_shapes(ir.normalize(decoder_block()))
    calib = decoder_calib()
    samples = split_samples(model, calib)
    before = channel_absmax(ir.to_graph(model), model, samples, ["n1"], axis=-1)["n1"]
    g, _ = run(decoder_block(), calib, SmoothConfig(alpha=0.5))
    x = next(n for n in g.nodes if n.name == "q_proj").inputs[0].name
    after = channel_absmax(g, model, samples, [x], axis=-1)[x]
    assert before[5] / np.median(before) > 20
    assert after[5] / np.median(after) < 0.5 * before[5] / np.median(before)


def test_alpha_search_picks_per_group_and_declines_what_does_not_help():
    cfg = SmoothConfig(search=True)
    _, rec = run(decoder_block(), decoder_calib(), cfg)
    alphas = rec["stats"]["alpha"]
    declined = {d["node"] for d in rec["declined"] if "lowers the quantized output error" in d["reason"]}
    assert set(alphas) | declined == {"q_proj", "o_proj", "gate_proj", "down_proj"} and not set(alphas) & declined
    assert "q_proj" in alphas  # the outlier channel: smoothing pays
    assert all(a in cfg.alpha_grid for a in alphas.values())
    assert rec["numerics"]["checked"]


def test_search_on_a_sample_of_columns_chooses_as_the_full_search():
    """w8a8's search measures 512 evenly spread output columns of each group (weights are quantized per column): on
    the decoder block, 16 of them (of 96 and 128) choose what all of them do, within one step of the grid."""
    full = run(decoder_block(), decoder_calib(), SmoothConfig(search=True))[1]
    part = run(decoder_block(), decoder_calib(), SmoothConfig(search=True, search_columns=16))[1]
    a, b = full["stats"]["alpha"], part["stats"]["alpha"]
    assert set(a) == set(b) and all(abs(a[k] - b[k]) <= 0.1 + 1e-9 for k in a), (a, b)
    with pytest.raises(ConfigError, match="search_columns"):
        SmoothConfig(search_columns=-1).validate()


@pytest.mark.parametrize("holdout", [False, True])
def test_holdout_search_measures_on_samples_whose_maxima_it_did_not_use(holdout):
    """With ``holdout`` the search's s comes from the even samples' channel maxima and its error from the odd
    samples' rows (a smoothing fitted to the calibration maxima is judged on tokens it has not seen); the fold uses
    every sample's maxima. Sample i is all i here, so every row tells which sample it came from."""
    d = 16
    model = helpers.make([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], [helpers.vi("x", [1, 4, d])],
                         [helpers.vi("y", [1, 4, d])], [helpers.init("w", helpers.rand(d, d))])
    model = onnx.shape_inference.infer_shapes(ir.normalize(model))
    calib = {"x": np.stack([np.full((4, d), i + 1.0, np.float32) for i in range(6)])}
    ctx = PassContext(model=model, samples=split_samples(model, calib))
    p = SmoothQuantPass(SmoothConfig(search=True, holdout=holdout))
    amax, fit, rows, _ = p._rows(ir.to_graph(model), ctx, ["x"], [])
    assert np.all(amax["x"] == 6.0)
    assert np.all(fit["x"] == (5.0 if holdout else 6.0))  # samples 1, 3, 5 (i + 1 over even i)
    assert set(np.unique(rows["x"])) == ({2.0, 4.0, 6.0} if holdout else {1.0, 2.0, 3.0, 4.0, 5.0, 6.0})


def test_search_error_model_prefers_smoothing_on_an_outlier_channel():
    from qcompile.passes.smooth import quantized_error, smoothing_scales
    rng = np.random.default_rng(0)
    x = rng.standard_normal((256, 32))
    x[:, 3] *= 50.0
    w = rng.standard_normal((32, 16)) * 0.2
    s = smoothing_scales(np.abs(x).max(0), np.abs(w).max(1), 0.5)
    assert quantized_error(x, w, s, 8, 8) < 0.5 * quantized_error(x, w, None, 8, 8)
    flat = rng.standard_normal((256, 32))  # no outliers: the unsmoothed error is not beaten by much
    assert quantized_error(flat, w, None, 8, 8) < 2 * quantized_error(
        flat, w, smoothing_scales(np.abs(flat).max(0), np.abs(w).max(1), 0.5), 8, 8)


def decoder_stack(n: int, d: int = 64, hidden: int = 160, seq: int = 16, seed: int = 0) -> onnx.ModelProto:
    """``n`` pre-norm blocks (RMSNorm -> q/v with a multiplicative mix -> o_proj, residual; RMSNorm -> SwiGLU,
    residual) with outlier RMSNorm weights, a final RMSNorm and a 256-way head: deep enough that fp32 reordering
    alone breaks the instrument's fixed bound."""
    rng = np.random.default_rng(seed)
    nodes, inits, x = [], [helpers.init("eps", np.array(1e-6, np.float32))], "x"
    for i in range(n):
        p = f"b{i}_"
        g1 = (1 + rng.standard_normal(d) * 0.1).astype(np.float32)
        g2 = g1.copy()
        g1[5], g2[7] = 30.0, 20.0
        inits += [helpers.init(p + "g1", g1), helpers.init(p + "g2", g2)]
        for nm, a, b in (("wq", d, d), ("wv", d, d), ("wo", d, d), ("wg", d, hidden), ("wu", d, hidden),
                         ("wd", hidden, d)):
            w = rng.standard_normal((a, b)) * a ** -0.5 * (0.5 if nm in ("wo", "wd") else 1.0)
            inits.append(helpers.init(p + nm, w.astype(np.float32)))
        nodes += helpers.rmsnorm(x, p + "g1", p + "n1") + [
            helper.make_node("MatMul", [p + "n1", p + "wq"], [p + "q"], name=p + "q_proj"),
            helper.make_node("MatMul", [p + "n1", p + "wv"], [p + "v"], name=p + "v_proj"),
            helper.make_node("Mul", [p + "q", p + "v"], [p + "qv"], name=p + "mix"),
            helper.make_node("MatMul", [p + "qv", p + "wo"], [p + "o"], name=p + "o_proj"),
            helper.make_node("Add", [x, p + "o"], [p + "h"], name=p + "res1"),
            *helpers.rmsnorm(p + "h", p + "g2", p + "n2")]
        nodes += [helper.make_node("MatMul", [p + "n2", p + "wg"], [p + "gate"], name=p + "gate_proj"),
                  helper.make_node("MatMul", [p + "n2", p + "wu"], [p + "up"], name=p + "up_proj"),
                  helper.make_node("Sigmoid", [p + "gate"], [p + "sig"], name=p + "sig"),
                  helper.make_node("Mul", [p + "gate", p + "sig"], [p + "silu"], name=p + "silu"),
                  helper.make_node("Mul", [p + "silu", p + "up"], [p + "prod"], name=p + "gated"),
                  helper.make_node("MatMul", [p + "prod", p + "wd"], [p + "down"], name=p + "down_proj"),
                  helper.make_node("Add", [p + "h", p + "down"], [p + "y"], name=p + "res2")]
        x = p + "y"
    nodes += helpers.rmsnorm(x, "gf", "nf") + [helper.make_node("MatMul", ["nf", "wlm"], ["logits"], name="lm_head")]
    inits += [helpers.init("gf", np.ones(d, np.float32)),
              helpers.init("wlm", (rng.standard_normal((d, 256)) * d ** -0.5).astype(np.float32))]
    return helpers.make(nodes, [helpers.vi("x", [1, seq, d])], [helpers.vi("logits", [1, seq, 256])], inits)


class _Nudge(PassBase):
    """A pretend equivalence pass with a real bug: one layer's weight scaled by ``1 + rel``."""

    name = "nudge"
    kind = PassKind.EQUIVALENCE

    def __init__(self, node: str, rel: float) -> None:
        self.node, self.rel = node, rel

    def call(self, graph, ctx):
        n = next(x for x in graph.nodes if x.name == self.node)
        n.inputs[1].values = (n.inputs[1].values * np.float32(1 + self.rel)).astype(np.float32)
        return PassResult(graph, True)


def test_instrument_accepts_smoothing_on_a_deep_decoder_and_still_rejects_a_1e4_weight_error():
    """16 blocks: smoothing moves the logits beyond the fixed fp32 bound (and ORT's reordering floor is 0: it fuses
    nothing here); the rounding floor (every constant and computed value moved by one ulp) accepts it, while one
    layer's weights scaled by 1 + 1e-4 in the middle of the stack are still refused."""
    model = onnx.shape_inference.infer_shapes(ir.normalize(decoder_stack(16)))
    calib = {"x": np.random.default_rng(1).standard_normal((4, 16, 64)).astype(np.float32)}
    ctx = PassContext(model=model, samples=split_samples(model, calib))
    PassManager([SmoothQuantPass(SmoothConfig(alpha=0.5))], [NumericsInstrument()]).run(ir.to_graph(model), ctx)
    rec = ctx.records[0]["numerics"]
    assert rec["checked"] and not rec["within_fixed_tolerance"]
    assert rec["noise_floor_reordered"] == 0.0 and rec["max_abs"] <= 2 * rec["noise_floor_rounding"]
    for node in ("b8_up_proj", "b0_q_proj"):
        ctx = PassContext(model=model, samples=split_samples(model, calib))
        with pytest.raises(NumericsError, match="noise floor"):
            PassManager([_Nudge(node, 1e-4)], [NumericsInstrument()]).run(ir.to_graph(model), ctx)


def gqa_attention(d: int = 32, heads: int = 4, kv_heads: int = 2, seq: int = 8, v_output: bool = False):
    """Grouped-query attention as exporters write it: q/k/v projections, Reshape/Transpose to heads, KV heads
    repeated (Unsqueeze, Expand, Reshape), softmax(q·kᵀ)·v, Transpose/Reshape back, o_proj."""
    hd = d // heads
    rep = heads // kv_heads
    nodes = [helper.make_node("MatMul", ["x", "wq"], ["q"], name="q_proj"),
             helper.make_node("MatMul", ["x", "wk"], ["k"], name="k_proj"),
             helper.make_node("MatMul", ["x", "wv"], ["v"], name="v_proj"),
             helper.make_node("Reshape", ["q", "q_shape"], ["q4"], name="q_heads"),
             helper.make_node("Transpose", ["q4"], ["qh"], name="q_t", perm=[0, 2, 1, 3])]
    for t in ("k", "v"):
        nodes += [helper.make_node("Reshape", [t, "kv_shape"], [f"{t}4"], name=f"{t}_heads"),
                  helper.make_node("Transpose", [f"{t}4"], [f"{t}h"], name=f"{t}_t", perm=[0, 2, 1, 3]),
                  helper.make_node("Unsqueeze", [f"{t}h", "ax2"], [f"{t}u"], name=f"{t}_unsq"),
                  helper.make_node("Expand", [f"{t}u", "rep_shape"], [f"{t}e"], name=f"{t}_expand"),
                  helper.make_node("Reshape", [f"{t}e", "h_shape"], [f"{t}r"], name=f"{t}_repeat")]
    nodes += [helper.make_node("Transpose", ["kr"], ["kT"], name="k_T", perm=[0, 1, 3, 2]),
              helper.make_node("MatMul", ["qh", "kT"], ["scores"], name="qk"),
              helper.make_node("Softmax", ["scores"], ["probs"], name="softmax", axis=-1),
              helper.make_node("MatMul", ["probs", "vr"], ["ctx"], name="pv"),
              helper.make_node("Transpose", ["ctx"], ["ctx_t"], name="ctx_t", perm=[0, 2, 1, 3]),
              helper.make_node("Reshape", ["ctx_t", "out_shape"], ["attn"], name="merge_heads"),
              helper.make_node("MatMul", ["attn", "wo"], ["y"], name="o_proj")]
    wv = helpers.rand(d, kv_heads * hd, scale=d ** -0.5)
    wv[:, 3] *= 25.0  # one V channel (and the two query heads' channels it feeds) with an outlier
    inits = [helpers.init("wq", helpers.rand(d, d, scale=d ** -0.5)),
             helpers.init("wk", helpers.rand(d, kv_heads * hd, scale=d ** -0.5)), helpers.init("wv", wv),
             helpers.init("wo", helpers.rand(d, d, scale=d ** -0.5)),
             _i64("q_shape", [1, seq, heads, hd]), _i64("kv_shape", [1, seq, kv_heads, hd]), _i64("ax2", [2]),
             _i64("rep_shape", [1, kv_heads, rep, seq, hd]), _i64("h_shape", [1, heads, seq, hd]),
             _i64("out_shape", [1, seq, d])]
    outputs = [helpers.vi("y", [1, seq, d])] + ([helpers.vi("v", [1, seq, kv_heads * hd])] if v_output else [])
    return helpers.make(nodes, [helpers.vi("x", [1, seq, d])], outputs, inits)


def test_attention_output_projection_folds_into_v_proj():
    """o_proj's input is V's channels moved to heads and repeated for grouped queries: s, tied over the query
    heads sharing a KV head, goes into v_proj's columns, exactly."""
    model = gqa_attention()
    g, rec = run(model, {"x": helpers.rand(8, 8, 32)}, SmoothConfig(alpha=0.5, min_channels=8))
    st = rec["stats"]
    assert st["folded"] == {"attention_v": 1} and st["mul_inserted"] == 1, st  # q/k/v read the graph input
    assert rec["numerics"]["checked"]
    assert next(n for n in g.nodes if n.name == "o_proj").inputs[0].name == "attn"  # no Mul before o_proj
    before = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    wv_before, wo_before = before["wv"], before["wo"]
    wv_after = next(n for n in g.nodes if n.name == "v_proj").inputs[1].values
    wo_after = next(n for n in g.nodes if n.name == "o_proj").inputs[1].values
    s_o = wo_after[:, 0] / wo_before[:, 0]  # o_proj's rows: s per input channel
    ratio = wv_after[0] / wv_before[0]  # v_proj's row 0: s_x[0] (the q/k/v smoothing) / t per V channel
    m = np.array([(c // 8) // 2 * 8 + c % 8 for c in range(32)])  # query head h (8 dims) reads KV head h // 2
    np.testing.assert_allclose(s_o * ratio[m], ratio[0] * s_o[0], rtol=1e-5)  # s_o = t[m]
    assert s_o[3] > 2 * np.median(s_o)  # the outlier channel (KV channel 3, query heads 0 and 1) was smoothed


def test_attention_fold_declined_when_v_is_read_elsewhere():
    _, rec = run(gqa_attention(v_output=True), {"x": helpers.rand(8, 8, 32)}, SmoothConfig(alpha=0.5, min_channels=8))
    assert "attention_v" not in rec["stats"]["folded"] and rec["stats"]["mul_inserted"] == 2
    assert rec["numerics"]["checked"]


def fused_qkv_attention(cut: str, d: int = 32, heads: int = 4, seq: int = 8):
    """One qkv projection (MatMul + bias) cut into Q, K, V as exporters write it: ``gather`` (timm's ViT: Reshape to
    [1, seq, 3, heads, hd], Transpose, Gather 0/1/2), ``split`` (GPT-2: Split of the last axis, then heads), ``slice``
    (Slice of the last axis), ``overlap`` (as slice, but V's slice starts 4 channels into K's)."""
    hd = d // heads
    nodes = [helper.make_node("MatMul", ["x", "wqkv"], ["qkv0"], name="qkv_proj"),
             helper.make_node("Add", ["qkv0", "bqkv"], ["qkv"], name="qkv_bias")]
    inits = [_i64("h_shape", [1, seq, heads, hd]), _i64("out_shape", [1, seq, d])]
    if cut == "gather":
        nodes += [helper.make_node("Reshape", ["qkv", "qkv_shape"], ["qkv5"], name="qkv_heads"),
                  helper.make_node("Transpose", ["qkv5"], ["qkvt"], name="qkv_t", perm=[2, 0, 3, 1, 4])]
        inits += [_i64("qkv_shape", [1, seq, 3, heads, hd])]
        for i, t in enumerate("qkv"):
            nodes.append(helper.make_node("Gather", ["qkvt", f"i{i}"], [f"{t}h4"], name=f"take_{t}", axis=0))
            nodes.append(helper.make_node("Squeeze", [f"{t}h4", "ax0"], [f"{t}h"], name=f"sq_{t}"))
            inits.append(_i64(f"i{i}", [i]))
        inits.append(_i64("ax0", [0]))
    else:
        if cut == "split":
            nodes.append(helper.make_node("Split", ["qkv", "sizes"], ["q", "k", "v"], name="split_qkv", axis=-1))
            inits.append(_i64("sizes", [d, d, d]))
        else:
            v0 = 2 * d - (4 if cut == "overlap" else 0)
            for t, (b, e) in zip("qkv", [(0, d), (d, 2 * d), (v0, v0 + d)]):
                nodes.append(helper.make_node("Slice", ["qkv", f"{t}_b", f"{t}_e", "last"], [t], name=f"slice_{t}"))
                inits += [_i64(f"{t}_b", [b]), _i64(f"{t}_e", [e])]
            inits.append(_i64("last", [-1]))
        for t in "qkv":
            nodes += [helper.make_node("Reshape", [t, "h_shape"], [f"{t}4"], name=f"{t}_heads"),
                      helper.make_node("Transpose", [f"{t}4"], [f"{t}h"], name=f"{t}_t", perm=[0, 2, 1, 3])]
    wqkv = helpers.rand(d, 3 * d, scale=d ** -0.5)
    wqkv[:, 2 * d + 5] *= 25.0  # an outlier V channel: o_proj's input channel 5
    inits += [helpers.init("wqkv", wqkv), helpers.init("bqkv", helpers.rand(3 * d, scale=0.1)),
              helpers.init("wo", helpers.rand(d, d, scale=d ** -0.5))]
    nodes += [helper.make_node("Transpose", ["kh"], ["kT"], name="k_T", perm=[0, 1, 3, 2]),
              helper.make_node("MatMul", ["qh", "kT"], ["scores"], name="qk"),
              helper.make_node("Softmax", ["scores"], ["probs"], name="softmax", axis=-1),
              helper.make_node("MatMul", ["probs", "vh"], ["ctx"], name="pv"),
              helper.make_node("Transpose", ["ctx"], ["ctx_t"], name="ctx_t", perm=[0, 2, 1, 3]),
              helper.make_node("Reshape", ["ctx_t", "out_shape"], ["attn"], name="merge_heads"),
              helper.make_node("MatMul", ["attn", "wo"], ["y"], name="o_proj")]
    return helpers.make(nodes, [helpers.vi("x", [1, seq, d])], [helpers.vi("y", [1, seq, d])], inits)


@pytest.mark.parametrize("cut", ["gather", "split", "slice"])
def test_attention_fold_through_a_fused_qkv_projection(cut):
    """s of o_proj's input goes into the V columns of the one qkv projection (weights and bias); Q's and K's columns,
    which the other cuts read, are unchanged."""
    d = 32
    model = fused_qkv_attention(cut, d)
    g, rec = run(model, {"x": helpers.rand(8, 8, d)}, SmoothConfig(alpha=0.5, min_channels=8))
    st = rec["stats"]
    assert st["folded"].get("attention_v") == 1 and rec["numerics"]["checked"], st
    assert next(n for n in g.nodes if n.name == "o_proj").inputs[0].name == "attn"  # no Mul before o_proj
    before = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    b_after = next(n for n in g.nodes if n.name == "qkv_bias").inputs[1].values
    s_o = next(n for n in g.nodes if n.name == "o_proj").inputs[1].values[:, 0] / before["wo"][:, 0]
    np.testing.assert_allclose(b_after[: 2 * d], before["bqkv"][: 2 * d], rtol=1e-6)  # Q, K untouched
    np.testing.assert_allclose(b_after[2 * d:] * s_o, before["bqkv"][2 * d:], rtol=1e-5)  # V: 1/s
    assert s_o[5] > 2 * np.median(s_o)  # the outlier channel was smoothed


def test_attention_fold_declined_when_another_cut_reads_v_channels():
    _, rec = run(fused_qkv_attention("overlap"), {"x": helpers.rand(8, 8, 32)}, SmoothConfig(alpha=0.5, min_channels=8))
    assert "attention_v" not in rec["stats"]["folded"] and rec["numerics"]["checked"], rec["stats"]


def test_fold_through_the_class_token_gather_into_layernorm():
    """LayerNorm, then the class token (Gather on the token axis), then the head: 1/s goes into γ and β."""
    d, seq = 32, 5
    nodes = [helper.make_node("LayerNormalization", ["x", "g", "b"], ["n"], name="ln", axis=-1),
             helper.make_node("Gather", ["n", "zero"], ["cls"], name="take_cls", axis=1),
             helper.make_node("Gemm", ["cls", "w"], ["y"], name="head", transB=1)]
    gamma = np.abs(helpers.rand(d)) + 0.5
    gamma[7] = 30.0  # an outlier channel of the normalized tokens
    inits = [helpers.init("g", gamma), helpers.init("b", helpers.rand(d, scale=0.1)),
             helpers.init("zero", np.array(0, np.int64)), helpers.init("w", helpers.rand(10, d, scale=d ** -0.5))]
    model = helpers.make(nodes, [helpers.vi("x", [1, seq, d])], [helpers.vi("y", [1, 10])], inits, opset=17)
    g, rec = run(model, {"x": helpers.rand(8, seq, d)}, SmoothConfig(alpha=0.5, min_channels=8))
    st = rec["stats"]
    assert st["folded"] == {"norm": 1} and st["mul_inserted"] == 0 and rec["numerics"]["checked"], st
    assert next(n for n in g.nodes if n.name == "ln").inputs[1].values[7] < 30.0 / 2
