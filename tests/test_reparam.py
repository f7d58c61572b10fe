"""RepQ-ViT reparameterization: per-channel quantization of a LayerNorm output and the reparameterized per-tensor
quantization give the same integer levels and the same layer outputs, on the zoo transformers."""
import numpy as np
import onnx
import pytest

from qcompile import dataset, ir, numerics
from qcompile.calibrate import augmented_model
from qcompile.pass_infra import PassContext, PassManager
from qcompile.instruments import CheckerInstrument, NumericsInstrument
from qcompile.passes.reparam import ReparamConfig, ReparameterizePass, reparam_params
from qcompile.passes._linear import weight_rows as _weight_rows
from qcompile.match import const_value


def quant(x, s, z, levels):
    return np.clip(np.round(x / s) + z, 0, levels)


def test_reparam_params_identity():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2000, 48)) * rng.uniform(0.1, 5, 48) + rng.uniform(-2, 2, 48)
    lo, hi = np.minimum(x.min(0), 0), np.maximum(x.max(0), 0)
    for bits in (4, 6, 8):
        levels = 2 ** bits - 1
        s, z, st, zt = reparam_params(lo, hi, bits)
        r1, r2 = s / st, z - zt
        xp = x / r1 + st * r2
        q_pc, q_pt = quant(x, s, z, levels), quant(xp, st, zt, levels)
        assert np.mean(q_pc == q_pt) > 0.9999  # only exact rounding ties may differ
        w = rng.standard_normal((48, 16))
        y_pc = ((q_pc - z) * s) @ w
        y_pt = ((q_pt - zt) * st) @ (w * r1[:, None]) - (s * r2) @ w  # W' = r1 W, b' = b - (s r2) W with b = 0
        assert np.allclose(y_pc[(q_pc == q_pt).all(1)], y_pt[(q_pc == q_pt).all(1)], atol=1e-9)


zoo = pytest.importorskip("qcompile_zoo")


@pytest.mark.parametrize("name,ranges", [("vit-digits", "minmax"), ("vit-digits", "dual_clip"), ("minilm", "mse")])
def test_per_channel_equals_reparameterized_per_tensor(name, ranges):
    e = zoo.build(name)
    model = onnx.shape_inference.infer_shapes(ir.load_model(e.model))
    samples = dataset.load_samples(model, e.calib, max_samples=4)
    ctx = PassContext(model=model, samples=samples)
    cfg = ReparamConfig(bits=6, ranges=ranges, clip_steps=30)
    g = PassManager([ReparameterizePass(cfg)], [CheckerInstrument(), NumericsInstrument()]).run(
        ir.to_graph(model), ctx)
    rec = ctx.records[0]
    assert rec["modified"] and rec["numerics"]["sqnr_db"] > 90  # float graph unchanged up to cancellation
    orig = ir.to_graph(model)
    levels = 63
    for x_name, info in list(rec["stats"]["tensors"].items())[:3]:
        lo, hi = np.array(info["clip_lo"]), np.array(info["clip_hi"])
        s, z, st, zt = reparam_params(lo, hi, 6)
        hint = ctx.qparam_hints[info["hinted_tensor"]]
        assert float(hint.scale) == pytest.approx(st) and int(hint.zero_point) == zt
        x = _values(orig, model, x_name, samples[0])
        xp = _values(g, model, info["hinted_tensor"], samples[0])
        q_pc, q_pt = quant(x, s, z, levels), quant(xp, st, zt, levels)
        assert np.mean(q_pc == q_pt) > 0.999
        for node_name in info["consumers"]:
            n0 = next(n for n in orig.nodes if n.name == node_name)
            n1 = next(n for n in g.nodes if n.name == node_name)
            y0 = ((q_pc - z) * s) @ _weight_rows(n0).astype(np.float64) + _bias(n0)
            y1 = ((q_pt - zt) * st) @ _weight_rows(n1).astype(np.float64) + _bias(n1)
            same = (q_pc == q_pt).all(axis=1)
            rel = np.abs(y0[same] - y1[same]).max() / np.abs(y0).max()
            assert rel < 1e-4, (x_name, node_name, rel)


def _values(graph, header, name, feeds):
    sess = numerics.session(augmented_model(graph, header, [name]))
    v = numerics.run(sess, feeds, [name])[name]
    return np.asarray(v, np.float64).reshape(-1, v.shape[-1])


def _bias(node):
    if node.op == "Gemm" and len(node.inputs) > 2:
        return const_value(node.inputs[2]).astype(np.float64) * float(node.attrs.get("beta", 1.0))
    y = node.outputs[0]
    total = 0.0
    while len(y.outputs) == 1 and y.outputs[0].op == "Add":
        add = y.outputs[0]
        c = next((const_value(t) for t in add.inputs if const_value(t) is not None), None)
        if c is None:
            break
        total = total + c.astype(np.float64)
        y = add.outputs[0]
    return total


def test_w6a6_repq_on_vit_uses_hints_and_stays_within_a_point(tmp_path):
    import qcompile

    e = zoo.build("vit-digits")
    art = qcompile.compile(str(e.model), calib=str(e.calib), recipe="w6a6-repq", out_dir=tmp_path,
                           measure_latency=False)
    recs = {r["pass"]: r for r in art.report["passes"]}
    assert recs["reparameterize"]["stats"]["reparameterized"] >= 16  # LN outputs and GELU outputs of 4 blocks
    hints = recs["insert_qdq"]["stats"]["hints_used"]
    assert hints["activation"] >= 16 and hints["weight"] >= 16
    model = onnx.load(str(e.model), load_external_data=False)
    samples = dataset.load_samples(model, e.test, "test")
    ref_s, q_s = numerics.session(str(e.model)), numerics.session(str(tmp_path / "model.qdq.onnx"), optimize=True)
    ref = {"logits": np.concatenate([numerics.run(ref_s, s)["logits"] for s in samples])}
    out = {"logits": np.concatenate([numerics.run(q_s, s)["logits"] for s in samples])}
    assert zoo.evaluate("vit-digits", out, ref, e) >= zoo.evaluate("vit-digits", ref, ref, e) - 0.01
