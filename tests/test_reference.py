"""Integer reference (qcompile/reference.py): fixed-point requantization, ORT agreement in LSBs, overflow check."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import qcompile
from qcompile import numerics
from qcompile.errors import NumericsError
from qcompile.lowering import lower, specialize
from qcompile.reference import integer_tensors, mbqm, quantize_multiplier, run_reference
from qcompile.recipe import Recipe
from qcompile.report import lsb_vs_reference

from helpers import attention, attention_calib, cnn, cnn_calib, init, make, vi


def test_multiplier_decomposition_matches_float() -> None:
    rng = np.random.default_rng(0)
    m = np.concatenate([rng.uniform(0, 1, 2000), 10.0 ** rng.uniform(-9, 0, 2000)])
    m0, shift = quantize_multiplier(m)
    assert np.all((m0 >= 1 << 30) & (m0 < 1 << 31))
    np.testing.assert_allclose(m0 * 2.0 ** (shift.astype(np.float64) - 31), m, rtol=2 ** -30)
    x = rng.integers(-(1 << 20), 1 << 20, m.size)
    exact = x * m
    got = np.array([mbqm(np.array([xi]), mi)[0] for xi, mi in zip(x, m)])
    # gemmlowp rounds twice (SRDHM to 2^-31·M0 units, then the shift): |error| <= 1/2 + 2^-(n+1), n = -shift
    bound = 0.5 + 0.5 * 2.0 ** shift.astype(np.float64) + 1e-6
    assert np.all(np.abs(got - exact) <= bound)
    assert np.mean(np.abs(got - exact) <= 0.5 + 1e-6) > 0.7  # mostly the correctly rounded value
    # the shift rounds ties half away from zero; SRDHM alone (n = 0) rounds ties up, as gemmlowp does
    assert mbqm(np.array([6, -6, 10, -10]), 0.25).tolist() == [2, -2, 3, -3]
    assert mbqm(np.array([3, -3]), 0.5).tolist() == [2, -1]


def _compare(model: onnx.ModelProto, calib: dict, feeds: dict, tmp_path) -> dict[str, np.ndarray]:
    art = qcompile.compile(model, calib=calib, recipe="w8a8", out_dir=tmp_path)
    qdq = onnx.load(str(tmp_path / "model.qdq.onnx"))
    ints = integer_tensors(qdq, feeds)
    n_q = sum(n.op_type == "QuantizeLinear" for n in qdq.graph.node)
    assert len(ints) == n_q  # one integer tensor per QuantizeLinear, no more, no fewer
    lsb = lsb_vs_reference(qdq, [feeds])  # ORT's fused integer kernels vs the reference, per quantized tensor
    assert len(lsb["tensors"]) == n_q and lsb["within_1_lsb"] >= 0.99
    assert art.report["lsb_vs_reference"]["onnxruntime"]["within_1_lsb"] >= 0.99  # the compile report has it too
    ort = numerics.run(numerics.session(qdq, optimize=True), feeds)
    ref = run_reference(qdq, feeds)
    for o in qdq.graph.output:
        assert ref[o.name].shape == ort[o.name].shape and ref[o.name].dtype == ort[o.name].dtype
    return ref, ort


def test_cnn_matches_ort_within_one_lsb(tmp_path) -> None:
    ref, ort = _compare(cnn(), cnn_calib(), cnn_calib(4), tmp_path)
    assert np.mean(np.argmax(ref["y"], -1) == np.argmax(ort["y"], -1)) >= 0.75


def test_attention_matches_ort(tmp_path) -> None:
    feeds = attention_calib(4)
    ref, ort = _compare(attention(), attention_calib(), feeds, tmp_path)
    np.testing.assert_allclose(ref["y"], ort["y"], rtol=1e-4, atol=1e-4 * np.abs(ort["y"]).max())


def test_int32_overflow_raises() -> None:
    # x uint8 at scale 1, w int8 127 at scale 1 over K = 2^18 inputs: 255·127·2^18 > 2^31
    k = 1 << 18
    nodes = [helper.make_node("DequantizeLinear", ["xq", "s", "zu"], ["x"]),
             helper.make_node("DequantizeLinear", ["wq", "s", "zi"], ["w"]),
             helper.make_node("MatMul", ["x", "w"], ["y0"]),
             helper.make_node("QuantizeLinear", ["y0", "s", "zu"], ["y"])]
    inits = [init("wq", np.full((k, 1), 127, np.int8)), init("s", np.array(1.0, np.float32)),
             init("zu", np.array(0, np.uint8)), init("zi", np.array(0, np.int8))]
    model = make(nodes, [vi("xq", [1, k], TensorProto.UINT8)], [vi("y", [1, 1], TensorProto.UINT8)], inits)
    with pytest.raises(NumericsError, match="int32 overflow"):
        run_reference(model, {"xq": np.full((1, k), 255, np.uint8)})
    # the same graph one step below the limit runs
    assert run_reference(model, {"xq": np.full((1, k), 1, np.uint8)})["y"].item() == 255


@pytest.mark.parametrize("dshape,ishape,axis", [((1, 1), (1, 32), 1), ((3, 4), (2, 4), 0), ((3, 5), (3, 2), 1),
                                                ((3, 4), (2, 2), 0)])
def test_gather_elements_as_onnxruntime_computes_it(dshape, ishape, axis):
    """The dynamo exporter's BERT mask gathers [1, 1] data to [1, 32]; onnx's own reference op fails on it."""
    import onnxruntime as ort
    from onnx.reference import ReferenceEvaluator

    from qcompile.reference import GatherElements

    g = helper.make_graph([helper.make_node("GatherElements", ["d", "i"], ["y"], axis=axis)], "g",
                          [helper.make_tensor_value_info("d", TensorProto.FLOAT, dshape),
                           helper.make_tensor_value_info("i", TensorProto.INT64, ishape)],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    rng = np.random.default_rng(3)
    feeds = {"d": rng.random(dshape).astype(np.float32),
             "i": rng.integers(-dshape[axis], dshape[axis], ishape).astype(np.int64)}
    want = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    assert np.array_equal(ReferenceEvaluator(m, new_ops=[GatherElements]).run(None, feeds)[0], want)


@pytest.mark.parametrize("shape", [(2, 5, 7), (1, 3, 4, 6), (2, 3, 2, 4, 5)], ids=["1d", "2d", "3d"])
def test_global_max_pool_over_every_spatial_axis(shape):
    """onnx's own reference op maxes over the last two axes whatever the rank: Keras' GlobalMaxPooling1D as tf2onnx
    writes it ([N, C, T]) lost its channel axis and failed the Squeeze after it; a 3-D pooling kept an axis."""
    import onnxruntime as ort
    from onnx.reference import ReferenceEvaluator

    from qcompile.reference import GlobalMaxPool

    g = helper.make_graph([helper.make_node("GlobalMaxPool", ["x"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    feeds = {"x": np.random.default_rng(4).normal(size=shape).astype(np.float32)}
    want = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    got = ReferenceEvaluator(m, new_ops=[GlobalMaxPool]).run(None, feeds)[0]
    assert got.shape == want.shape == shape[:2] + (1,) * (len(shape) - 2) and np.array_equal(got, want)


def _add_model(sa: float, za: int, sb: float, zb: int, sy: float, zy: int, dt=np.uint8, shape=(256, 256)):
    t = helper.np_dtype_to_tensor_dtype(np.dtype(dt))
    nodes = [helper.make_node("DequantizeLinear", ["a", "sa", "za"], ["af"]),
             helper.make_node("DequantizeLinear", ["b", "sb", "zb"], ["bf"]),
             helper.make_node("Add", ["af", "bf"], ["yf"]),
             helper.make_node("QuantizeLinear", ["yf", "sy", "zy"], ["y"])]
    inits = [init("sa", np.float32(sa)), init("za", dt(za)), init("sb", np.float32(sb)), init("zb", dt(zb)),
             init("sy", np.float32(sy)), init("zy", dt(zy))]
    return make(nodes, [vi("a", list(shape), t), vi("b", list(shape), t)], [vi("y", list(shape), t)], inits)


@pytest.mark.parametrize("dt", [np.uint8, np.int8])
def test_add_rounds_once_within_one_lsb_of_exact(dt) -> None:
    """Add lowers to int32 products and one rounding shift (lowering.add_multipliers): over every pair of 8-bit
    inputs the result is the correctly rounded sum except within ~2^-22 of a tie, never more than 1 LSB away."""
    from qcompile.lowering import lower

    info = np.iinfo(dt)
    q = np.arange(info.min, info.max + 1)
    a, b = np.meshgrid(q, q, indexing="ij")
    rng = np.random.default_rng(3)
    for _ in range(4):
        sa, sb = rng.uniform(0.002, 0.05, 2)
        sy = max(sa, sb) * rng.uniform(0.7, 2.5)
        za, zb, zy = (int(v) for v in rng.integers(info.min, info.max + 1, 3))
        m = _add_model(sa, za, sb, zb, sy, zy, dt)
        ops = [n.op_type for n in lower(m).model.graph.node]
        assert ops == ["IntMul", "IntMul", "IntAdd", "Requantize"], ops
        y = run_reference(m, {"a": a.astype(dt), "b": b.astype(dt)})["y"].astype(np.int64)
        f32 = lambda v: np.float64(np.float32(v))  # noqa: E731 - the scales as the model stores them
        exact = ((a - za) * f32(sa) + (b - zb) * f32(sb)) / f32(sy) + zy
        want = np.clip(np.floor(exact + 0.5), info.min, info.max)
        assert np.abs(y - want).max() <= 1
        assert np.mean(y == want) > 0.9995


def test_requantize_checks_its_promised_bound() -> None:
    """A Requantize's ``x_bound`` is checked (back ends pick int32-only arithmetic from it): a value beyond it is
    an error, not a silent wrap on the target."""
    from onnx.reference import ReferenceEvaluator

    from qcompile.lowering import DOMAIN
    from qcompile.reference import Requantize

    node = helper.make_node("Requantize", ["x", "m", "s"], ["y"], domain=DOMAIN, axis=1, x_zp=0, pre_shift=0,
                            y_zp=0, lo=-(1 << 31), hi=(1 << 31) - 1, to=TensorProto.INT32, x_bound=1000)
    ev = ReferenceEvaluator(node, new_ops=[Requantize])
    feeds = {"m": np.int32(1 << 30), "s": np.int32(-3)}
    assert ev.run(None, {"x": np.array([1000, -1000, 9], np.int32), **feeds})[0].tolist() == [63, -63, 1]
    with pytest.raises(NumericsError, match="bound 1000"):
        ev.run(None, {"x": np.array([1001], np.int32), **feeds})


def test_wide_add_keeps_tflites_form() -> None:
    """int16 inputs do not fit one int32 rounding: Add keeps TFLite's three-step form."""
    from qcompile.lowering import lower

    m = _add_model(0.001, 3, 0.0007, -5, 0.0013, 0, np.int16, shape=(1, 64))
    ops = [n.op_type for n in lower(m).model.graph.node]
    assert ops == ["Requantize", "Requantize", "IntAdd", "Requantize"], ops


