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


def _text_model():
    """One int64 input [N, T] (token ids, dynamic length) -> float sum per row."""
    nodes = [helper.make_node("Cast", ["ids"], ["f"], to=TensorProto.FLOAT),
             helper.make_node("ReduceSum", ["f"], ["s"], keepdims=0)]
    return helpers.make(nodes, [helpers.vi("ids", ["N", "T"], TensorProto.INT64)], [helpers.vi("s", [])], [])


def test_npy_for_a_one_input_model_and_a_folder_of_files(tmp_path):
    """An .npy feeds a one-input model; a folder's files (here sequences of different lengths, one or a batch per
    file) give their samples in name order; max_samples stops early."""
    rng = np.random.default_rng(0)
    np.save(tmp_path / "ids.npy", rng.integers(0, 9, (3, 5)))
    s = dataset.split_samples(_text_model(), dataset.load_data(tmp_path / "ids.npy"))
    assert [x["ids"].shape for x in s] == [(1, 5)] * 3
    folder = tmp_path / "calib"
    folder.mkdir()
    np.savez(folder / "b.npz", ids=rng.integers(0, 9, (2, 7)))
    np.savez(folder / "a.npz", ids=rng.integers(0, 9, (1, 3)))
    np.savez(folder / "c.npz", ids=rng.integers(0, 9, (1, 11)))
    (folder / "notes.txt").write_text("not data")
    s = dataset.split_samples(_text_model(), dataset.load_data(folder))
    assert [x["ids"].shape[1] for x in s] == [3, 7, 7, 11]
    assert len(dataset.split_samples(_text_model(), dataset.load_data(folder), max_samples=2)) == 2
    npys = tmp_path / "npys"
    npys.mkdir()
    for i, t in enumerate((4, 6)):
        np.save(npys / f"{i}.npy", rng.integers(0, 9, (1, t)))
    assert [x["ids"].shape for x in dataset.load_samples(_text_model(), npys)] == [(1, 4), (1, 6)]


def test_folder_and_npy_mistakes_are_clear_errors(tmp_path):
    np.save(tmp_path / "x.npy", np.ones((5, 4), np.float32))
    with pytest.raises(CalibrationError, match="an .npy calibration file feeds a model with one input; this one "
                                               "has 3"):
        dataset.split_samples(model(), dataset.load_data(tmp_path / "x.npy"), "calibration")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CalibrationError, match="holds no .npz or .npy files"):
        dataset.load_data(empty)
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    np.save(mixed / "a.npy", np.ones((1, 3), np.int64))
    np.savez(mixed / "b.npz", ids=np.ones((1, 3), np.int64))
    with pytest.raises(CalibrationError, match="mixes .npz and .npy"):
        dataset.load_data(mixed)
    bad = tmp_path / "bad"
    bad.mkdir()
    np.savez(bad / "a.npz", ids=np.ones((1, 3), np.int64))
    np.savez(bad / "b.npz", ids=np.ones((1, 3), np.int32))
    with pytest.raises(CalibrationError, match="^b.npz: calibration input 'ids' has dtype int32"):
        dataset.split_samples(_text_model(), dataset.load_data(bad))
