"""Empirical bias correction (insert_qdq.bias_correction): the shift of each layer's channel means that
quantization causes is measured and taken out of the int32 bias."""
import numpy as np
import onnx
import pytest
from onnx import helper

import qcompile
from qcompile.errors import ConfigError
from qcompile.passes.insert_qdq import QDQConfig
from qcompile.recipe import Recipe

import helpers

C = 8


def _model() -> onnx.ModelProto:
    """1x1 Conv (channels carrying a large level) -> depthwise 3x3 Conv whose taps sum to almost zero (edge filters,
    as in PP-OCRv4's first block): rounding the taps leaks the level through."""
    rng = np.random.default_rng(3)
    w1 = rng.normal(0, 0.5, (C, 3, 1, 1)).astype(np.float32)
    k = rng.normal(0, 1.0, (C, 1, 3, 3))
    k -= k.mean(axis=(2, 3), keepdims=True)  # sum of taps = 0 before rounding
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="pointwise"),
             helper.make_node("Conv", ["c1", "w2", "b2"], ["y"], name="edges", group=C, pads=[1, 1, 1, 1])]
    inits = [helpers.init("w1", w1), helpers.init("b1", rng.uniform(2, 4, C).astype(np.float32)),
             helpers.init("w2", k.astype(np.float32)), helpers.init("b2", np.zeros(C, np.float32))]
    return helpers.make(nodes, [helpers.vi("x", [1, 3, 16, 16])], [helpers.vi("y", [1, C, 16, 16])], inits)


def _images(n: int, seed: int) -> np.ndarray:
    """A flat level (different per image) with a little texture."""
    rng = np.random.default_rng(seed)
    return (rng.uniform(0.5, 1.5, (n, 3, 1, 1)) + rng.normal(0, 0.05, (n, 3, 16, 16))).astype(np.float32)


def _recipe(rounds: int) -> Recipe:
    return Recipe.from_dict({"name": f"bc{rounds}", "passes": [
        {"name": "insert_qdq", "observer": "minmax", "bias_correction": rounds}]})


def _mean_shift(path, model, test: np.ndarray) -> float:
    """Mean |E[y_quantized - y_float]| per channel over held-out images, relative to the output's spread."""
    import onnxruntime as ort

    ref = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    q = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    d = [q.run(None, {"x": x[None]})[0] - ref.run(None, {"x": x[None]})[0] for x in test]
    y = np.concatenate([ref.run(None, {"x": x[None]})[0] for x in test])
    return float(np.mean(np.abs(np.mean(np.concatenate(d), axis=(0, 2, 3)))) / np.std(y))


def test_bias_correction_removes_the_mean_shift(tmp_path):
    m = _model()
    calib, test = {"x": _images(32, 0)}, _images(24, 1)
    shift = {}
    for rounds in (0, 2):
        art = qcompile.compile(m, calib=calib, recipe=_recipe(rounds), out_dir=tmp_path / str(rounds),
                               measure_latency=False)
        shift[rounds] = _mean_shift(tmp_path / str(rounds) / "model.qdq.onnx", m, test)
        st = next(p for p in art.report["passes"] if p["pass"] == "insert_qdq")["stats"]
        if rounds:
            bc = st["bias_correction"]
            assert bc["layers"] == 2 and bc["rounds"] == 2 and bc["layers_without_int32_bias"] == 0
            assert bc["relative_mean_shift"][1] < bc["relative_mean_shift"][0]
        else:
            assert "bias_correction" not in st
    # held-out images: the leak through the rounded taps is mostly gone
    assert shift[2] < shift[0] / 4, shift
    assert shift[0] > 0.005, shift  # the uncorrected model does shift (else this test could not fail)


@pytest.mark.parametrize("bad", [True, -1, 9, 1.5])
def test_bias_correction_config_is_checked(bad):
    with pytest.raises(ConfigError, match="bias_correction"):
        QDQConfig.from_dict({"bias_correction": bad}, "insert_qdq")
