"""Export one Keras 3 (TensorFlow backend) or PaddlePaddle model to ONNX the way users do, with sample inputs.

Runs under the exporters' virtualenv (tensorflow-cpu, keras 3, tf2onnx, paddlepaddle, paddle2onnx; made by
tools/setup-exporters, which prints its python), not qcompile's; tools/exporter_sweep.py calls it once per model:

    $PY tools/export_worker.py --list     # one "<family> <name>" line per model
    $PY tools/export_worker.py --family keras --model mobilenet_v2 --out DIR

Writes DIR/<name>.onnx, DIR/<name>.calib.npz (16 samples) and DIR/<name>.test.npz (4 samples, another draw), both
keyed by the ONNX graph input names and cast to their declared dtypes, checks the file with onnx.checker and prints
one JSON line on stdout: family, model, exporter, opset, inputs (name -> shape, dynamic dims as strings or null) and
seconds (build + export + check). Whatever the libraries print goes to stderr; on failure the exit status is 1 and
the last stderr line says why.

Exports: Keras with model.export(path, format="onnx") (tf2onnx, its default opset), or tf2onnx.convert.from_keras
where that file is unusable (EfficientNet: its Normalization constants become extra graph inputs); Paddle with
paddle.onnx.export at opset 13 (its default, 9, is below qcompile's minimum of 11; paddle2onnx's Polygraphy constant
folding runs only if onnxruntime and onnx_graphsurgeon are installed, never auto-installed). Batch is always
dynamic, and so are picture height/width, sequence length and audio frames unless exporting that way fails: then
they are fixed (96x96 pictures, 32 tokens, 100 frames) and the export is retried. Paddle's GoogLeNet is always
exported at 224x224: it exports with dynamic height/width but then runs at no other size. Keras applications get the
head users put on a fine-tuned include_top=False + pooling="avg" base (Dense softmax, 10 classes), since
include_top=True needs a static input shape. Not exportable, so not listed: Keras ConvNeXt (tf2onnx cannot convert
its XLA-compiled grouped convolutions nor TF's exact GELU, Erfc) and RegNet (not in Keras 3).

Weights are random (nothing is downloaded; fixed seeds) but left the way training leaves them, so that outputs are
not constant: BatchNorm/LayerNorm gamma ~ U(0.5, 1.5) and beta ~ N(0, 0.1), and BatchNorm moving mean/variance set to
the statistics of a third draw of inputs (one training-mode pass with momentum 0). Moving statistics drawn from fixed
distributions do not work: random convolutions give activations far smaller than 1 in many models, so each
BatchNorm then outputs about beta whatever the input, and e.g. MobileNetV2 scores every picture the same.

Inputs follow each model's expected range: 0..255 pictures for Keras applications with built-in preprocessing,
[-1, 1] ("tf"), BGR mean-subtracted ("caffe") or ImageNet-normalized ("torch", also Paddle) pictures otherwise, all
made of colour blocks plus pixel noise; token ids of random length padded with 0 (Keras: int32, mask_zero; Paddle:
int64 with an attention_mask input); N(0, 1) log-mel frames.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("GLOG_minloglevel", "2")

SIZE = 96  # picture height and width of the sample inputs (and of a fixed-shape fallback export)
SEQ, VOCAB, DIM = 32, 1000, 64  # text models: sample length, vocabulary, width
FRAMES, MELS = 100, 40  # audio model: sample frames, log-mel bins
CLASSES = 10
PADDLE_OPSET = 13
N_CALIB, N_TEST = 16, 4

# name -> (keras.applications constructor, its arguments, input preprocessing)
KERAS_APPS: dict[str, tuple[str, dict[str, Any], str]] = {
    "mobilenet_v1": ("MobileNet", {"alpha": 0.25}, "tf"),
    "mobilenet_v2": ("MobileNetV2", {"alpha": 0.35}, "tf"),
    "mobilenet_v3_small": ("MobileNetV3Small", {"minimalistic": False}, "raw"),
    "efficientnet_b0": ("EfficientNetB0", {}, "raw"),
    "efficientnet_v2_b0": ("EfficientNetV2B0", {}, "raw"),
    "resnet50": ("ResNet50", {}, "caffe"),
    "densenet121": ("DenseNet121", {}, "torch"),
    "nasnet_mobile": ("NASNetMobile", {}, "tf"),
    "xception": ("Xception", {}, "tf"),
    "inception_v3": ("InceptionV3", {}, "tf"),
    "resnet50_v2": ("ResNet50V2", {}, "tf"),
}
# name (= paddle.vision.models function) -> its arguments besides pretrained=False, num_classes
PADDLE_VISION: dict[str, dict[str, Any]] = {
    "resnet18": {},
    "mobilenet_v1": {"scale": 0.25},
    "mobilenet_v2": {"scale": 0.35},
    "mobilenet_v3_small": {},
    "shufflenet_v2_x0_25": {},
    "squeezenet1_1": {},
    "densenet121": {},
    "googlenet": {},
    "inception_v3": {},
}
PADDLE_FIXED_SIZE = {"googlenet": 224}  # exported at this fixed size: its auxiliary heads' Linear layers need it
MODELS: dict[str, list[str]] = {
    "keras": [*KERAS_APPS, "text_transformer", "audio_conv1d", "unet"],
    "paddle": [*PADDLE_VISION, "text_transformer"],
}

SPREAD: dict[str, Callable[[np.random.Generator, tuple[int, ...]], np.ndarray]] = {
    "gamma": lambda rng, shape: rng.uniform(0.5, 1.5, shape),
    "beta": lambda rng, shape: rng.normal(0.0, 0.1, shape),
}
IMAGENET_MEAN, IMAGENET_STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])


def pictures(rng: np.random.Generator, n: int, preprocessing: str, nchw: bool, size: int = SIZE) -> np.ndarray:
    """Random size x size RGB pictures (8x8 colour blocks plus pixel noise, 0..255), then the model's preprocessing."""
    blocks = rng.uniform(0, 255, (n, size // 8, size // 8, 3)).repeat(8, axis=1).repeat(8, axis=2)
    img = 0.75 * blocks + 0.25 * rng.uniform(0, 255, (n, size, size, 3))
    if preprocessing == "tf":
        img = img / 127.5 - 1.0
    elif preprocessing == "caffe":
        img = img[..., ::-1] - np.array([103.939, 116.779, 123.68])
    elif preprocessing == "torch":
        img = (img / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
    return (img.transpose(0, 3, 1, 2) if nchw else img).astype(np.float32)


def tokens(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of random lengths (SEQ/4..SEQ) padded with 0 to SEQ, and the matching 0/1 attention mask."""
    mask = (np.arange(SEQ)[None, :] < rng.integers(SEQ // 4, SEQ + 1, (n, 1))).astype(np.int64)
    return rng.integers(1, VOCAB, (n, SEQ)) * mask, mask


def sample_inputs(family: str, name: str, rng: np.random.Generator, n: int) -> list[np.ndarray]:
    """The model's inputs for n samples, in graph input order."""
    if name in KERAS_APPS and family == "keras":
        return [pictures(rng, n, KERAS_APPS[name][2], nchw=False)]
    if name in PADDLE_VISION and family == "paddle":
        return [pictures(rng, n, "torch", nchw=True, size=PADDLE_FIXED_SIZE.get(name, SIZE))]
    if name == "text_transformer":
        ids, mask = tokens(rng, n)
        return [ids] if family == "keras" else [ids, mask]
    if name == "unet":
        return [pictures(rng, n, "tf", nchw=False)]
    return [rng.normal(0.0, 1.0, (n, FRAMES, MELS)).astype(np.float32)]


def build_keras(name: str, dynamic: bool) -> Any:
    """A keras.applications model with a 10-class head, or one of the three hand-built models."""
    import keras

    if name in KERAS_APPS:
        constructor, kwargs, _ = KERAS_APPS[name]
        base = getattr(keras.applications, constructor)(
            input_shape=(None, None, 3) if dynamic else (SIZE, SIZE, 3),
            include_top=False, weights=None, pooling="avg", **kwargs)
        return keras.Model(base.input, keras.layers.Dense(CLASSES, activation="softmax")(base.output), name=name)
    if name == "text_transformer":

        class PositionEmbedding(keras.layers.Layer):
            """Adds a learned embedding of each token's position (passes the padding mask through)."""

            def __init__(self, max_len: int, dim: int, **kwargs: Any) -> None:
                super().__init__(**kwargs)
                self.supports_masking = True
                self.table = keras.layers.Embedding(max_len, dim)

            def call(self, x: Any) -> Any:
                return x + self.table(keras.ops.arange(keras.ops.shape(x)[1]))

        ids = keras.Input((None if dynamic else SEQ,), dtype="int32", name="input_ids")
        x = PositionEmbedding(4 * SEQ, DIM)(keras.layers.Embedding(VOCAB, DIM, mask_zero=True)(ids))
        for _ in range(2):
            attention = keras.layers.MultiHeadAttention(4, DIM // 4)(x, x)
            x = keras.layers.LayerNormalization()(keras.layers.Add()([x, attention]))
            # tanh GELU: TF's exact GELU uses Erfc, which tf2onnx cannot convert
            hidden = keras.layers.Dense(2 * DIM, activation=lambda v: keras.activations.gelu(v, approximate=True))(x)
            ff = keras.layers.Dense(DIM)(hidden)
            x = keras.layers.LayerNormalization()(keras.layers.Add()([x, ff]))
        return keras.Model(ids, keras.layers.Dense(CLASSES)(keras.layers.GlobalAveragePooling1D()(x)), name=name)
    if name == "unet":  # segmentation: Conv2DTranspose upsampling, a skip, logits at half size resized bilinearly
        x = picture = keras.Input((None, None, 3) if dynamic else (SIZE, SIZE, 3), name="image")
        skips = []
        for filters in (16, 32):
            x = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False)(x)
            skips.append(x := keras.layers.ReLU()(keras.layers.BatchNormalization()(x)))
            x = keras.layers.MaxPooling2D()(x)
        x = keras.layers.Conv2D(64, 3, padding="same", activation="relu")(x)
        x = keras.layers.Conv2DTranspose(32, 3, strides=2, padding="same")(x)
        x = keras.layers.Conv2D(32, 3, padding="same", activation="relu")(keras.layers.Concatenate()([x, skips[1]]))
        logits = keras.layers.Conv2D(CLASSES, 1)(x)
        return keras.Model(picture, keras.layers.UpSampling2D(2, interpolation="bilinear")(logits), name=name)
    x = frames = keras.Input((None if dynamic else FRAMES, MELS), name="log_mel")
    for filters, stride in ((32, 2), (64, 2), (64, 1)):
        x = keras.layers.Conv1D(filters, 5, strides=stride, padding="same", use_bias=False)(x)
        x = keras.layers.ReLU()(keras.layers.BatchNormalization()(x))
    return keras.Model(frames, keras.layers.Dense(CLASSES)(keras.layers.GlobalMaxPooling1D()(x)), name=name)


def export_keras(name: str, path: Path, dynamic: bool, sample: list[np.ndarray], opset: int | None = None) -> str:
    """Build, spread the norm layers, settle BatchNorm stats on `sample` (a training-mode call), model.export; if
    that file is unusable (tf2onnx leaves some captured constants as graph inputs), or an `opset` is asked for
    (model.export takes none), tf2onnx.convert.from_keras."""
    import keras
    import tensorflow as tf
    import tf2onnx

    keras.utils.set_random_seed(0)
    model = build_keras(name, dynamic)
    rng, todo, batch_norms = np.random.default_rng(0), [model], []
    while todo:
        layer = todo.pop()
        todo.extend(getattr(layer, "layers", []))
        if isinstance(layer, (keras.layers.BatchNormalization, keras.layers.LayerNormalization)):
            for key, draw in SPREAD.items():
                if (var := getattr(layer, key, None)) is not None:
                    var.assign(draw(rng, tuple(var.shape)).astype(np.float32))
        if isinstance(layer, keras.layers.BatchNormalization):
            batch_norms.append((layer, layer.momentum))
            layer.momentum = 0.0
    model(sample[0] if len(sample) == 1 else sample, training=True)  # moving stats := the sample's statistics
    for layer, momentum in batch_norms:
        layer.momentum = momentum
    if opset is None:
        model.export(str(path), format="onnx", verbose=False)
        if (problem := onnx_problem(path, len(model.inputs))) is None:
            return f"keras.export(format=onnx) / tf2onnx {tf2onnx.__version__}"
        print(f"export_worker: model.export gave an unusable file ({problem}); trying tf2onnx.convert.from_keras",
              file=sys.stderr)
    spec = [tf.TensorSpec(tensor.shape, tensor.dtype, name=tensor.name) for tensor in model.inputs]
    tf2onnx.convert.from_keras(model, input_signature=spec, opset=opset, output_path=str(path))
    return f"tf2onnx.convert.from_keras / tf2onnx {tf2onnx.__version__}"


def build_paddle_text() -> Any:
    """input_ids, attention_mask (int64) -> Embedding -> 2 TransformerEncoder layers -> masked mean -> Linear."""
    import paddle
    from paddle import nn

    class TextClassifier(nn.Layer):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(VOCAB, DIM)
            layer = nn.TransformerEncoderLayer(DIM, 4, 2 * DIM, dropout=0.0, activation="gelu")
            self.encoder = nn.TransformerEncoder(layer, 2)
            self.head = nn.Linear(DIM, CLASSES)

        def forward(self, input_ids: paddle.Tensor, attention_mask: paddle.Tensor) -> paddle.Tensor:
            mask = attention_mask.astype("float32")
            hidden = self.encoder(self.embed(input_ids), src_mask=((1.0 - mask) * -1e4).unsqueeze([1, 2]))
            return self.head((hidden * mask.unsqueeze(-1)).sum(axis=1) / mask.sum(axis=1, keepdim=True))

    return TextClassifier()


def export_paddle(name: str, path: Path, dynamic: bool, sample: list[np.ndarray], opset: int | None = None) -> str:
    """Build (vision or text model), spread the norm layers, settle BatchNorm stats on `sample`, paddle.onnx.export."""
    import paddle
    import paddle2onnx
    from paddle import nn
    from polygraphy import config as polygraphy_config

    # paddle2onnx sets POLYGRAPHY_AUTOINSTALL_DEPS=1 for its constant folding, which then pip-installs onnxruntime and
    # onnx_graphsurgeon into this environment when they are missing; never install, skip the folding instead.
    polygraphy_config.AUTOINSTALL_DEPS = False
    paddle.seed(0)
    if name in PADDLE_VISION:
        model = getattr(paddle.vision.models, name)(pretrained=False, num_classes=CLASSES, **PADDLE_VISION[name])
        hw = PADDLE_FIXED_SIZE.get(name, None if dynamic else SIZE)
        spec = [paddle.static.InputSpec([None, 3, hw, hw], "float32", "image")]
    else:
        model = build_paddle_text()
        seq = None if dynamic else SEQ
        spec = [paddle.static.InputSpec([None, seq], "int64", key) for key in ("input_ids", "attention_mask")]
    rng, batch_norms = np.random.default_rng(0), []
    for layer in model.sublayers():
        if isinstance(layer, (nn.BatchNorm, nn.BatchNorm2D, nn.LayerNorm)):
            for attr, key in (("weight", "gamma"), ("bias", "beta")):
                if (param := getattr(layer, attr, None)) is not None:
                    param.set_value(SPREAD[key](rng, tuple(param.shape)).astype(np.float32))
        if isinstance(layer, (nn.BatchNorm, nn.BatchNorm2D)):
            batch_norms.append((layer, layer._momentum))
            layer._momentum = 0.0
    model.train()
    with paddle.no_grad():
        model(*[paddle.to_tensor(array) for array in sample])  # moving stats := the sample's statistics
    for layer, momentum in batch_norms:
        layer._momentum = momentum
    model.eval()
    paddle.onnx.export(model, str(path.with_suffix("")), input_spec=spec, opset_version=opset or PADDLE_OPSET)
    return f"paddle.onnx.export / paddle2onnx {paddle2onnx.__version__}"


def onnx_problem(path: Path, n_inputs: int) -> str | None:
    """Why the ONNX file at path is unusable (checker error, not n_inputs graph inputs), or None."""
    import onnx

    model = onnx.load(str(path))
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        return " ".join(str(exc).split())[:300]
    initializers = {init.name for init in model.graph.initializer}
    names = [vi.name for vi in model.graph.input if vi.name not in initializers]
    return None if len(names) == n_inputs else f"{len(names)} graph inputs {names}, expected {n_inputs}"


def describe(exc: BaseException) -> str:
    """One line for an export failure (paddle2onnx logs its errors, then calls sys.exit(-1))."""
    if isinstance(exc, SystemExit):
        return f"the exporter exited with status {exc.code} (its error is logged above)"
    return f"{type(exc).__name__}: {' '.join(str(exc).split())[:500] or '(no message)'}"


def export_model(family: str, name: str, out: Path, opset: int | None = None) -> dict[str, Any]:
    """Export family/name into out (dynamic shapes, else fixed) at `opset` (default: the exporter's), check it, write
    the sample inputs; the JSON record."""
    import onnx

    warnings.simplefilter("ignore")
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.onnx"
    train = sample_inputs(family, name, np.random.default_rng(0), N_CALIB)  # sets the BatchNorm moving statistics
    calib = sample_inputs(family, name, np.random.default_rng(1), N_CALIB)
    test = sample_inputs(family, name, np.random.default_rng(2), N_TEST)
    export = export_keras if family == "keras" else export_paddle
    start = time.perf_counter()
    try:
        exporter = export(name, path, True, train, opset)
    except (Exception, SystemExit) as exc:  # noqa: BLE001  (any exporter failure: retry with fixed shapes)
        print(f"export_worker: dynamic-shape export failed ({describe(exc)}); retrying with fixed shapes",
              file=sys.stderr)
        exporter = export(name, path, False, train, opset)
    if problem := onnx_problem(path, len(calib)):
        raise RuntimeError(f"unusable ONNX file: {problem}")
    seconds = time.perf_counter() - start
    model = onnx.load(str(path))
    initializers = {init.name for init in model.graph.initializer}
    graph_inputs = [vi for vi in model.graph.input if vi.name not in initializers]
    for file, arrays in ((out / f"{name}.calib.npz", calib), (out / f"{name}.test.npz", test)):
        np.savez(file, **{vi.name: array.astype(onnx.helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type))
                          for vi, array in zip(graph_inputs, arrays)})
    return {
        "family": family,
        "model": name,
        "exporter": exporter,
        "opset": next(op.version for op in model.opset_import if op.domain in ("", "ai.onnx")),
        "inputs": {vi.name: [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                             for d in vi.type.tensor_type.shape.dim] for vi in graph_inputs},
        "seconds": round(seconds, 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--list", action="store_true", help="print one '<family> <name>' line per model and exit")
    parser.add_argument("--family", choices=sorted(MODELS))
    parser.add_argument("--model")
    parser.add_argument("--out", type=Path, help="directory for <model>.onnx, .calib.npz and .test.npz")
    parser.add_argument("--opset", type=int, help="the ONNX opset to export at (default: the exporter's own)")
    args = parser.parse_args(argv)
    if args.list:
        print("\n".join(f"{family} {name}" for family, names in MODELS.items() for name in names))
        return 0
    if not (args.family and args.model and args.out):
        parser.error("--family, --model and --out are required (or --list)")
    if args.model not in MODELS[args.family]:
        parser.error(f"unknown {args.family} model {args.model!r}; --list shows them")
    sys.stdout.flush()
    json_fd = os.dup(1)
    os.dup2(2, 1)  # everything printed from here on (Python or native) goes to stderr; the JSON line to the real stdout
    try:
        record = export_model(args.family, args.model, args.out, args.opset)
    except (Exception, SystemExit) as exc:  # noqa: BLE001  (report any failure as one line)
        print(f"export_worker: {args.family}/{args.model} failed: {describe(exc)}", file=sys.stderr)
        return 1
    sys.stdout.flush()
    os.write(json_fd, (json.dumps(record) + "\n").encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
