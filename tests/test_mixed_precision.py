"""insert_qdq's accuracy / latency options (w8a8-auto): the harmful layer is kept float, limits are reported,
latency decisions follow the measured times."""
import numpy as np
import pytest
from onnx import helper

import qcompile
from qcompile.errors import ConfigError
from qcompile.passes import mixed_precision
from qcompile.recipe import Recipe, load_recipe

import helpers

D = 32


def _model():
    """x -> MatMul(mm_outlier) -> h -> MatMul(mm_plain) -> y. x's channel 0 is 1000x the others in the data and
    W1's row 0 is tiny: per-tensor quantization of x wipes out every other channel; quantizing h is harmless."""
    w1 = helpers.rand(D, D, scale=0.3)
    w1[0] *= 1e-4
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm_outlier"),
             helper.make_node("MatMul", ["h", "w2"], ["y"], name="mm_plain")]
    return helpers.make(nodes, [helpers.vi("x", [1, D])], [helpers.vi("y", [1, D])],
                        [helpers.init("w1", w1), helpers.init("w2", helpers.rand(D, D, scale=0.3))])


def _calib(n=24):
    x = helpers.rand(n, D)
    x[:, 0] *= 1000.0
    return {"x": x}


def _recipe(**qdq):
    """w8a8 without its SmoothQuant (which flattens x's outlier channel into W1: nothing left to keep float)."""
    d = load_recipe("w8a8").to_dict()
    d["name"] = "test-auto"
    d["passes"] = [p for p in d["passes"] if not (isinstance(p, dict) and p["name"] == "smooth_quant")]
    d["passes"][-1] = {**d["passes"][-1], **qdq}
    return Recipe.from_dict(d)


def _mp(art):
    q = next(p for p in art.report["passes"] if p["pass"] == "insert_qdq")
    return q, q["stats"].get("mixed_precision")


def test_the_sensitive_layer_is_kept_float_and_the_target_met(tmp_path):
    acc = {"metric": "output_sqnr", "target": 35.0, "max_float_fraction": 0.5, "samples": 8}
    plain = qcompile.compile(_model(), calib=_calib(), recipe=_recipe(), out_dir=tmp_path / "p",
                             measure_latency=False)
    assert plain.report["outputs"]["y"]["sqnr_db"] < 35.0
    smoothed = qcompile.compile(_model(), calib=_calib(), recipe="w8a8", out_dir=tmp_path / "s",
                                measure_latency=False)  # w8a8's searched SmoothQuant reaches it with no float layer
    assert smoothed.report["outputs"]["y"]["sqnr_db"] >= 35.0
    art = qcompile.compile(_model(), calib=_calib(), recipe=_recipe(accuracy=acc), out_dir=tmp_path / "a",
                           measure_latency=False)
    q, mp = _mp(art)
    assert mp["float_layers"] == ["mm_outlier"] and mp["accuracy"]["target_met"]
    assert [r["node"] for r in mp["accuracy"]["sensitivity"]][0] == "mm_outlier"  # sorted, most sensitive first
    assert art.report["outputs"]["y"]["sqnr_db"] >= 35.0
    assert any(d["node"] == "mm_outlier" and "kept float" in d["reason"] for d in q["declined"])
    assert q["stats"]["quantized_nodes"].get("MatMul") == 1  # mm_plain stays quantized


def test_the_float_budget_is_respected_and_reported(tmp_path):
    acc = {"metric": "output_sqnr", "target": 200.0, "max_float_fraction": 0.0, "samples": 4}
    art = qcompile.compile(_model(), calib=_calib(), recipe=_recipe(accuracy=acc), out_dir=tmp_path,
                           measure_latency=False)
    q, mp = _mp(art)
    assert mp["float_layers"] == [] and not mp["accuracy"]["target_met"]
    assert any("not reached" in d["reason"] for d in q["declined"])


def test_bad_options_are_config_errors():
    for bad in ({"metric": "top5"}, {"target": 2.0}, {"bogus": 1}, {"max_float_fraction": 1.5}):
        with pytest.raises(ConfigError):
            _recipe(accuracy=bad).build_passes()
    with pytest.raises(ConfigError):
        _recipe(latency={"runs": 1}).build_passes()


