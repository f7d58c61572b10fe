"""Shared helpers of the zoo builders: determinism, deterministic file formats, training, ONNX export + checks."""
from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import random
import tempfile
import time
import warnings
import zipfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

logger = logging.getLogger(__name__)

# Intra-op threads while building. Trained weights (so the ONNX bytes) depend on it: builds are byte-identical only
# at equal thread counts. 1 is far more robust when other processes compete for the 2 cores (libgomp spin-waits
# made 2-thread training up to ~50x slower under contention), at ~25% more build time on an idle machine.
NUM_THREADS = int(os.environ.get("QCOMPILE_ZOO_THREADS", "2"))


def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


@dataclass
class Artifacts:
    """What a builder produces in memory; `qcompile_zoo.build` writes it to the cache atomically."""

    onnx: bytes
    calib: dict[str, np.ndarray]
    test: dict[str, np.ndarray]
    labels: np.ndarray | None
    info: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------- files


def atomic_write(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temp file in the same folder and os.replace (never a half-written file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        if hasattr(os, "fchmod"):  # mkstemp makes 0600; give the file the usual permissions
            os.fchmod(fd, 0o666 & ~_UMASK)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """An uncompressed .npz (readable by np.load) with fixed zip timestamps, so equal arrays give equal bytes."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for key, value in arrays.items():
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            with zf.open(info, "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.ascontiguousarray(value), allow_pickle=False)
    return buf.getvalue()


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------- determinism


@contextlib.contextmanager
def deterministic(seed: int) -> Iterator[None]:
    """Seed python/numpy/torch, force deterministic kernels and 2 threads; restore the global state after."""
    import torch

    threads = torch.get_num_threads()
    det = torch.are_deterministic_algorithms_enabled()
    det_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    states = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    torch.set_num_threads(NUM_THREADS)
    torch.use_deterministic_algorithms(True)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(det, warn_only=det_warn)
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])


# ----------------------------------------------------------------------------------------------- training


def train_classifier(
    model: "torch.nn.Module",
    x: np.ndarray,
    y: np.ndarray,
    *,
    epochs: int,
    lr: float,
    batch_size: int = 64,
    weight_decay: float = 1e-4,
    label_smoothing: float = 0.0,
    augment: Callable[["torch.Tensor", "torch.Generator"], "torch.Tensor"] | None = None,
    seed: int = 0,
) -> "torch.nn.Module":
    """AdamW + one-cycle cosine schedule, seeded shuffling; returns the model in eval mode."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    steps_per_epoch = math.ceil(len(xt) / batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=lr, total_steps=epochs * steps_per_epoch, pct_start=0.15
    )
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=label_smoothing)
    t0 = time.perf_counter()
    model.train()
    for epoch in range(epochs):
        perm = torch.randperm(len(xt), generator=gen)
        total = 0.0
        for i in range(steps_per_epoch):
            idx = perm[i * batch_size : (i + 1) * batch_size]
            xb = xt[idx]
            if augment is not None:
                xb = augment(xb, gen)
            loss = loss_fn(model(xb), yt[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        if epoch == epochs - 1 or epoch % 10 == 0:
            logger.debug("epoch %d loss %.4f", epoch, total / len(xt))
    model.eval()
    logger.info("trained %s for %d epochs in %.1f s", type(model).__name__, epochs, time.perf_counter() - t0)
    return model


def random_shift(max_shift: int) -> Callable[["torch.Tensor", "torch.Generator"], "torch.Tensor"]:
    """Augmentation: translate each image by up to `max_shift` pixels (zero fill), seeded by the generator."""
    import torch

    def shift(xb: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        n, _, h, w = xb.shape
        padded = torch.nn.functional.pad(xb, (max_shift,) * 4)
        offs = torch.randint(0, 2 * max_shift + 1, (n, 2), generator=gen)
        out = torch.empty_like(xb)
        for dy in range(2 * max_shift + 1):
            for dx in range(2 * max_shift + 1):
                sel = (offs[:, 0] == dy) & (offs[:, 1] == dx)
                out[sel] = padded[sel, :, dy : dy + h, dx : dx + w]
        return out

    return shift


def predict(model: "torch.nn.Module", x: np.ndarray, batch_size: int = 256) -> np.ndarray:
    import torch

    model.eval()
    with torch.no_grad():
        return np.concatenate(
            [model(torch.from_numpy(x[i : i + batch_size])).numpy() for i in range(0, len(x), batch_size)]
        )


# ----------------------------------------------------------------------------------------------- export


def export_onnx(
    model: "torch.nn.Module",
    args: tuple,
    *,
    input_names: list[str],
    output_names: list[str],
    dynamic_axes: dict[str, dict[int, str]],
    opset: int,
    keep_batchnorm: bool,
) -> bytes:
    """Legacy TorchScript export of `model` in eval mode.

    keep_batchnorm: export with TrainingMode.PRESERVE so the eval-mode Conv+BN fusion peephole does not run; the
    model is in eval mode, so BatchNormalization comes out in inference form (training_mode=0, one output).
    """
    import onnx
    import torch

    model.eval()
    training = torch.onnx.TrainingMode.PRESERVE if keep_batchnorm else torch.onnx.TrainingMode.EVAL
    buf = io.BytesIO()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.onnx.export(
            model,
            args,
            buf,
            dynamo=False,
            opset_version=opset,
            input_names=input_names,
            output_names=output_names,
            dynamic_axes=dynamic_axes,
            training=training,
            do_constant_folding=True,
        )
    for w in caught:
        logger.debug("export warning: %s", str(w.message).splitlines()[0])
    if model.training:  # the exporter restores the mode it found; make sure that was eval
        raise RuntimeError("model left in training mode after export")
    data = buf.getvalue()
    proto = onnx.load_from_string(data)
    onnx.checker.check_model(proto, full_check=True)
    for node in proto.graph.node:
        if node.op_type == "BatchNormalization":
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            if attrs.get("training_mode", 0) != 0 or len(node.output) != 1:
                raise RuntimeError(f"training-mode BatchNormalization {node.name} in export")
    return data


def check_ort(onnx_bytes: bytes, model: "torch.nn.Module", feeds: dict[str, np.ndarray], atol: float) -> float:
    """Run the export in onnxruntime on `feeds` and compare with torch eval; returns the max abs difference."""
    import onnxruntime as ort
    import torch

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = NUM_THREADS
    sess = ort.InferenceSession(onnx_bytes, opts, providers=["CPUExecutionProvider"])
    got = sess.run(None, feeds)[0]
    model.eval()
    with torch.no_grad():
        ref = model(*[torch.from_numpy(v) for v in feeds.values()])
    ref = ref.numpy()
    diff = float(np.abs(got - ref).max())
    if not diff <= atol:
        raise RuntimeError(f"onnxruntime output differs from torch eval: max abs diff {diff:g} > {atol:g}")
    logger.info("ORT vs torch max abs diff %.3g", diff)
    return diff


def op_counts(onnx_bytes: bytes) -> dict[str, int]:
    import onnx

    proto = onnx.load_from_string(onnx_bytes)
    return dict(Counter(n.op_type for n in proto.graph.node).most_common())
