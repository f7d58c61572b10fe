"""Data-free cross-layer equalization: equal weight ranges after it, fp32-exact (numerics instrument), ReLU6 declined
by default / rewritten exactly / replaced approximately, high-bias absorption, and per-tensor w8a8 on the zoo CNNs."""
import numpy as np
import onnx
import pytest
from onnx import helper

import qcompile
from qcompile import dataset, ir, numerics
from qcompile.calibrate import activations
from qcompile.errors import ConfigError
from qcompile.instruments import CheckerInstrument, NumericsInstrument
from qcompile.pass_infra import PassContext, PassManager
from qcompile.passes.cle import CLEConfig, CrossLayerEqualizationPass
from qcompile.recipe import EQUIVALENCE, PassSpec, Recipe, load_recipe

import helpers

C = 8
RNG = np.random.default_rng(11)
GAIN = (10.0 ** RNG.uniform(-2.0, 0.0, C)).astype(np.float32)  # producer rows 100x apart in range


def _conv(name, x, w, y, b=None, **attrs):
    return helper.make_node("Conv", [x, w] + ([b] if b else []), [y], name=name, **attrs)


def _model(between="Relu", consumer="dense", extra_reader=None, bias=0.1):
    """Conv p (3x3) -> `between` -> Conv c (dense 1x1, or depthwise 3x3) -> y; `extra_reader` adds a residual Add
    ("add") or exposes the intermediate as a graph output ("output")."""
    nodes, t = [_conv("p", "x", "w1", "c1", "b1", pads=[1, 1, 1, 1])], "c1"
    inits = [helpers.init("w1", helpers.rand(C, 3, 3, 3, scale=0.5) * GAIN[:, None, None, None]),
             helpers.init("b1", (GAIN * bias).astype(np.float32))]
    if between == "Clip":
        nodes.append(helper.make_node("Clip", ["c1", "lo", "hi"], ["a1"], name="act"))
        inits += [helpers.init("lo", np.array(0, np.float32)), helpers.init("hi", np.array(0.2, np.float32))]
        t = "a1"
    elif between:
        attrs = {"kernel_shape": [1, 1]} if between == "MaxPool" else {}
        nodes.append(helper.make_node(between, ["c1"], ["a1"], name="act", **attrs))
        t = "a1"
    if consumer == "dense":
        nodes.append(_conv("c", t, "w2", "y", "b2"))
        inits.append(helpers.init("w2", helpers.rand(4, C, 1, 1, scale=0.3) / GAIN[None, :, None, None]))
        out = [helpers.vi("y", [1, 4, 8, 8])]
    else:
        nodes.append(_conv("c", t, "w2", "y", "b2", group=C, pads=[1, 1, 1, 1]))
        inits.append(helpers.init("w2", helpers.rand(C, 1, 3, 3, scale=0.3) / GAIN[:, None, None, None]))
        out = [helpers.vi("y", [1, C, 8, 8])]
    inits.append(helpers.init("b2", helpers.rand(out[0].type.tensor_type.shape.dim[1].dim_value, scale=0.1)))
    if extra_reader == "add":
        nodes.append(helper.make_node("Add", [t, t], ["z"], name="residual"))
        out.append(helpers.vi("z", [1, C, 8, 8]))
    elif extra_reader == "output":
        out.append(helpers.vi(t, [1, C, 8, 8]))
    return helpers.make(nodes, [helpers.vi("x", [1, 3, 8, 8])], out, inits)


def _run(model, cfg=None, samples=None):
    ctx = PassContext(model=model, samples=samples or [{"x": helpers.rand(1, 3, 8, 8)} for _ in range(4)])
    graph = PassManager([CrossLayerEqualizationPass(cfg or CLEConfig())],
                        [CheckerInstrument(), NumericsInstrument()]).run(ir.to_graph(model), ctx)
    return ir.to_model(graph, model), ctx.records[0]


def _weights(model, node_name):
    init = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    node = next(n for n in model.graph.node if n.name == node_name)
    return [init[i] for i in node.input[1:]]


def _in_range(w):
    """max |W[:, c]| per input channel (depthwise: per row)."""
    return np.abs(w).max(axis=(0, 2, 3)) if w.shape[1] > 1 else np.abs(w).reshape(w.shape[0], -1).max(axis=1)


