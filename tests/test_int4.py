"""Weight-only int4 block weights (w4a16): the block quantizer against numpy, the opset-21 QDQ model and
MatMulNBits in ONNX Runtime against a numpy dequantized matmul, file size, GPTQ on the block grid, recipes, config
errors, and the integer lowering (TVM targets, reference) declining with one clear error."""
import subprocess
import sys

import helpers
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from qcompile import ir, quant_math
from qcompile.dataset import split_samples
from qcompile.errors import ConfigError, ModelError
from qcompile.lowering import lower
from qcompile.pass_infra import PassContext
from qcompile.passes._weight_only import matmulnbits_inputs
from qcompile.passes.insert_qdq import InsertQDQPass, QDQConfig
from qcompile.passes.reconstruct import ReconstructConfig, ReconstructWeightsPass
from qcompile.recipe import Recipe, builtin_recipes
from qcompile.types import QuantDType


def w4(**kw) -> QDQConfig:
    return QDQConfig.from_dict({"weight_only": True, "weight_bits": 4, "weight_granularity": "per_block", **kw})


def matmul_model(k: int, n: int, seed: int = 0, gemm_trans: bool = False) -> tuple[onnx.ModelProto, np.ndarray]:
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n, k) if gemm_trans else (k, n)).astype(np.float32)
    node = (helper.make_node("Gemm", ["x", "w"], ["y"], name="fc", transB=1) if gemm_trans else
            helper.make_node("MatMul", ["x", "w"], ["y"], name="fc"))
    m = helpers.make([node], [helpers.vi("x", ["B", k])], [helpers.vi("y", ["B", n])], [helpers.init("w", w)])
    return m, w


def quantize(model: onnx.ModelProto, cfg: QDQConfig, ctx: PassContext | None = None):
    ctx = ctx or PassContext(model=model)
    res = InsertQDQPass(cfg)(ir.to_graph(model), ctx)
    out = ir.to_model(res.graph, model)
    onnx.checker.check_model(out)
    return out, res


def ort_run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    s = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return s.run(None, {"x": x})[0]


def close_fp32(ref: np.ndarray, got: np.ndarray) -> None:
    """fp32 agreement: rtol 1e-5 / atol 1e-6 scaled to the tensor (house tolerance)."""
    scale = float(np.abs(ref).max())
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6 * max(scale, 1.0) * np.sqrt(ref.shape[-1]))