def test_dynamic_spatial_axes_lower_as_the_targets_do() -> None:
    """A GlobalAveragePool between DequantizeLinear and QuantizeLinear on dynamic spatial axes (Paddle2ONNX's
    [-1, 3, ?, ?]): the TVM targets lower it with the shapes of their example (an integer sum and one
    requantize), so the reference the report compares them with lowers the same shapes; before, it kept a
    float average there, a border of its own that differed from every target by 1 LSB at a tie (PP-OCR's
    classifier: 74.9 % of integer tensors equal on tvm-x86 and tvm-opencl, 100 % now)."""
    from qcompile.report import reference_run

    nodes = [helper.make_node("DequantizeLinear", ["x", "sx", "zx"], ["xf"]),
             helper.make_node("GlobalAveragePool", ["xf"], ["pf"]),
             helper.make_node("QuantizeLinear", ["pf", "sy", "zy"], ["y"])]
    inits = [init("sx", np.float32(0.05)), init("zx", np.uint8(3)), init("sy", np.float32(0.013)),
             init("zy", np.uint8(0))]
    model = make(nodes, [vi("x", ["n", 8, "h", "w"], TensorProto.UINT8)], [vi("y", ["n", 8, 1, 1], TensorProto.UINT8)],
                 inits)
    rng = np.random.default_rng(0)
    samples = [{"x": rng.integers(0, 256, (1, 8, 12, 96), dtype=np.uint8)} for _ in range(3)]
    interp, refs, _ = reference_run(model, samples)
    assert [n.op_type for n in interp.lowered.model.graph.node].count("IntSum") == 1
    assert "y" not in interp.border_names  # an integer op, not a float region
    for s, r in zip(samples, refs):
        total = s["x"].astype(np.int64).reshape(8, -1).sum(1) - 3 * 12 * 96
        want = np.clip(np.round(total * 0.05 / (12 * 96) / 0.013), 0, 255)
        assert np.abs(r["y"].ravel().astype(np.int64) - want).max() <= 1
    # samples of different shapes: the model stays dynamic (one lowering cannot hold both shapes)
    mixed = samples[:1] + [{"x": rng.integers(0, 256, (1, 8, 6, 10), dtype=np.uint8)}]
    interp, _, _ = reference_run(model, mixed)
    assert "IntSum" not in [n.op_type for n in interp.lowered.model.graph.node]


