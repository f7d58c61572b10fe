import numpy as np
import pytest
from onnx import TensorProto, helper

from qcompile import dataset
from qcompile.errors import CalibrationError

import helpers


def model():
    nodes = [helper.make_node("Cast", ["sr"], ["srf"], to=TensorProto.FLOAT),
             helper.make_node("Mul", ["x", "srf"], ["y"]),
             helper.make_node("Add", ["y", "h"], ["z"])]
    return helpers.make(nodes, [helpers.vi("x", ["N", 4]), helpers.vi("sr", [], TensorProto.INT64),
                                helpers.vi("h", [2, "N", 4])], [helpers.vi("z", [2, "N", 4])], [])


def test_batch_and_per_sample_forms():
    arrays = {"x": np.ones((5, 4), np.float32), "sr": np.arange(5, dtype=np.int64),
              "h": np.zeros((5, 2, 1, 4), np.float32)}
    s = dataset.split_samples(model(), arrays)
    assert len(s) == 5
    assert s[2]["x"].shape == (1, 4) and s[2]["sr"].shape == () and int(s[2]["sr"]) == 2
    assert s[0]["h"].shape == (2, 1, 4)


@pytest.mark.parametrize("arrays,match", [
    ({"x": np.ones((5, 4), np.float32), "sr": np.arange(5)}, "missing"),
    ({"x": np.ones((5, 4), np.float32), "sr": np.arange(5), "h": np.zeros((5, 2, 1, 4), np.float32),
      "extra": np.ones(3)}, "unexpected"),
    ({"x": np.ones((5, 4), np.float64), "sr": np.arange(5), "h": np.zeros((5, 2, 1, 4), np.float32)}, "dtype"),
    ({"x": np.ones((5, 3), np.float32), "sr": np.arange(5), "h": np.zeros((5, 2, 1, 4), np.float32)}, "shape"),
    ({"x": np.full((5, 4), np.nan, np.float32), "sr": np.arange(5), "h": np.zeros((5, 2, 1, 4), np.float32)},
     "non-finite"),
    ({"x": np.ones((4, 4), np.float32), "sr": np.arange(5), "h": np.zeros((5, 2, 1, 4), np.float32)},
     "disagree"),
])
def test_mismatches_are_clear_errors(arrays, match):
    with pytest.raises(CalibrationError, match=match):
        dataset.split_samples(model(), arrays)


def test_unreadable_npz(tmp_path):
    p = tmp_path / "c.npz"
    p.write_bytes(b"not a zip")
    with pytest.raises(CalibrationError, match="cannot read"):
        dataset.load_npz(p)