@pytest.mark.parametrize("k", [64, 80])
def test_block_quantizer_matches_numpy(k):
    rng = np.random.default_rng(1)
    w = rng.standard_normal((k, 6)).astype(np.float32)
    w[3, 2] = 9.0  # an outlier: only its own block's scale grows
    qp = quant_math.block_qparams(w, 0, 32, QuantDType.INT8, True, 4)
    nb = -(-k // 32)
    assert qp.scale.shape == (nb, 6) and qp.block_size == 32 and qp.axis == 0
    for b in range(nb):  # a partial last block (k = 80: rows 64..79) takes its own max
        np.testing.assert_allclose(qp.scale[b], np.abs(w[32 * b: 32 * (b + 1)]).max(axis=0) / 7, rtol=1e-6)
    assert qp.scale[0, 2] == pytest.approx(9.0 / 7) and qp.scale[1, 2] < 0.7
    q = quant_math.quantize_weight(w, qp, QuantDType.INT8, True, 4)
    assert q.dtype == np.int8 and q.min() >= -7 and q.max() <= 7
    s_full = np.repeat(qp.scale, 32, axis=0)[:k]
    np.testing.assert_array_equal(q, np.clip(np.rint(w / s_full), -7, 7))
    assert np.all(np.abs(quant_math.dequantize(q, qp) - w) <= s_full / 2 + 1e-6)
    # asymmetric: uint4 [0, 15] with per-block zero points
    qa = quant_math.block_qparams(w, 0, 32, QuantDType.UINT8, False, 4)
    q2 = quant_math.quantize_weight(w, qa, QuantDType.UINT8, False, 4)
    assert q2.min() >= 0 and q2.max() <= 15 and qa.zero_point.dtype == np.uint8
    assert np.all(np.abs(quant_math.dequantize(q2, qa) - w) <= np.repeat(qa.scale, 32, axis=0)[:k] / 2 + 1e-6)


@pytest.mark.parametrize("k,block,sym", [(64, 32, True), (80, 32, True), (96, 64, False), (128, 128, True)])
def test_qdq_model_runs_in_ort_and_equals_numpy(k, block, sym):
    m, w = matmul_model(k, 24)
    cfg = w4(weight_block=block, weight_symmetric=sym, weight_dtype="int8" if sym else "uint8")
    out, res = quantize(m, cfg)
    assert ir.default_opset(out) == 21
    dq = next(n for n in out.graph.node if n.op_type == "DequantizeLinear")
    attrs = {a.name: helper.get_attribute_value(a) for a in dq.attribute}
    assert attrs == {"axis": 0, "block_size": block}
    init = {i.name: i for i in out.graph.initializer}
    assert init[dq.input[0]].data_type == (TensorProto.INT4 if sym else TensorProto.UINT4)
    assert len(dq.input) == (2 if sym else 3)  # symmetric: zero point 0 by default
    assert [n.op_type for n in out.graph.node] == ["DequantizeLinear", "MatMul"]  # activations stay float
    x = np.random.default_rng(2).standard_normal((5, k)).astype(np.float32)
    dtype = QuantDType.INT8 if sym else QuantDType.UINT8
    qp = quant_math.block_qparams(w, 0, block, dtype, sym, 4)
    ref = x @ quant_math.dequantize(quant_math.quantize_weight(w, qp, dtype, sym, 4), qp)
    got = ort_run(out, x)
    close_fp32(ref, got)
    assert not np.allclose(got, x @ w, rtol=1e-3)  # it is quantized
    assert res.stats["quantized_nodes"] == {"MatMul": 1} and res.stats["weight_block"] == block


def test_gemm_trans_b_blocks_along_its_k_axis():
    m, w = matmul_model(72, 16, gemm_trans=True)
    out, _ = quantize(m, w4(weight_block=32))
    dq = next(n for n in out.graph.node if n.op_type == "DequantizeLinear")
    assert {a.name: helper.get_attribute_value(a) for a in dq.attribute} == {"axis": 1, "block_size": 32}
    x = np.random.default_rng(3).standard_normal((4, 72)).astype(np.float32)
    qp = quant_math.block_qparams(w, 1, 32, QuantDType.INT8, True, 4)
    close_fp32(x @ quant_math.dequantize(quant_math.quantize_weight(w, qp, QuantDType.INT8, True, 4), qp).T,
               ort_run(out, x))


def test_file_shrinks_below_0_3x():
    m, _ = matmul_model(512, 512)
    out, res = quantize(m, w4(weight_block=32))
    assert res.stats["weight_bytes_quantized"] < 0.3 * res.stats["weight_bytes_fp32"]
    assert len(out.SerializeToString()) < 0.3 * len(m.SerializeToString())


@pytest.mark.parametrize("k,sym", [(128, True), (80, True), (96, False)])
def test_matmulnbits_equals_qdq(k, sym):
    m, _ = matmul_model(k, 40, seed=4)
    kw = {"weight_block": 32, "weight_symmetric": sym, "weight_dtype": "int8" if sym else "uint8"}
    qdq, _ = quantize(m, w4(**kw))
    nbits, res = quantize(m, w4(weight_format="matmulnbits", **kw))
    assert [n.op_type for n in nbits.graph.node] == ["MatMulNBits"] and res.stats["inserted"] == {"MatMulNBits": 1}
    assert any(o.domain == "com.microsoft" for o in nbits.opset_import)
    x = np.random.default_rng(5).standard_normal((6, k)).astype(np.float32)
    close_fp32(ort_run(qdq, x), ort_run(nbits, x))


def test_matmulnbits_packing_layout():
    q = np.arange(-7, 8, dtype=np.int8).repeat(4)[:40].reshape(40, 1)  # K = 40: one full block of 32, one partial
    qp = quant_math.QParams(np.array([[0.5], [2.0]], np.float32), np.zeros((2, 1), np.int8), 0, 32)
    b, scales, zps = matmulnbits_inputs(q, qp)
    assert b.shape == (1, 2, 16) and zps is None and scales.tolist() == [0.5, 2.0]
    u = np.concatenate([q[:, 0] + 8, np.full(24, 8)]).astype(np.uint8)  # padded with the zero point
    np.testing.assert_array_equal(b.reshape(-1), u[0::2] | (u[1::2] << 4))


def test_conv_per_block_falls_back_to_per_channel_with_a_reason():
    nodes = [helper.make_node("Conv", ["x", "w"], ["y"], name="conv")]
    m = helpers.make(nodes, [helpers.vi("x", [1, 4, 6, 6])], [helpers.vi("y", [1, 8, 4, 4])],
                     [helpers.init("w", helpers.rand(8, 4, 3, 3))])
    out, res = quantize(m, w4())
    assert any("quantized per output channel instead" in d.reason for d in res.declined)
    dq = next(n for n in out.graph.node if n.op_type == "DequantizeLinear")
    assert {a.name: helper.get_attribute_value(a) for a in dq.attribute} == {"axis": 0}


def test_override_and_activation_matmul_declined():
    m, _ = matmul_model(32, 8)
    _, res = quantize(m, w4(overrides={"fc": {"quantize": False}}))
    assert res.modified is False and any(d.reason == "excluded by override" for d in res.declined)
    aa = helpers.make([helper.make_node("MatMul", ["a", "b"], ["y"], name="attn")],
                      [helpers.vi("a", [2, 4, 8]), helpers.vi("b", [2, 8, 4])], [helpers.vi("y", [2, 4, 4])], [])
    _, res = quantize(aa, w4())
    assert res.modified is False and any("weight is not constant" in d.reason for d in res.declined)


@pytest.mark.parametrize("bad,msg", [
    ({"weight_only": True, "weight_granularity": "per_block", "weight_bits": 4, "weight_blok": 32}, "unknown key"),
    ({"weight_granularity": "per_block", "weight_bits": 4}, "needs weight_only"),
    ({"weight_only": True, "weight_granularity": "per_block", "weight_bits": 4, "weight_block": 48}, "weight_block"),
    ({"weight_only": True, "weight_granularity": "per_block", "weight_bits": 8}, "<= 4"),
    ({"weight_only": True, "weight_format": "matmulnbits"}, "matmulnbits needs"),
    ({"weight_only": True, "weight_format": "nbits"}, "not one of"),
])
def test_config_errors(bad, msg):
    with pytest.raises(ConfigError, match=msg):
        QDQConfig.from_dict(bad, "insert_qdq")


@pytest.mark.parametrize("sym", [True, False])
def test_gptq_on_block_grid_beats_rtn_and_is_used_as_is(sym):
    rng = np.random.default_rng(6)
    k, n = 64, 32
    mix = rng.standard_normal((k, k)) * np.exp(-np.arange(k) / 4.0)[:, None] + 0.05 * np.eye(k)
    data = (rng.standard_normal((256, k)) @ mix).astype(np.float32)
    m, w = matmul_model(k, n, seed=7)
    w = w + np.float32(0.5) * (not sym)  # off-centre weights: the asymmetric grid's zero points are not all 8
    model = ir.normalize(helpers.make(list(m.graph.node), list(m.graph.input), list(m.graph.output),
                                      [helpers.init("w", w)]))
    ctx = PassContext(model=model, samples=split_samples(model, {"x": data[:192]}))
    res = ReconstructWeightsPass(ReconstructConfig(bits=4, weight_block=32, symmetric=sym))(ir.to_graph(model), ctx)
    q, qp = ctx.weight_hints["w"]
    dtype = QuantDType.INT8 if sym else QuantDType.UINT8
    lo, hi = (-7, 7) if sym else (0, 15)
    assert qp.block_size == 32 and qp.axis == 0 and qp.scale.shape == (2, n) and q.min() >= lo and q.max() <= hi
    assert q.dtype == dtype.numpy and np.asarray(qp.zero_point).dtype == dtype.numpy
    rtn_qp = quant_math.block_qparams(w, 0, 32, dtype, sym, 4)
    np.testing.assert_array_equal(qp.scale, rtn_qp.scale)  # the grid never moves, only the integers
    np.testing.assert_array_equal(qp.zero_point, rtn_qp.zero_point)
    assert sym or len(np.unique(rtn_qp.zero_point)) > 1
    rtn = quant_math.quantize_weight(w, rtn_qp, dtype, sym, 4)
    assert not np.array_equal(q, rtn)
    held = data[192:]
    err = lambda qq: float(np.sum((held @ (w - quant_math.dequantize(qq, qp))) ** 2))
    assert err(q) < 0.8 * err(rtn)
    assert res.stats["layers"][0]["reconstructed_rel_mse"] < res.stats["layers"][0]["rtn_rel_mse"]
    out, qres = quantize(model, w4(weight_block=32, weight_symmetric=sym, weight_dtype=dtype.value), ctx)
    assert qres.stats["hints_used"]["weight"] == 1
    dq = next(nd for nd in out.graph.node if nd.op_type == "DequantizeLinear")
    stored = {i.name: numpy_helper.to_array(i) for i in out.graph.initializer}[dq.input[0]]
    np.testing.assert_array_equal(np.asarray(stored).astype(dtype.numpy), q)
    x = data[192:200]  # ONNX Runtime computes the model with the hinted integers and zero points
    close_fp32(x @ quant_math.dequantize(q, qp), ort_run(out, x))


def test_w4a16_recipes_and_block_mismatch():
    table = builtin_recipes()
    for name in ("w4a16", "w4a16-awq", "w4a16-gptq"):
        cfg = next(p for p in table[name].passes if p.name == "insert_qdq").config
        assert cfg["weight_only"] and cfg["weight_granularity"] == "per_block"
    bad = {"name": "x", "passes": [{"name": "reconstruct_weights", "bits": 4, "weight_block": 64},
                                   {"name": "insert_qdq", "weight_only": True, "weight_bits": 4,
                                    "weight_granularity": "per_block", "weight_block": 32}]}
    with pytest.raises(ConfigError, match="weight_block"):
        Recipe.from_dict(bad)
    bad["passes"][0]["weight_block"] = 32
    bad["passes"][0]["symmetric"] = False  # asymmetric hints into a symmetric insert_qdq
    with pytest.raises(ConfigError, match="reconstruct_weights.symmetric"):
        Recipe.from_dict(bad)


def test_integer_lowering_declines_int4_blocks(tmp_path):
    m, _ = matmul_model(64, 16)
    out, _ = quantize(m, w4())
    with pytest.raises(ModelError, match="weight-only int4 block weights.*--target onnxruntime"):
        lower(out)
    path = tmp_path / "m.onnx"
    onnx.save(m, path)
    np.savez(tmp_path / "c.npz", x=np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32))
    r = subprocess.run([sys.executable, "-m", "qcompile.cli", "compile", str(path), "--calib", str(tmp_path / "c.npz"),
                        "--recipe", "w4a16", "--target", "tvm-x86", "-o", str(tmp_path / "out")],
                       capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode != 0
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "weight-only int4 block weights" in lines[0], r.stderr
