"""Zoo decoder `llama-bytes` / `llama-bytes-dyn`: cached and deterministic build, ORT == torch, a language model far
better than the unigram baseline on held-out stdlib files, the dynamic export agrees with the fixed one, the "lm"
metrics, and w8a8 through qcompile.

The first run trains the model into the zoo cache (a few CPU minutes); later runs reuse it.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

import qcompile_zoo as zoo
import torch
from qcompile_zoo import decoder
from qcompile_zoo._common import deterministic


def load_npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as data:
        return {k: data[k] for k in data.files}


def run_ort(model: Path, ids: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    return sess.run(["logits"], {"input_ids": ids})[0]


def load_torch(cache_dir: Path) -> torch.nn.Module:
    with np.load(decoder.weights_path(cache_dir)) as w:
        state = {k: torch.from_numpy(w[k]) for k in w.files}
    model = decoder.ByteLlama()
    model.load_state_dict(state)
    return model.eval()


@pytest.fixture(scope="module")
def fixed() -> zoo.ZooEntry:
    return zoo.build("llama-bytes")


@pytest.fixture(scope="module")
def dyn() -> zoo.ZooEntry:
    return zoo.build("llama-bytes-dyn")


@pytest.fixture(scope="module")
def test_ids(fixed: zoo.ZooEntry) -> np.ndarray:
    return load_npz(fixed.test)["input_ids"]


@pytest.fixture(scope="module")
def fp32_logits(fixed: zoo.ZooEntry, test_ids: np.ndarray) -> np.ndarray:
    return run_ort(fixed.model, test_ids)


# ----------------------------------------------------------------------------------------------- build


def test_registered_as_lm(fixed: zoo.ZooEntry, dyn: zoo.ZooEntry) -> None:
    assert {"llama-bytes", "llama-bytes-dyn"} <= set(zoo.names())
    assert fixed.task == dyn.task == "lm" and "lm" in zoo.TASKS
    assert fixed.labels is None and dyn.labels is None
    assert "[lm]" in zoo.describe("llama-bytes-dyn")


def test_build_is_cached(fixed: zoo.ZooEntry, dyn: zoo.ZooEntry) -> None:
    paths = [fixed.model, fixed.calib, fixed.test, decoder.weights_path(fixed.model.parent), dyn.model, dyn.calib,
             dyn.test]
    before = [p.stat().st_mtime_ns for p in paths]
    assert zoo.build("llama-bytes-dyn") == dyn and zoo.build("llama-bytes") == fixed
    assert [p.stat().st_mtime_ns for p in paths] == before


def test_data_is_deterministic_and_split_by_file(fixed: zoo.ZooEntry, dyn: zoo.ZooEntry) -> None:
    """The windows are a function of the stdlib files and the seed; the test windows come from held-out files only
    (each one occurs in the held-out text and the dyn entry has the very same arrays)."""
    train_files, held_files = decoder.stdlib_files()
    assert not set(train_files) & set(held_files)
    train_text, held_text = decoder.corpus_bytes(train_files), decoder.corpus_bytes(held_files)
    rng = np.random.default_rng(decoder.SEED)
    calib = decoder.windows(train_text, decoder.CALIB, decoder.SEQ, rng)
    test = decoder.windows(held_text, decoder.TEST, decoder.SEQ, rng)
    got_calib, got_test = load_npz(fixed.calib)["input_ids"], load_npz(fixed.test)["input_ids"]
    assert got_calib.shape == (32, 128) and got_test.shape == (64, 128) and got_test.dtype == np.int64
    np.testing.assert_array_equal(got_calib, calib)
    np.testing.assert_array_equal(got_test, test)
    np.testing.assert_array_equal(load_npz(dyn.calib)["input_ids"], calib)
    np.testing.assert_array_equal(load_npz(dyn.test)["input_ids"], test)
    held = held_text.tobytes()
    assert all(bytes(w.astype(np.uint8)) in held for w in test[:8])


def test_training_is_deterministic() -> None:
    """Two short trainings under the same seed give bit-identical weights (the full build trains the same way)."""
    train_text = decoder.corpus_bytes(decoder.stdlib_files()[0][:20])
    states = []
    for _ in range(2):
        with deterministic(decoder.SEED):
            model = decoder.ByteLlama()
            decoder.train(model, train_text, steps=2, seed=decoder.SEED + 1)
            states.append({k: v.clone() for k, v in model.state_dict().items()})
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_export_is_deterministic_from_the_saved_weights(fixed: zoo.ZooEntry) -> None:
    """Exporting the saved weights again gives the cached ONNX byte for byte (so weights file and model agree)."""
    model = load_torch(fixed.model.parent)
    test = load_npz(fixed.test)["input_ids"]
    with deterministic(decoder.SEED):
        again = decoder._export(model, test[:2], dynamic_seq=False)
    assert again == fixed.model.read_bytes()


def test_ort_matches_torch(fixed: zoo.ZooEntry, dyn: zoo.ZooEntry, test_ids: np.ndarray, fp32_logits) -> None:
    for e in (fixed, dyn):
        assert zoo.build_info(e)["ort_max_abs_diff"] <= 1e-3  # checked on the whole test set at build
    with torch.no_grad():
        ref = load_torch(fixed.model.parent)(torch.from_numpy(test_ids[:8])).numpy()
    assert fp32_logits.shape == (64, 128, 256) and fp32_logits.dtype == np.float32
    np.testing.assert_allclose(fp32_logits[:8], ref, rtol=1e-4, atol=1e-4)


def test_graph_is_a_decomposed_llama(fixed: zoo.ZooEntry) -> None:
    model = onnx.load(str(fixed.model))
    ops = [n.op_type for n in model.graph.node]
    assert "LayerNormalization" not in ops and "SimplifiedLayerNormalization" not in ops
    assert ops.count("ReduceMean") == 2 * decoder.DEPTH + 1 and ops.count("Softmax") == decoder.DEPTH
    assert ops.count("Sigmoid") == decoder.DEPTH  # SiLU = x * Sigmoid(x)
    assert ops.count("MatMul") == 7 * decoder.DEPTH + 2 * decoder.DEPTH + 1  # 7 linears, QK^T, PV per block + head
    assert [i.name for i in model.graph.input] == ["input_ids"] and [o.name for o in model.graph.output] == ["logits"]
    dims = [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 128]
    params = zoo.build_info(fixed)["params"]
    assert params == sum(p.numel() for p in decoder.ByteLlama().parameters()) and 5e5 < params < 2e6


# ----------------------------------------------------------------------------------------------- quality


def test_far_better_than_unigram(fixed: zoo.ZooEntry, test_ids: np.ndarray, fp32_logits: np.ndarray) -> None:
    """Unigram baseline: byte frequencies of the training text (add-one), scored on the same held-out next bytes."""
    counts = np.bincount(decoder.corpus_bytes(decoder.stdlib_files()[0]), minlength=256) + 1.0
    logp = np.log(counts / counts.sum())
    unigram = math.exp(-logp[test_ids[:, 1:]].mean())
    m = zoo.lm_metrics({"logits": fp32_logits}, {"logits": fp32_logits}, {"input_ids": test_ids})
    assert 10.0 < unigram < 60.0  # source code: a few bits per byte
    assert m["fp32_perplexity"] < 0.3 * unigram, (m["fp32_perplexity"], unigram)
    assert m["perplexity"] == pytest.approx(zoo.build_info(fixed)["torch_test_perplexity"], rel=1e-3)


def test_dynamic_export_matches_fixed_on_the_prefix(dyn: zoo.ZooEntry, test_ids: np.ndarray, fp32_logits) -> None:
    sess = ort.InferenceSession(str(dyn.model), providers=["CPUExecutionProvider"])
    assert [d for d in sess.get_inputs()[0].shape] == ["batch", "sequence"]
    for batch, length in ((3, 40), (2, 128), (1, 200)):
        ids = np.concatenate([test_ids[:batch], test_ids[:batch, : max(0, length - 128)]], axis=1)[:, :length]
        got = sess.run(None, {"input_ids": ids})[0]
        assert got.shape == (batch, length, 256)
        n = min(length, 128)  # causal: the first n positions only see the first n bytes
        np.testing.assert_allclose(got[:, :n], fp32_logits[:batch, :n], rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------------------------- metrics


def test_lm_metrics_identity_and_corruption(fixed, test_ids: np.ndarray, fp32_logits: np.ndarray) -> None:
    ref, test = {"logits": fp32_logits}, {"input_ids": test_ids}
    same = zoo.lm_metrics(ref, ref, test)
    assert same["ratio"] == 1.0 and same["agreement"] == 1.0
    assert zoo.evaluate("llama-bytes", ref, ref, fixed) == 1.0
    noise = np.random.default_rng(0).normal(scale=2.0, size=fp32_logits.shape).astype(np.float32)
    bad = zoo.lm_metrics({"logits": fp32_logits + noise}, ref, test)
    assert bad["ratio"] > 1.2 and bad["agreement"] < 0.9
    assert zoo.evaluate("llama-bytes", {"logits": fp32_logits + noise}, ref, fixed) == bad["agreement"]
    # uniform logits: perplexity is exactly the vocabulary size
    flat = zoo.lm_metrics({"logits": np.zeros_like(fp32_logits)}, ref, test)
    assert flat["perplexity"] == pytest.approx(256.0, rel=1e-12)
    # a model certain of the right next byte: perplexity 1 (the last position predicts nothing)
    sure = np.full_like(fp32_logits, -1e4)
    np.put_along_axis(sure[:, :-1], test_ids[:, 1:, None], 0.0, axis=-1)
    assert zoo.lm_metrics({"logits": sure}, ref, test)["perplexity"] == pytest.approx(1.0, abs=1e-9)
    with pytest.raises(ValueError):
        zoo.lm_metrics({"logits": fp32_logits[:, :64]}, ref, test)


# ----------------------------------------------------------------------------------------------- qcompile


def test_w8a8_keeps_perplexity(fixed: zoo.ZooEntry, test_ids: np.ndarray, fp32_logits: np.ndarray,
                               tmp_path: Path) -> None:
    """qcompile w8a8 (per-channel int8 weights, uint8 activations, QDQ) on llama-bytes, run in ORT."""
    import qcompile
    from qcompile import numerics

    art = qcompile.compile(str(fixed.model), calib=str(fixed.calib), recipe="w8a8", target="onnxruntime",
                           out_dir=tmp_path / "q", measure_latency=False)
    stats = next(p["stats"] for p in art.report["passes"] if p["pass"] == "insert_qdq")
    assert stats["quantized_nodes"]["MatMul"] >= 7 * decoder.DEPTH + 1  # every linear and the lm_head
    sess = numerics.session(str(art.out_dir / "model.qdq.onnx"), optimize=True)
    q = np.concatenate([numerics.run(sess, {"input_ids": test_ids[i : i + 16]})["logits"] for i in range(0, 64, 16)])
    m = zoo.lm_metrics({"logits": q}, {"logits": fp32_logits}, {"input_ids": test_ids})
    assert m["ratio"] != 1.0 and abs(m["ratio"] - 1.0) < 0.01 and 0.95 < m["agreement"] < 1.0, m
