"""The zoo's models exported again, the way another user would: another exporter, another opset, dynamic axes.

    entry = qcompile_zoo.reexport.build("mobilenetv2-digits")   # same weights, calib and test data as the zoo's

The trained weights are read back from the zoo's ONNX file into the same PyTorch module (parameters by name;
weights the legacy exporter renamed, e.g. ``onnx::MatMul_381`` holding a transposed Linear weight, are found by
exporting a freshly initialized twin with the zoo's settings and matching its values), then exported with the
setting of :data:`SETTINGS`. The export is checked against the zoo model in ONNX Runtime on the test inputs.
What this set is for: a compiler path that only works on the zoo's exact graphs (one exporter run, opset 17,
GlobalAveragePool, Gemm heads, fused Q/K/V patterns) fails here.
"""
from __future__ import annotations

import copy
import importlib
import io
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

VERSION = 1


@dataclass(frozen=True)
class Setting:
    exporter: str   # "legacy" (TorchScript) or "dynamo"
    opset: int
    dynamic: str    # "batch" or "batch+sequence"
    fold_bn: bool   # legacy only: eval-mode export folds BatchNorm into the convs
    description: str


SETTINGS: dict[str, Setting] = {
    "digits-cnn": Setting("dynamo", 18, "batch", False, "dynamo exporter, opset 18, dynamic batch"),
    "resnet-digits": Setting("legacy", 13, "batch", True, "legacy exporter, opset 13, BatchNorm folded, dynamic batch"),
    "mobilenetv2-digits": Setting("dynamo", 18, "batch", False,
                                  "dynamo exporter, opset 18 (ReduceMean pooling), dynamic batch"),
    "resnet18-224": Setting("dynamo", 18, "batch", False, "dynamo exporter, opset 18, dynamic batch"),
    "vit-digits": Setting("legacy", 13, "batch", False,
                          "legacy exporter, opset 13 (LayerNorm and GELU decomposed), dynamic batch"),
    "minilm": Setting("legacy", 17, "batch+sequence", False,
                      "legacy exporter, opset 17 (fused LayerNormalization), dynamic batch and sequence"),
}

_CLASSIFIERS = {"digits-cnn": ("cnn", "DigitsCNN"), "resnet-digits": ("resnet_digits", "ResNetDigits"),
                "mobilenetv2-digits": ("mobilenetv2", "MobileNetV2Digits"), "vit-digits": ("vit", "ViTDigits"),
                "resnet18-224": ("resnet18", "ResNet18")}


def names() -> list[str]:
    return list(SETTINGS)


def _zoo_weights(module, zoo_model: Path, example: tuple, keep_batchnorm: bool) -> None:
    """Load the zoo ONNX file's weights into ``module`` (same architecture, fresh initialization)."""
    import onnx
    import torch
    from onnx import numpy_helper

    from ._common import export_onnx

    graph = onnx.load(str(zoo_model)).graph
    zoo = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    for n in graph.node:  # the exporter shares equal weights: `Identity(layers.1.bn2.bias) -> layers.1.shortcut.1.bias`
        if n.op_type == "Identity" and n.input[0] in zoo:
            zoo[n.output[0]] = zoo[n.input[0]]
    state = module.state_dict()
    missing = [k for k in state if k not in zoo and not k.endswith("num_batches_tracked")]
    renamed: dict[str, tuple[str, bool]] = {}
    if missing:  # the legacy exporter renamed them: match the export of a twin with distinct random values
        twin_module = copy.deepcopy(module)
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for k, v in twin_module.state_dict().items():
                if v.is_floating_point():
                    v.copy_(torch.rand(v.shape, generator=gen) + 0.5)  # > 0: valid as BatchNorm variances
        state = twin_module.state_dict()
        ins, outs = [i.name for i in graph.input], [o.name for o in graph.output]  # the zoo's own export call
        twin = onnx.load_from_string(export_onnx(twin_module, example, input_names=ins, output_names=outs,
                                                 dynamic_axes={k: {0: "batch"} for k in ins + outs}, opset=17,
                                                 keep_batchnorm=keep_batchnorm))
        fresh = {i.name: numpy_helper.to_array(i) for i in twin.graph.initializer}
        for k in missing:
            v = state[k].numpy()
            for name, arr in fresh.items():
                if arr.shape == v.shape and np.array_equal(arr, v):
                    renamed[k] = (name, False)
                elif v.ndim == 2 and arr.shape == v.T.shape and np.array_equal(arr, v.T):
                    renamed[k] = (name, True)
        lost = [k for k in missing if k not in renamed or renamed[k][0] not in zoo]
        if lost:
            raise RuntimeError(f"zoo weights not found for {', '.join(lost[:5])}")
    new = {}
    for k, v in module.state_dict().items():
        if k.endswith("num_batches_tracked"):
            new[k] = v
        elif k in zoo:
            new[k] = torch.from_numpy(zoo[k].copy())
        else:
            name, transposed = renamed[k]
            new[k] = torch.from_numpy(np.ascontiguousarray(zoo[name].T if transposed else zoo[name]))
    module.load_state_dict(new)
    module.eval()