@pytest.mark.parametrize("between", ["Relu", "", "LeakyRelu", "MaxPool"])
@pytest.mark.parametrize("consumer", ["dense", "depthwise"])
def test_pair_ranges_made_equal_exactly(between, consumer):
    m = _model(between, consumer)
    out, rec = _run(m)
    assert rec["kind"] == "equivalence" and rec["modified"] and rec["stats"]["pairs"] == 1
    assert rec["numerics"]["checked"] and rec["numerics"]["within_fixed_tolerance"]
    w1, b1 = _weights(out, "p")
    w2 = _weights(out, "c")[0]
    r1, r2 = np.abs(w1).reshape(C, -1).max(axis=1), _in_range(w2)
    np.testing.assert_allclose(r1, r2, rtol=1e-6)  # one pair: s = sqrt(r1 r2)/r2 equalizes in one step
    before = np.abs(_weights(m, "p")[0]).reshape(C, -1).max(axis=1)
    assert r1.min() / r1.max() > 3 * before.min() / before.max()  # the 100x spread is gone from the producer
    s = before / r1
    np.testing.assert_allclose(b1, (GAIN * 0.1) / s, rtol=1e-5)  # b' = b / s


def test_conv_dw_conv_chain_converges_to_equal_ranges():
    """expand 1x1 -> Relu -> dw 3x3 -> Relu -> project 1x1: the depthwise conv sits in two pairs; iterated until the
    scales stop moving (tolerance 1e-4), all three views of channel c have one range."""
    nodes = [_conv("expand", "x", "we", "e", "be"), helper.make_node("Relu", ["e"], ["re"], name="r1"),
             _conv("dw", "re", "wd", "d", "bd", group=C, pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["d"], ["rd"], name="r2"), _conv("project", "rd", "wp", "y", "bp")]
    inits = [helpers.init("we", helpers.rand(C, 3, 1, 1) * GAIN[:, None, None, None]),
             helpers.init("be", helpers.rand(C, scale=0.1)),
             helpers.init("wd", helpers.rand(C, 1, 3, 3) / GAIN[::-1, None, None, None]),
             helpers.init("bd", helpers.rand(C, scale=0.1)), helpers.init("wp", helpers.rand(4, C, 1, 1)),
             helpers.init("bp", helpers.rand(4, scale=0.1))]
    m = helpers.make(nodes, [helpers.vi("x", [1, 3, 8, 8])], [helpers.vi("y", [1, 4, 8, 8])], inits)
    out, rec = _run(m)
    assert rec["stats"]["converged"] and rec["stats"]["pairs"] == 2 and rec["numerics"]["checked"]
    re_, rd = (np.abs(_weights(out, n)[0]).reshape(C, -1).max(axis=1) for n in ("expand", "dw"))
    rp = _in_range(_weights(out, "project")[0])
    np.testing.assert_allclose(re_, rd, rtol=1e-3)
    np.testing.assert_allclose(rd, rp, rtol=1e-3)
    # the producer built with a 100x spread of channel ranges uses the per-tensor grid better (DFQ's precision), and
    # the worst channel of any view gets more of its layer's grid; a single layer's mean precision (dw's, project's
    # rows: the report's median over the three) can go either way
    def rows(x, name):
        return np.abs(_weights(x, name)[0]).reshape(-1 if name == "project" else C, -1).max(axis=1)

    def worst(x):
        return min(float((r / r.max()).min()) for r in (rows(x, "expand"), rows(x, "dw"),
                                                         _in_range(_weights(x, "project")[0])))
    before, after = rows(m, "expand"), rows(out, "expand")
    assert np.mean(after / after.max()) > np.mean(before / before.max())
    assert worst(out) > 3 * worst(m)


