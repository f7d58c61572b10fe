"""A QDQ model another quantizer made (here ONNX Runtime's quantize_static, as its users run it) compiled as it is
by the prequantized recipe: its own Q/DQ kept, every target bit-exact against the integer reference, the report's
float reference the model without its rounding."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

import qcompile
from qcompile import cli
from qcompile.errors import PassError
from qcompile.passes.import_qdq import float_model

import helpers


def _float_cnn() -> onnx.ModelProto:
    """Conv -> Relu -> Conv -> Relu6 (Clip) -> GlobalAveragePool -> Flatten -> Gemm: ONNX Runtime's quantizer drops
    the Relu and the Clip (the quantized ranges clamp the same), so a float model rebuilt without saturation differs."""
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
             helper.make_node("Clip", ["c2", "lo", "hi"], ["r2"], name="relu6"),
             helper.make_node("GlobalAveragePool", ["r2"], ["p"], name="pool"),
             helper.make_node("Flatten", ["p"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "w3", "b3"], ["y"], name="fc", transB=1)]
    inits = [helpers.init("w1", helpers.rand(8, 3, 3, 3, scale=0.4)), helpers.init("b1", helpers.rand(8, scale=0.1)),
             helpers.init("w2", helpers.rand(8, 8, 3, 3, scale=0.3)), helpers.init("b2", helpers.rand(8, scale=0.1)),
             helpers.init("lo", np.float32(0.0)), helpers.init("hi", np.float32(6.0)),
             helpers.init("w3", helpers.rand(5, 8, scale=0.5)), helpers.init("b3", helpers.rand(5, scale=0.1))]
    return helpers.make(nodes, [helpers.vi("x", [1, 3, 12, 12])], [helpers.vi("y", [1, 5])], inits, opset=17)


@pytest.fixture(scope="module")
def ort_qdq(tmp_path_factory):
    """(float model path, ORT QDQ model path, calibration npz path), per-channel int8 weights, uint8 activations."""
    folder = tmp_path_factory.mktemp("ort_qdq")
    fp, qp = folder / "float.onnx", folder / "qdq.onnx"
    onnx.save(_float_cnn(), str(fp))
    samples = [{"x": (helpers.rand(1, 3, 12, 12) * 2).astype(np.float32)} for _ in range(8)]

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(samples)

        def get_next(self):
            return next(self.it, None)

    quantize_static(str(fp), str(qp), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    np.savez(folder / "calib.npz", x=np.concatenate([s["x"] for s in samples]))
    return fp, qp, folder / "calib.npz"


def _ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


def test_float_reference_keeps_the_saturation_the_quantizer_folded(ort_qdq):
    """ORT's QDQ model has no Relu and no Clip left; the float reference clips each pair's range, so it computes
    the float model's function (weights dequantized: close, not equal)."""
    fp, qp, _ = ort_qdq
    qdq = onnx.load(str(qp))
    assert "Relu" not in _ops(qdq) and "Clip" not in _ops(qdq)
    ref, left = float_model(qdq)
    assert left == 0 and not {"QuantizeLinear", "DequantizeLinear"} & set(_ops(ref))
    onnx.checker.check_model(ref, full_check=True)
    x = {"x": (helpers.rand(1, 3, 12, 12) * 2).astype(np.float32)}  # within the calibrated ranges
    want = ort.InferenceSession(str(fp)).run(None, x)[0]
    got = ort.InferenceSession(ref.SerializeToString()).run(None, x)[0]
    assert np.abs(got - want).max() < 0.05 * np.abs(want).max(), np.abs(got - want).max()


@pytest.mark.parametrize("target", ["onnxruntime", "tvm-x86", "mcu-cortex-m4"])
def test_ort_qdq_model_compiles_as_it_is_and_is_bit_exact(ort_qdq, target, tmp_path):
    _, qp, calib = ort_qdq
    art = qcompile.compile(str(qp), calib=str(calib), recipe="prequantized", target=target, out_dir=tmp_path / "o",
                           measure_latency=False)
    rep = art.report
    written = onnx.load(str(tmp_path / "o" / "model.qdq.onnx"))
    src = onnx.load(str(qp))
    assert sorted(_ops(written)) == sorted(_ops(src))  # the file's own quantization, nothing re-quantized
    assert [r["pass"] for r in rep["passes"]] == ["fold_constants", "import_qdq"]
    rec = rep["passes"][-1]
    assert not rec["modified"] and rec["stats"]["quantize_linear"] == _ops(src).count("QuantizeLinear")
    assert "without its rounding" in rep["model"]["float_reference"]
    assert rep["layers"] and min(r["sqnr_db"] for r in rep["layers"]) > 25, rep["layers"]
    assert rep["outputs"]["y"]["sqnr_db"] > 25
    if target != "onnxruntime":
        lsb = rep["lsb_vs_reference"][target]
        assert lsb["integer_ops_exact"] and lsb["equal"] == 1.0, {k: v for k, v in lsb.items() if k != "tensors"}
        helpers.assert_main_build_equal(lsb)


