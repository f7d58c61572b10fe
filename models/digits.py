"""scikit-learn's 8x8 digits: a fixed seeded split, optionally upsampled (bilinear) for the bigger CNNs / ViT."""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from ._common import Artifacts, check_ort, deterministic, export_onnx, predict, train_classifier

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

SPLIT_SEED = 20240601
N_TRAIN = 1297  # of 1797; the other 500 are held out
N_CALIB = 128  # calibration = the first 128 (shuffled) training images


@dataclass(frozen=True)
class DigitsSplit:
    x_train: np.ndarray  # float32 [1297, 1, S, S] in [0, 1]
    y_train: np.ndarray  # int64 [1297]
    x_test: np.ndarray  # float32 [500, 1, S, S]
    y_test: np.ndarray  # int64 [500]

    @property
    def x_calib(self) -> np.ndarray:
        return self.x_train[:N_CALIB]


@functools.lru_cache(maxsize=None)
def _base() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    data = load_digits()
    x = (data.images.astype(np.float32) / 16.0)[:, None, :, :]
    y = data.target.astype(np.int64)
    perm = np.random.default_rng(SPLIT_SEED).permutation(len(x))
    return x[perm], y[perm]


def _resize(x: np.ndarray, size: int) -> np.ndarray:
    import torch

    if size == x.shape[-1]:
        return x
    with torch.no_grad():
        out = torch.nn.functional.interpolate(
            torch.from_numpy(x), size=(size, size), mode="bilinear", align_corners=False
        )
    return np.ascontiguousarray(out.numpy().clip(0.0, 1.0), dtype=np.float32)


def load_split(size: int = 8) -> DigitsSplit:
    """The digits at `size` x `size` (8 = native), split 1297 train / 500 held-out with a fixed seed."""
    x, y = _base()
    x = _resize(x, size)
    logger.debug("digits %dx%d: %d train / %d test", size, size, N_TRAIN, len(x) - N_TRAIN)
    return DigitsSplit(
        x_train=x[:N_TRAIN].copy(), y_train=y[:N_TRAIN].copy(), x_test=x[N_TRAIN:].copy(), y_test=y[N_TRAIN:].copy()
    )


def build_classifier(
    make_model: Callable[[], "torch.nn.Module"],
    *,
    size: int,
    seed: int,
    keep_batchnorm: bool,
    min_accuracy: float,
    **train_kwargs: Any,
) -> Artifacts:
    """Train `make_model()` on the digits at `size`, export it (opset 17, dynamic batch), check it, package it."""
    import torch

    split = load_split(size)
    with deterministic(seed):
        model = make_model()
        train_classifier(model, split.x_train, split.y_train, seed=seed, **train_kwargs)
        torch_acc = float((predict(model, split.x_test).argmax(1) == split.y_test).mean())
        logger.info("%s torch fp32 test top-1 %.4f", type(model).__name__, torch_acc)
        if torch_acc < min_accuracy:
            raise RuntimeError(f"{type(model).__name__} reached only {torch_acc:.4f} < {min_accuracy} test top-1")
        onnx_bytes = export_onnx(
            model,
            (torch.from_numpy(split.x_calib[:2]),),
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            opset=17,
            keep_batchnorm=keep_batchnorm,
        )
        diff = check_ort(onnx_bytes, model, {"input": split.x_test}, atol=1e-3)
    return Artifacts(
        onnx=onnx_bytes,
        calib={"input": split.x_calib},
        test={"input": split.x_test},
        labels=split.y_test,
        info={"torch_top1": torch_acc, "ort_max_abs_diff": diff},
    )