def test_gemm_pairs_through_global_pool_and_flatten():
    """Conv -> Relu -> GlobalAveragePool -> Flatten -> Gemm(transB=1) -> Relu -> Gemm(transB=0, scalar bias)."""
    nodes = [_conv("p", "x", "w1", "c1", "b1", pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c1"], ["a1"]),
             helper.make_node("GlobalAveragePool", ["a1"], ["g"]), helper.make_node("Flatten", ["g"], ["f"]),
             helper.make_node("Gemm", ["f", "wf", "bf"], ["h"], name="fc1", transB=1),
             helper.make_node("Relu", ["h"], ["rh"]), helper.make_node("Gemm", ["rh", "wo", "bo"], ["y"], name="fc2")]
    inits = [helpers.init("w1", helpers.rand(C, 3, 3, 3) * GAIN[:, None, None, None]),
             helpers.init("b1", GAIN * 0.1), helpers.init("wf", helpers.rand(6, C) / GAIN[None, :]),
             helpers.init("bf", helpers.rand(6, scale=0.1)), helpers.init("wo", helpers.rand(6, 3) * 5),
             helpers.init("bo", np.array(0.2, np.float32))]
    m = helpers.make(nodes, [helpers.vi("x", [1, 3, 8, 8])], [helpers.vi("y", [1, 3])], inits)
    out, rec = _run(m)
    assert rec["stats"]["pairs"] == 2 and rec["numerics"]["within_fixed_tolerance"]
    r1 = np.abs(_weights(out, "p")[0]).reshape(C, -1).max(axis=1)
    np.testing.assert_allclose(r1, np.abs(_weights(out, "fc1")[0]).max(axis=0), rtol=1e-3)
    assert _weights(out, "fc2")[1].shape == (3,)  # the scalar bias became per output feature


@pytest.mark.parametrize("extra,reason", [("add", "also read by Add"), ("output", "graph output")])
def test_declines_intermediate_read_elsewhere(extra, reason):
    out, rec = _run(_model("Relu", "dense", extra_reader=extra))
    assert not rec["modified"]
    assert any(d["node"] == "p" and reason in d["reason"] for d in rec["declined"])
    assert _weights(out, "p")[0] is not None and out.graph.node[0].input[1] == "w1"


def test_relu6_declined_by_default_rewritten_exactly_or_replaced():
    m = _model("Clip", "dense")
    _, rec = _run(m)
    assert not rec["modified"] and any("not homogeneous" in d["reason"] for d in rec["declined"])
    # exact: Clip(0, hi) -> Min(Relu(z / s), hi / s) with a per-channel bound; still an EQUIVALENCE pass
    out, rec = _run(m, CLEConfig.from_dict({"relu6": "per_channel_min"}, "cle"))
    assert rec["kind"] == "equivalence" and rec["modified"] and rec["numerics"]["within_fixed_tolerance"]
    ops = [n.op_type for n in out.graph.node]
    assert "Clip" not in ops and ops.count("Min") == 1 and ops.count("Relu") == 1
    bound = _weights(out, next(n.name for n in out.graph.node if n.op_type == "Min"))[0]
    s = np.abs(_weights(m, "p")[0]).reshape(C, -1).max(axis=1) / np.abs(_weights(out, "p")[0]).reshape(C, -1).max(1)
    np.testing.assert_allclose(bound.reshape(-1), 0.2 / s, rtol=1e-5)
    # approximate: ReLU6 -> Relu (DFQ); the pass says it is APPROXIMATE and the instrument only measures it
    out, rec = _run(m, CLEConfig.from_dict({"relu6": "replace"}, "cle"))
    assert rec["kind"] == "approximate" and rec["modified"] and rec["numerics"]["checked"] is False
    assert "Clip" not in [n.op_type for n in out.graph.node] and "Min" not in [n.op_type for n in out.graph.node]


def test_high_bias_absorption_exact_on_the_calibration_data():
    """Producer channels with a large positive bias never reach the Relu's knee: their level moves into the
    consumer's bias (1x1, no padding), exactly on the samples it was measured on (h = the minimum)."""
    m = _model("Relu", "dense", bias=40.0)
    samples = [{"x": helpers.rand(1, 3, 8, 8)} for _ in range(4)]
    out, rec = _run(m, CLEConfig(absorb_bias=True), samples)
    assert rec["kind"] == "approximate" and rec["stats"]["biases_absorbed"] > 0
    sa, sb = numerics.session(m), numerics.session(out)
    for feeds in samples:
        a, b = numerics.run(sa, feeds)["y"], numerics.run(sb, feeds)["y"]
        assert numerics.within_fp32_tolerance(a, b, 1e-5, 1e-6)
    lo = {k: np.concatenate([v["c1"] for v in activations(ir.to_graph(g), g, samples, ["c1"])]).min(axis=(0, 2, 3))
          for k, g in (("before", m), ("after", out))}
    moved = lo["before"] > 0
    assert moved.sum() == rec["stats"]["biases_absorbed"] and moved.any()
    np.testing.assert_allclose(lo["after"][moved], 0.0, atol=1e-4)  # h = the old minimum: now each touches 0
    assert np.all(lo["after"][~moved] < 0)  # channels that reach the Relu's knee keep their bias
    _, rec = _run(_model("Relu", "depthwise", bias=40.0), CLEConfig(absorb_bias=True), samples)
    assert rec["stats"]["biases_absorbed"] == 0 and any("pads its input" in d["reason"] for d in rec["declined"])


@pytest.mark.parametrize("bad", [{"relu6": "clamp"}, {"max_iterations": 0}, {"tolerance": 2.0}, {"bogus": 1},
                                 {"absorb_percentile": 60.0}])
def test_config_is_checked(bad):
    with pytest.raises(ConfigError):
        CLEConfig.from_dict(bad, "cross_layer_equalize")


zoo = pytest.importorskip("qcompile_zoo")


@pytest.mark.parametrize("name,cfg,pairs", [("digits-cnn", {}, 2), ("resnet-digits", {}, 4),
                                            ("mobilenetv2-digits", {"relu6": "per_channel_min"}, 14)])
def test_zoo_cnns_exact(name, cfg, pairs):
    e = zoo.build(name)
    m = ir.load_model(str(e.model))
    ctx = PassContext(model=m, samples=dataset.load_samples(m, e.calib, "calib")[:2])
    passes = [PassSpec(n).build() for n in EQUIVALENCE] + [CrossLayerEqualizationPass(CLEConfig.from_dict(cfg))]
    PassManager(passes, [CheckerInstrument(), NumericsInstrument()]).run(ir.to_graph(m), ctx)
    rec = ctx.records[-1]
    assert rec["modified"] and rec["stats"]["pairs"] == pairs and rec["stats"]["converged"]
    assert rec["numerics"]["checked"] and rec["numerics"]["within_fixed_tolerance"]
    assert rec["stats"]["precision_after"] > rec["stats"]["precision_before"]


def _top1_and_sqnr(e, path, samples, ref):
    sess = numerics.session(str(path), optimize=True)
    out = {k: np.concatenate([numerics.run(sess, s)[k] for s in samples]) for k in ref}
    k = next(iter(ref))
    sqnr = 10 * np.log10(np.sum(ref[k] ** 2.0) / np.sum((out[k] - ref[k]) ** 2.0))
    return zoo.evaluate(e.name, out, ref, e), float(sqnr)


def _grid_use(path, qmax: int) -> float:
    """Mean over the conv weights' output channels of max|q| / qmax: how much of the per-tensor grid a channel uses."""
    m = onnx.load(str(path))
    init = {t.name: onnx.numpy_helper.to_array(t) for t in m.graph.initializer}
    use = [np.abs(q.astype(np.int32)).reshape(q.shape[0], -1).max(1) / qmax
           for q in (init.get(n.input[0]) for n in m.graph.node if n.op_type == "DequantizeLinear")
           if q is not None and q.ndim == 4]
    return float(np.mean(np.concatenate(use)))


def test_mobilenetv2_per_tensor_weights(tmp_path):
    """w8a8-cle (per-tensor int8 weights) within 1 pt of fp32; at 5-bit per-tensor weights CLE does what it is for:
    the conv channels use far more of the tensor's grid (measured 0.58 -> 0.75 of it).

    Not asserted: an end-to-end gain. The zoo model is trained on first use, and its weights depend on the CPU's float
    kernels (AVX-512 and AVX2 builds give different files). At 5 bits with bias correction, CLE + BC vs BC alone was
    23.4 vs 18.4 dB on the model an AMD EPYC trained, 18.6 vs 20.1 dB and 18.1 vs 18.6 dB on the two an Intel Xeon
    trained (AVX-512, and ATEN_CPU_CAPABILITY=avx2): a property of the model, not of the pass."""
    e = zoo.build("mobilenetv2-digits")
    samples = dataset.load_samples(onnx.load(str(e.model)), e.test, "test")
    sess = numerics.session(str(e.model), optimize=True)
    ref = {k: np.concatenate([numerics.run(sess, s)[k] for s in samples]) for k in ["logits"]}
    fp32 = zoo.evaluate(e.name, ref, ref, e)
    qcompile.compile(str(e.model), calib=str(e.calib), recipe="w8a8-cle", out_dir=tmp_path / "cle",
                     measure_latency=False)
    acc, _ = _top1_and_sqnr(e, tmp_path / "cle" / "model.qdq.onnx", samples, ref)
    assert fp32 > 0.97 and acc >= fp32 - 0.01
    base = load_recipe("w8a8-cle").to_dict()
    qdq = {**base["passes"][-1], "weight_bits": 5, "bias_correction": 0}
    use = {}
    for tag, passes in (("plain", base["passes"][:-2] + [qdq]), ("cle", base["passes"][:-1] + [qdq])):
        qcompile.compile(str(e.model), calib=str(e.calib), recipe=Recipe.from_dict({"name": tag, "passes": passes}),
                         out_dir=tmp_path / tag, measure_latency=False)
        use[tag] = _grid_use(tmp_path / tag / "model.qdq.onnx", qmax=15)
    assert use["cle"] > use["plain"] + 0.1, use