def test_prequantized_needs_qdq_and_declines_the_operator_form(ort_qdq, tmp_path, capfd):
    fp, _, calib = ort_qdq
    out = tmp_path / "o"
    rc = cli.main(["compile", str(fp), "--calib", str(calib), "--recipe", "prequantized", "-o", str(out)])
    err = capfd.readouterr().err.strip().splitlines()
    assert rc == PassError.exit_code and len(err) == 1 and "holds no Quantize/DequantizeLinear" in err[0], err
    assert not out.exists()
    qop = tmp_path / "qop.onnx"
    with np.load(calib) as c:
        samples = [{"x": c["x"][i:i + 1]} for i in range(4)]

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(samples)

        def get_next(self):
            return next(self.it, None)

    quantize_static(str(fp), str(qop), Reader(), quant_format=QuantFormat.QOperator)
    rc = cli.main(["compile", str(qop), "--calib", str(calib), "--recipe", "prequantized", "-o", str(out)])
    err = capfd.readouterr().err.strip().splitlines()
    assert rc == PassError.exit_code and len(err) == 1 and "operator form (" in err[0] and "QLinearConv" in err[0]
    assert not out.exists()
    # and w8a8 on a QDQ model says which recipe takes it
    rc = cli.main(["compile", str(ort_qdq[1]), "--calib", str(calib), "-o", str(out)])
    err = capfd.readouterr().err.strip().splitlines()
    assert rc == PassError.exit_code and "prequantized recipe" in err[-1], err


def _qat_export() -> onnx.ModelProto:
    """Two convs as PyTorch exports fake-quantized QAT (TensorRT's form, NNCF's alike): int8 symmetric activations,
    each weight a float initializer quantized at run time per channel with a scale computed from it
    (``max|W| / 127``), float biases."""
    nodes, inits = [], [helpers.init("s_x", np.float32(0.05)), helpers.init("z8", np.int8(0)),
                        helpers.init("k127", np.float32(127.0))]
    x = "x"
    for i, (cin, cout) in enumerate(((3, 8), (8, 8))):
        inits += [helpers.init(f"w{i}", helpers.rand(cout, cin, 3, 3, scale=0.3)),
                  helpers.init(f"b{i}", helpers.rand(cout, scale=0.2)), helpers.init(f"zw{i}", np.zeros(cout, np.int8))]
        nodes += [helper.make_node("QuantizeLinear", [x, "s_x", "z8"], [f"xq{i}"]),
                  helper.make_node("DequantizeLinear", [f"xq{i}", "s_x", "z8"], [f"xd{i}"]),
                  helper.make_node("Abs", [f"w{i}"], [f"wa{i}"]),
                  helper.make_node("ReduceMax", [f"wa{i}"], [f"wm{i}"], axes=[1, 2, 3], keepdims=0),
                  helper.make_node("Div", [f"wm{i}", "k127"], [f"ws{i}"]),
                  helper.make_node("QuantizeLinear", [f"w{i}", f"ws{i}", f"zw{i}"], [f"wq{i}"], axis=0),
                  helper.make_node("DequantizeLinear", [f"wq{i}", f"ws{i}", f"zw{i}"], [f"wd{i}"], axis=0),
                  helper.make_node("Conv", [f"xd{i}", f"wd{i}", f"b{i}"], [f"c{i}"], name=f"conv{i}", pads=[1] * 4),
                  helper.make_node("Relu", [f"c{i}"], [f"r{i}"], name=f"relu{i}")]
        x = f"r{i}"
    nodes.append(helper.make_node("GlobalAveragePool", [x], ["y"], name="pool"))
    return helpers.make(nodes, [helpers.vi("x", [1, 3, 10, 10])], [helpers.vi("y", [1, 8, 1, 1])], inits, opset=17)


def test_qat_export_runs_integer_after_its_weights_and_biases_are_quantized(tmp_path):
    """Run-time weight scales fold to constants, each QuantizeLinear of a constant weight becomes its int8 result
    and each float bias int32 at s_x·s_w: both convs run as integer kernels on the M4 (left float before, 'weights
    are not constant', then 'bias is not an int32 constant'), bit-exact."""
    model = _qat_export()
    art, lsb = helpers.compile_exact(tmp_path, model, "mcu-cortex-m4", recipe="prequantized")
    stats = art.report["passes"][-1]["stats"]
    assert stats["constants_quantized_ahead"] == 2 and stats["float_biases_quantized"] == 2, stats
    assert not [f for f in art.report["fallbacks"] if f["op"] == "Conv"], art.report["fallbacks"]
    helpers.assert_main_build_equal(lsb)
    x = {"x": helpers.rand(1, 3, 10, 10)}
    want = ort.InferenceSession(model.SerializeToString()).run(None, x)[0]  # the export's own (float-bias) function
    got = art.run(x)["y"]
    # the biases' rounding (half a step of s_x·s_w) may move a later activation by a step: close, not equal
    assert np.abs(got - want).max() <= 0.05 * np.abs(want).max(), (np.abs(got - want).max(), np.abs(want).max())
