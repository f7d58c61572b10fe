"""End to end on the model zoo: every equivalence pass fp32-exact on every zoo model (numerics instrument),
task accuracy of w8a8 on the digits CNN, byte-identical output."""
import numpy as np
import onnx
import pytest

import qcompile
from qcompile import dataset, numerics
from qcompile.recipe import EQUIVALENCE

zoo = pytest.importorskip("qcompile_zoo")


@pytest.mark.parametrize("name", zoo.names())
def test_equivalence_passes_fp32_exact(name, tmp_path):
    e = zoo.build(name)
    art = qcompile.compile(str(e.model), calib=str(e.calib), recipe="fp32", out_dir=tmp_path, max_samples=2,
                           measure_latency=False)
    recs = {r["pass"]: r for r in art.report["passes"]}
    assert set(recs) == set(EQUIVALENCE)
    for r in recs.values():  # the instrument raises NumericsError beyond rtol 1e-5 / atol 1e-6 (scaled)
        if r["modified"]:
            assert r["numerics"]["checked"] and r["numerics"]["samples"] == 2
        else:  # handed on as it came (the suite verifies the claim byte for byte): nothing to run
            assert r["numerics"] == {"checked": True, "unchanged": True}
    if name in ("digits-cnn", "resnet-digits", "mobilenetv2-digits", "resnet18-224"):
        assert recs["fold_batchnorm"]["stats"]["folded"] > 0
        ops = {n.op_type for n in onnx.load(str(art.out_dir / "model.qdq.onnx")).graph.node}
        assert "BatchNormalization" not in ops


def _outputs(model_path, samples):
    sess = numerics.session(str(model_path), optimize=True)
    outs = [numerics.run(sess, s) for s in samples]
    return {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}


def test_digits_cnn_w8a8_accuracy_and_determinism(tmp_path):
    e = zoo.build("digits-cnn")
    a = qcompile.compile(str(e.model), calib=str(e.calib), recipe="w8a8", out_dir=tmp_path / "a",
                         measure_latency=False)
    b = qcompile.compile(str(e.model), calib=str(e.calib), recipe="w8a8", out_dir=tmp_path / "b",
                         measure_latency=False)
    assert (a.out_dir / "model.qdq.onnx").read_bytes() == (b.out_dir / "model.qdq.onnx").read_bytes()
    samples = dataset.load_samples(onnx.load(str(e.model)), e.test, "test")
    ref = _outputs(e.model, samples)
    q = _outputs(a.out_dir / "model.qdq.onnx", samples)
    acc_fp32 = zoo.evaluate("digits-cnn", ref, ref, e)
    acc_q = zoo.evaluate("digits-cnn", q, ref, e)
    assert acc_fp32 > 0.95
    assert acc_q >= acc_fp32 - 0.005


def test_noise_floor_does_not_hide_a_small_real_error():
    """On ResNet-18 the fixed bound is at fp32 noise, so the instrument uses the model's noise floor; a weight
    scaled by 1 + 1e-4 is still caught."""
    from qcompile import ir
    from qcompile.errors import NumericsError
    from qcompile.instruments import NumericsInstrument
    from qcompile.pass_infra import PassBase, PassContext, PassManager, PassResult
    from qcompile.types import PassKind

    class Nudge(PassBase):
        name = "nudge"
        kind = PassKind.EQUIVALENCE

        def call(self, graph, ctx):
            conv = next(n for n in graph.nodes if n.op == "Conv")
            conv.inputs[1].values = conv.inputs[1].values * np.float32(1 + 1e-4)
            return PassResult(graph, True)

    e = zoo.build("resnet18-224")
    model = ir.load_model(e.model)
    ctx = PassContext(model=model, samples=dataset.load_samples(model, e.calib, max_samples=2))
    with pytest.raises(NumericsError, match="noise floor"):
        PassManager([Nudge()], [NumericsInstrument()]).run(ir.to_graph(model), ctx)
