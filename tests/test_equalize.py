"""Cross-layer equalization: fp32-exact (numerics instrument), even channel ranges after it, better w8a8, declines."""
import numpy as np
import pytest
from onnx import helper

import qcompile
from qcompile import ir
from qcompile.errors import ConfigError
from qcompile.instruments import CheckerInstrument, NumericsInstrument
from qcompile.pass_infra import PassContext, PassManager
from qcompile.passes.equalize import EqualizeConfig, EqualizePass
from qcompile.recipe import Recipe, load_recipe

import helpers

C = 16


def _consumer_weight(gain: np.ndarray, groups: int) -> np.ndarray:
    """Weights that undo the producer's per-channel gain (as trained networks with folded BatchNorm do): the small
    channels matter downstream as much as the large ones."""
    w = helpers.rand(C, C // groups, 3, 3, scale=0.3)
    per_in = (1.0 / gain).reshape(groups, C // groups)
    return (w * np.repeat(per_in, C // groups, axis=0)[:, :, None, None] / 10.0).astype(np.float32)


def _model(between: str = "Relu", consumer_groups: int = C, extra_output: bool = False):
    """Conv (output channels 100x apart in range) -> `between` -> Conv(group=consumer_groups) -> Relu -> Conv 1x1."""
    rng = np.random.default_rng(7)
    gain = (10.0 ** rng.uniform(-2.0, 0.0, C)).astype(np.float32)
    w1 = helpers.rand(C, 3, 3, 3, scale=0.5) * gain[:, None, None, None]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="p", pads=[1, 1, 1, 1])]
    t = "c1"
    if between:
        attrs = {"kernel_shape": [1, 1]} if between == "MaxPool" else {}
        nodes.append(helper.make_node(between, ["c1"], ["a1"], name="act", **attrs))
        t = "a1"
    nodes += [helper.make_node("Conv", [t, "w2"], ["c2"], name="c", pads=[1, 1, 1, 1], group=consumer_groups),
              helper.make_node("Relu", ["c2"], ["a2"], name="act2"),
              helper.make_node("Conv", ["a2", "w3"], ["y"], name="head")]
    inits = [helpers.init("w1", w1), helpers.init("b1", gain * 0.1),
             helpers.init("w2", _consumer_weight(gain, consumer_groups)),
             helpers.init("w3", helpers.rand(4, C, 1, 1, scale=0.3))]
    outputs = [helpers.vi("y", [1, 4, 8, 8])] + ([helpers.vi(t, [1, C, 8, 8])] if extra_output else [])
    return helpers.make(nodes, [helpers.vi("x", [1, 3, 8, 8])], outputs, inits)


def _run(model, cfg=None):
    ctx = PassContext(model=model, samples=[{"x": helpers.rand(1, 3, 8, 8)} for _ in range(6)])
    p = EqualizePass(cfg or EqualizeConfig())
    graph = PassManager([p], [CheckerInstrument(), NumericsInstrument()]).run(ir.to_graph(model), ctx)
    return ir.to_model(graph, model), ctx.records[0]


@pytest.mark.parametrize("between,groups", [("Relu", C), ("", C), ("LeakyRelu", 1), ("MaxPool", 4)])
def test_equalizes_exactly(between, groups):
    out, rec = _run(_model(between, groups))
    assert rec["modified"] and "p" in rec["stats"]["producers"]
    assert rec["numerics"]["checked"]  # the instrument raised if the rewrite were not fp32-exact
    p = next(n for n in out.graph.node if n.name == "p")
    assert p.input[1] != "w1"  # the producer's rows were rescaled
    before, after = rec["stats"]["channel_spread_before"], rec["stats"]["channel_spread_after"]
    assert after < before
    if groups == C and rec["stats"]["equalized"] == 1:  # depthwise consumer: alpha = 1, ranges made equal
        assert after < 1.05


def test_declines_with_reasons():
    _, rec = _run(_model("Relu", C, extra_output=True))
    assert "p" not in rec["stats"]["producers"]
    assert any(d["node"] == "p" and "graph output" in d["reason"] for d in rec["declined"])
    _, rec = _run(_model("Sigmoid", C))  # not homogeneous: not a candidate at all
    assert "p" not in rec["stats"]["producers"] and not any(d["node"] == "p" for d in rec["declined"])
    _, rec = _run(_model(), EqualizeConfig(overrides={"c": {"equalize": False}}))
    assert "p" not in rec["stats"]["producers"] and any("override" in d["reason"] for d in rec["declined"])
    with pytest.raises(ConfigError):
        EqualizeConfig.from_dict({"alpha": 2.0}, "equalize")
    with pytest.raises(ConfigError):
        EqualizeConfig.from_dict({"bogus": 1}, "equalize")


def test_w8a8_gains_from_it(tmp_path):
    m = _model("Relu", C)
    calib = {"x": helpers.rand(16, 3, 8, 8)}
    plain = qcompile.compile(m, calib=calib, recipe="w8a8", out_dir=tmp_path / "a", measure_latency=False)
    rec = load_recipe("w8a8").to_dict()
    rec["name"], rec["passes"] = "w8a8-noeq", [p for p in rec["passes"] if p != "equalize"]
    without = qcompile.compile(m, calib=calib, recipe=Recipe.from_dict(rec), out_dir=tmp_path / "b",
                               measure_latency=False)
    assert any(p["pass"] == "equalize" and p["modified"] for p in plain.report["passes"])
    assert plain.report["outputs"]["y"]["sqnr_db"] > without.report["outputs"]["y"]["sqnr_db"] + 3