def test_class_outputs_are_found_through_reshapes():
    nodes = [helper.make_node("MatMul", ["x", "w"], ["l"]), helper.make_node("Softmax", ["l"], ["p"]),
             helper.make_node("Identity", ["p"], ["probs"]), helper.make_node("Relu", ["l"], ["map"])]
    m = helpers.make(nodes, [helpers.vi("x", [1, 4])], [helpers.vi("probs", [1, 4]), helpers.vi("map", [1, 4])],
                     [helpers.init("w", helpers.rand(4, 4))])
    assert mixed_precision.class_outputs(m) == {"probs"}


LAYERS = ["a1", "a2", "b1", "b2"]


def _timed_search(monkeypatch, seconds) -> tuple[frozenset, dict]:
    """Search.latency over LAYERS in 2 regions with injected times (so the test cannot flake): each model is named
    by its float layers joined with commas ("all" for the float model) and `seconds(name)` is its time."""
    search = mixed_precision.Search(lambda fl: None, None, None, [{}])

    def model(floats, doc=None):
        m = helper.make_model(helper.make_graph([], "g", [], []))
        m.doc_string = doc if doc is not None else ",".join(sorted(floats))
        return m

    monkeypatch.setattr(search, "model", model)
    monkeypatch.setattr(mixed_precision.Search, "_times", lambda self, models, runs: [seconds(m.doc_string)
                                                                                      for m in models])
    search.float_model = model((), "all")
    return search.latency(mixed_precision.LatencyConfig(regions=2, runs=5), LAYERS, frozenset())


def test_latency_keeps_float_only_the_regions_measured_faster(monkeypatch):
    """Region 1 runs faster float, region 2 faster quantized; the result is measurably faster than float."""
    floats, info = _timed_search(monkeypatch, lambda f: 0.9 if "a1" in f else (1.0 if f != "all" else 0.95))
    assert floats == {"a1", "a2"}
    assert [r["kept_float"] for r in info["regions"]] == [True, False]
    assert "reason" not in info and info["ratio"] < 0.97


def test_latency_keeps_everything_float_when_the_model_is_not_measurably_faster(monkeypatch):
    """A quantized model that only ties with float (0.9 vs 0.91: inside the 3% noise margin) buys no time for the
    accuracy it costs: every layer is kept float, with the reason."""
    floats, info = _timed_search(monkeypatch, lambda f: 0.91 if f == "all" else (
        1.0 if "a1" in f.split(",") and f != "a1,a2,b1,b2" else 0.9))
    assert floats == set(LAYERS)
    assert info["regions"][-1].get("whole_model") and "not measurably faster" in info["reason"]


def test_report_lifts_the_decisions(tmp_path):
    acc = {"metric": "output_sqnr", "target": 35.0, "max_float_fraction": 0.5, "samples": 8}
    art = qcompile.compile(_model(), calib=_calib(), recipe=_recipe(accuracy=acc), out_dir=tmp_path,
                           measure_latency=False)
    assert art.report["mixed_precision"]["float_layers"] == ["mm_outlier"]
    page = (tmp_path / "report.html").read_text()
    assert "Mixed precision" in page and "mm_outlier" in page and "Sensitivity" in page


def test_recurrent_state_outputs_are_told_apart():
    """silero-vad's form: state [2, N, 128] in, stateN [?, N, ?] out is state; output [N, 1] is not."""
    m = helpers.make([helper.make_node("Identity", ["state"], ["stateN"]),
                      helper.make_node("ReduceMax", ["x"], ["output"], axes=[1], keepdims=1)],
                     [helpers.vi("x", ["N", 512]), helpers.vi("state", [2, "N", 128])],
                     [helpers.vi("output", ["N", 1]), helpers.vi("stateN", ["a", "N", "b"])], [])
    assert mixed_precision.state_outputs(m) == {"stateN"}


def test_margin_counts_a_nearly_erased_lead_as_a_disagreement():
    ref = np.array([[0.1, 0.9, 0.0], [0.5, 0.4, 0.1]])
    out = np.array([[0.25, 0.75, 0.0], [0.42, 0.41, 0.17]])  # same argmax; the second row lost 90% of its lead
    assert mixed_precision._keeps_top1(ref, out, 0.0).tolist() == [True, True]
    assert mixed_precision._keeps_top1(ref, out, 0.5).tolist() == [True, False]