def _module(name: str, zoo_entry, tmp: Path):
    """(module, example args, input names, output names) with the zoo's trained weights."""
    import torch

    if name == "minilm":
        from . import minilm

        _tok, module = minilm._load(minilm._extract(tmp))
        with np.load(zoo_entry.calib) as c:
            args = tuple(torch.from_numpy(c[k][:2]) for k in minilm.INPUT_NAMES)
        return module.eval(), args, list(minilm.INPUT_NAMES), ["last_hidden_state"]
    mod_name, cls = _CLASSIFIERS[name]
    module = getattr(importlib.import_module(f"{__package__}.{mod_name}"), cls)()
    with np.load(zoo_entry.calib) as c:
        args = (torch.from_numpy(c["input"][:2]),)
    _zoo_weights(module, zoo_entry.model, args, keep_batchnorm=name != "vit-digits")
    return module, args, ["input"], ["logits"]


def _export(module, args: tuple, inputs: list[str], outputs: list[str], s: Setting, tmp: Path) -> bytes:
    import onnx
    import torch

    axes = {0: "batch"} if s.dynamic == "batch" else {0: "batch", 1: "sequence"}
    if s.exporter == "legacy":
        buf = io.BytesIO()
        torch.onnx.export(module, args, buf, dynamo=False, opset_version=s.opset, input_names=inputs,
                          output_names=outputs, dynamic_axes={k: axes for k in inputs + outputs},
                          training=torch.onnx.TrainingMode.EVAL if s.fold_bn else torch.onnx.TrainingMode.PRESERVE,
                          do_constant_folding=True)
        data = buf.getvalue()
    else:
        dims = {i: torch.export.Dim(n) for i, n in axes.items()}
        prog = torch.onnx.export(module, args, dynamo=True, opset_version=s.opset, input_names=inputs,
                                 output_names=outputs, verbose=False, dynamic_shapes=tuple(dims for _ in inputs))
        prog.save(str(tmp / "m.onnx"))
        data = (tmp / "m.onnx").read_bytes()
    onnx.checker.check_model(onnx.load_from_string(data), full_check=True)
    return data


def build(name: str, cache_dir: Path | None = None):
    """The re-export of zoo model ``name`` (cached), as a :class:`qcompile_zoo.ZooEntry` sharing the zoo's data."""
    import dataclasses

    import onnxruntime as ort

    from . import ZooEntry, _lock, default_cache_dir
    from . import build as zoo_build
    from ._common import atomic_write, deterministic

    if name not in SETTINGS:
        raise ValueError(f"no re-export of {name!r}; known: {', '.join(SETTINGS)}")
    zoo: ZooEntry = zoo_build(name, cache_dir)
    cache = Path(cache_dir or default_cache_dir())
    path = cache / f"reexport-{name}-v{VERSION}.onnx"
    entry = dataclasses.replace(zoo, name=f"{name} (re-export)", model=path)
    with _lock(cache / f"reexport-{name}-v{VERSION}.lock"):
        if path.is_file():
            return entry
        with tempfile.TemporaryDirectory(prefix="qcompile-reexport-") as tmp, deterministic(0):
            module, args, inputs, outputs = _module(name, zoo, Path(tmp))
            data = _export(module, args, inputs, outputs, SETTINGS[name], Path(tmp))
        with np.load(zoo.test) as t:
            feeds = {k: t[k][:8] for k in t.files}
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        got = ort.InferenceSession(data, so, providers=["CPUExecutionProvider"]).run(None, feeds)[0]
        ref = ort.InferenceSession(str(zoo.model), so, providers=["CPUExecutionProvider"]).run(None, feeds)[0]
        diff = float(np.abs(got - ref).max())
        if diff > 1e-3 * max(1.0, float(np.abs(ref).max())):
            raise RuntimeError(f"re-export of {name} differs from the zoo model by {diff:.3g}")
        logger.info("re-export of %s (%s): max |diff| vs zoo %.2g", name, SETTINGS[name].description, diff)
        atomic_write(path, data)
    return entry
