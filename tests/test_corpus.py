"""The third-party corpus's smallest models, compiled as a user would (the rest: tools/corpus_bench.py).

Each output loads in ONNX Runtime; the fp32 recipe keeps every task output equal; w8a8 keeps the task agreement the
current code reaches (measured with tools/corpus_bench.py; a regression fails here)."""
import numpy as np
import onnx
import pytest

import qcompile
from qcompile import numerics

corpus = pytest.importorskip("qcompile_zoo.corpus")

# name -> minimum w8a8 task agreement with fp32 on the corpus's test set
CI_MODELS = {"ppocr-cls": 0.95, "silero-vad": 0.97, "silero-vad-op15": 0.97}


def _outputs(path, samples):
    sess = numerics.session(str(path), optimize=True)
    return [numerics.run(sess, s) for s in samples]


@pytest.mark.parametrize("name", list(CI_MODELS))
def test_corpus_model_compiles_and_keeps_its_task(name, tmp_path):
    e = corpus.build(name)
    test = corpus.test_samples(e)
    ref = _outputs(e.model, test)
    for recipe, floor in (("fp32", 1.0), ("w8a8", CI_MODELS[name])):
        art = qcompile.compile(str(e.model), calib=str(e.calib), recipe=recipe, out_dir=tmp_path / recipe,
                               measure_latency=False)
        model = tmp_path / recipe / "model.qdq.onnx"
        onnx.checker.check_model(onnx.load(str(model)))
        got = corpus.evaluate(name, _outputs(model, test), ref)
        assert got["agreement"] >= floor, (recipe, got)
        if recipe == "w8a8":
            q = next(p for p in art.report["passes"] if p["pass"] == "insert_qdq")
            assert q["modified"] and sum(q["stats"]["quantized_nodes"].values()) > 0


def test_the_if_model_is_quantized_inside_its_branch(tmp_path):
    """silero-vad keeps its whole network inside an If on the int64 scalar `sr`: the 16 kHz branch is quantized, the
    8 kHz one (no calibration sample takes it) is left float with the reason."""
    e = corpus.build("silero-vad")
    art = qcompile.compile(str(e.model), calib=str(e.calib), recipe="w8a8", out_dir=tmp_path, measure_latency=False)
    q = next(p for p in art.report["passes"] if p["pass"] == "insert_qdq")
    assert q["stats"]["graphs"] >= 1 and q["stats"]["quantized_nodes"].get("Conv", 0) > 0
    assert any("taken by no calibration sample" in d["reason"] for d in q["declined"])


def test_task_metrics_detect_a_change():
    """The metrics are not trivially 1: a changed output changes the agreement."""
    probs = np.zeros((1, 6, 4), np.float32)
    probs[0, [0, 1, 2, 3, 4, 5], [1, 1, 0, 2, 0, 3]] = 1
    assert corpus.ctc_strings(probs) == [(1, 2, 3)]
    other = probs.copy()
    other[0, 3] = [0, 0, 0, 1]
    assert corpus.ctc_strings(other) == [(1, 3, 3)]  # a blank between repeats keeps both
    a = np.array([[0, 0, 10, 10], [20, 20, 30, 30]], np.float64)
    assert corpus.boxes_agree(a, a[::-1]) and not corpus.boxes_agree(a, a[:1])
    assert not corpus.boxes_agree(a, a + [0, 0, 12, 12])