CT_RECIPE = {"name": "w8a8-convtranspose", "passes": [
    "fold_constants", {"name": "insert_qdq", "compute_ops": ["Conv", "ConvTranspose", "Gemm", "MatMul"]}]}


@pytest.mark.parametrize("attrs, c_in, c_out, k, shape", [
    (dict(strides=[2, 2]), 4, 6, 2, (1, 4, 5, 5)),
    (dict(strides=[2, 2], pads=[1, 1, 1, 1], output_padding=[1, 1]), 4, 6, 3, (2, 4, 5, 4)),
    (dict(strides=[2, 2], pads=[1, 1, 1, 1]), 4, 3, 4, (1, 4, 6, 6)),  # DCGAN's upsampling
    (dict(strides=[3, 3], pads=[1, 2, 2, 1]), 4, 5, 3, (1, 4, 4, 5)),  # pads beyond the kernel's reach: a crop
    (dict(pads=[1, 1, 1, 1], dilations=[2, 2]), 4, 6, 3, (1, 4, 6, 6)),
    (dict(strides=[2, 2], pads=[1, 1, 1, 1], output_padding=[1, 1], group=2), 4, 6, 3, (1, 4, 5, 5)),
    (dict(strides=[2], pads=[1, 1]), 4, 6, 4, (1, 4, 9)),  # 1-D (audio decoders)
], ids=["s2k2", "s2k3_outpad", "s2k4_dcgan", "s3_crop", "dilated", "grouped", "1d"])
def test_conv_transpose_lowers_to_an_integer_conv_within_one_lsb_of_ort(attrs, c_in, c_out, k, shape, tmp_path):
    """A quantized ConvTranspose is the integer Conv it equals (lowering.transposed_as_conv: zero points between the
    inputs, reversed taps, swapped channels), so every target's Conv kernels run it; the reference's integer output
    is within one step of ORT's float ConvTranspose on the same integer inputs and weights."""
    rng = np.random.default_rng(0)
    nsp, group = len(shape) - 2, attrs.get("group", 1)
    wt = (rng.standard_normal((c_in, c_out // group, *[k] * nsp)) * 0.3).astype(np.float32)
    w1 = (rng.standard_normal((c_out, c_out, *[1] * nsp)) * 0.3).astype(np.float32)
    nodes = [helper.make_node("ConvTranspose", ["x", "wt", "bt"], ["t"], name="ct", **attrs),
             helper.make_node("Relu", ["t"], ["r"]), helper.make_node("Conv", ["r", "w1"], ["y"], name="head")]
    model = make(nodes, [vi("x", ["n", *shape[1:]])], [vi("y", ["n"] + [None] * (len(shape) - 1))],
                 [init("wt", wt), init("bt", rng.standard_normal(c_out).astype(np.float32) * 0.1), init("w1", w1)])
    calib = {"x": rng.standard_normal((8, *shape[1:])).astype(np.float32)}
    feeds = {"x": rng.standard_normal(shape).astype(np.float32)}
    art = qcompile.compile(model, calib=calib, recipe=Recipe.from_dict(CT_RECIPE), out_dir=tmp_path,
                           measure_latency=False)
    qdq = onnx.load(str(tmp_path / "model.qdq.onnx"))
    lowered = lower(specialize(qdq, {"x": list(shape)}))
    assert not lowered.fallbacks, lowered.fallbacks
    assert not any(n.op_type == "ConvTranspose" for n in lowered.model.graph.node)
    lsb = lsb_vs_reference(qdq, [feeds])
    ct_out = next(n.output[0] for n in qdq.graph.node if n.op_type == "QuantizeLinear" and n.input[0] in ("t", "r"))
    row = next(t for t in lsb["tensors"] if t["tensor"] == ct_out)
    assert row["max_lsb"] <= 1 and row["equal"] >= 0.9, row
    ort = numerics.run(numerics.session(qdq, optimize=True), feeds)["y"]
    ref = run_reference(qdq, feeds)["y"]
    assert ref.shape == ort.shape and art.report["lsb_vs_reference"]["onnxruntime"]["within_1_lsb"] >= 0.99


def test_grouped_conv_transpose_kept_float_runs_in_the_reference(tmp_path):
    """onnx's reference ConvTranspose fails with group > 1; the reference runs it a group at a time, so a model whose
    grouped transposed conv stays float (w8a8 on onnxruntime) still gets its integer comparison."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["x", "w0"], ["a"], pads=[1, 1, 1, 1], name="c0"),
             helper.make_node("ConvTranspose", ["a", "wt", "bt"], ["t"], group=2, strides=[2, 2], pads=[1, 1, 1, 1],
                              output_padding=[1, 1], name="ct"),
             helper.make_node("Conv", ["t", "w1"], ["y"], name="c1")]
    model = make(nodes, [vi("x", [1, 3, 6, 6])], [vi("y", [1, 2, 12, 12])],
                 [init("w0", rng.standard_normal((4, 3, 3, 3)).astype(np.float32) * 0.3),
                  init("wt", rng.standard_normal((4, 3, 3, 3)).astype(np.float32) * 0.3),
                  init("bt", rng.standard_normal(6).astype(np.float32) * 0.1),
                  init("w1", rng.standard_normal((2, 6, 1, 1)).astype(np.float32) * 0.3)])
    calib = {"x": rng.standard_normal((8, 3, 6, 6)).astype(np.float32)}
    art = qcompile.compile(model, calib=calib, recipe="w8a8", out_dir=tmp_path, measure_latency=False)
    lsb = art.report["lsb_vs_reference"]["onnxruntime"]
    assert "error" not in lsb and lsb["within_1_lsb"] >= 0.99, {k: v for k, v in lsb.items() if k != "tensors"}


@pytest.mark.parametrize("mode", ["bilinear", "nearest", "bicubic"])
@pytest.mark.parametrize("align_corners", [0, 1])
def test_grid_sample_opset16_mode_names(mode, align_corners):
    """Opsets 16-19 spell GridSample's modes bilinear / bicubic (onnx's reference op knows only opset 20's linear /
    cubic): the reference runs them, as ONNX Runtime computes them."""
    n = helper.make_node("GridSample", ["x", "g"], ["y"], mode=mode, align_corners=align_corners)
    g = helper.make_graph([n], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 5, 6]),
                                     helper.make_tensor_value_info("g", TensorProto.FLOAT, [1, 3, 4, 2])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    rng = np.random.default_rng(0)
    feeds = {"x": rng.standard_normal((1, 2, 5, 6)).astype(np.float32),
             "g": rng.uniform(-1.1, 1.1, (1, 3, 4, 2)).astype(np.float32)}  # some points outside: zero padding
    ref = run_reference(m, feeds)["y"]
    ort_y = numerics.run(numerics.session(m), feeds)["y"]
    np.testing.assert_allclose(ref, ort_y, rtol=0, atol=1e-6)
