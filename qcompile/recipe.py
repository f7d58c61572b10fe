"""Recipes: a named, versioned, ordered list of pass configurations, with YAML round-trip.

```yaml
qcompile_recipe: 1            # format version
name: w8a8
description: ...
calibration: {max_samples: 128}
passes:
  - eliminate_identity        # a pass with its default configuration
  - name: insert_qdq          # or a mapping: name + that pass's config keys
    observer: percentile
    observer_params: {percentile: 99.99}
    overrides: {"re:.*head.*": {quantize: false}}
```
Unknown keys anywhere are errors (ConfigError), never silently ignored.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from qcompile.errors import ConfigError
from qcompile.pass_infra import PassBase
from qcompile.passes.rotate import ONLINE_SUFFIX
from qcompile.registry import PASSES
from qcompile.types import ConfigBase

RECIPE_VERSION = 1
EQUIVALENCE = ("eliminate_identity", "fold_constants", "einsum_to_matmul", "fold_batchnorm", "fuse_conv_bias")


@dataclass(frozen=True)
class CalibrationConfig(ConfigBase):
    max_samples: int = 128

    def validate(self) -> None:
        if self.max_samples < 1:
            raise ConfigError("calibration.max_samples must be >= 1")


@dataclass(frozen=True)
class PassSpec:
    name: str
    config: dict = field(default_factory=dict)

    def build(self) -> PassBase:
        cls, cfg_cls = PASSES[self.name]
        return cls(cfg_cls.from_dict(self.config, self.name)) if cfg_cls is not None else cls()


@dataclass(frozen=True)
class Recipe:
    name: str
    passes: tuple[PassSpec, ...]
    description: str = ""
    calibration: CalibrationConfig = CalibrationConfig()
    version: int = RECIPE_VERSION

    def build_passes(self) -> list[PassBase]:
        return [p.build() for p in self.passes]

    def with_compute_ops(self, extra: tuple[str, ...]) -> Recipe:
        """This recipe with ``extra`` added to the compute ops of every ``insert_qdq`` that keeps the default ones
        (a recipe that names its ``compute_ops``, or quantizes weights only, is left as written): the ops a target
        runs as integer code that the default leaves float for ONNX Runtime's sake (ConvTranspose)."""
        from qcompile.passes.insert_qdq import QDQConfig

        default = list(QDQConfig().compute_ops)
        passes = tuple(
            PassSpec(p.name, {**p.config, "compute_ops": default + [op for op in extra if op not in default]})
            if p.name == "insert_qdq" and "compute_ops" not in p.config and not p.config.get("weight_only") else p
            for p in self.passes)
        return dataclasses.replace(self, passes=passes)

    @property
    def needs_calibration(self) -> bool:
        return any(PASSES[p.name][0].needs_calibration for p in self.passes)

    def to_dict(self) -> dict:
        return {"qcompile_recipe": self.version, "name": self.name, "description": self.description,
                "calibration": self.calibration.to_dict(),
                "passes": [p.name if not p.config else {"name": p.name, **p.config} for p in self.passes]}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @staticmethod
    def from_dict(data: Any, where: str = "recipe") -> "Recipe":
        if not isinstance(data, dict):
            raise ConfigError(f"{where}: a recipe is a mapping, got {type(data).__name__}")
        known = {"qcompile_recipe", "name", "description", "calibration", "passes"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {unknown}; known: {sorted(known)}")
        version = data.get("qcompile_recipe", RECIPE_VERSION)
        if version != RECIPE_VERSION:
            raise ConfigError(f"{where}: recipe format version {version!r} not supported (this qcompile reads "
                              f"{RECIPE_VERSION})")
        raw = data.get("passes")
        if not isinstance(raw, list) or not raw:
            raise ConfigError(f"{where}: 'passes' must be a non-empty list")
        specs = []
        for i, entry in enumerate(raw):
            if isinstance(entry, str):
                name, cfg = entry, {}
            elif isinstance(entry, dict) and isinstance(entry.get("name"), str):
                cfg = {k: v for k, v in entry.items() if k != "name"}
                name = entry["name"]
            else:
                raise ConfigError(f"{where}: passes[{i}] must be a pass name or a mapping with 'name'")
            if name not in PASSES:
                raise ConfigError(f"{where}: unknown pass {name!r}; known: {sorted(PASSES)}")
            spec = PassSpec(name, cfg)
            spec.build()  # validates the configuration now, not mid-compile
            specs.append(spec)
        _check_bit_widths(specs, where)
        return Recipe(name=str(data.get("name", where)), passes=tuple(specs),
                      description=str(data.get("description", "")),
                      calibration=CalibrationConfig.from_dict(data.get("calibration"), "calibration"),
                      version=version)

    @staticmethod
    def from_yaml(text: str, where: str = "recipe") -> "Recipe":
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{where}: invalid YAML: {str(exc).splitlines()[0]}") from None
        return Recipe.from_dict(data, where)


def _check_bit_widths(specs: list[PassSpec], where: str) -> None:
    """Passes that decide quantizer parameters for insert_qdq must use its bit widths: a 4-bit weight hint in an
    8-bit insert_qdq would silently give 4-bit weights, a 6-bit activation hint in an 8-bit one a wrong grid."""
    built = {s.name: s.build() for s in specs}
    qdq = built.get("insert_qdq")
    if qdq is None:
        return
    block = qdq.config.weight_block if qdq.config.weight_only and qdq.config.uses_blocks else 0
    for name, field_, want in (("reconstruct_weights", "bits", qdq.config.weight_bits),
                               ("reparameterize", "bits", qdq.config.activation_bits),
                               ("reconstruct_weights", "weight_block", block),
                               ("awq", "bits", qdq.config.weight_bits), ("awq", "weight_block", block),
                               ("awq", "symmetric", qdq.config.weight_symmetric),
                               ("reconstruct_weights", "symmetric", qdq.config.weight_symmetric)):
        if name in built and getattr(built[name].config, field_) != want:
            what = {"bits": f"{want} bits", "weight_block": f"weight_block {want} (0: not per-block weight-only)",
                    "symmetric": f"weight_symmetric {want}"}[field_]
            raise ConfigError(f"{where}: {name}.{field_} = {getattr(built[name].config, field_)} but insert_qdq uses "
                              f"{what} for the tensors it hints; make them equal")


# Output columns per group the w8a8 family's SmoothQuant search measures (smooth.py). smollm2-135m: the pass takes
# 26 s measuring every column, 17 s with 512; minilm: 512 choose every alpha as all columns do (cosine 0.9971),
# 256 move 4 of 24 by one grid step (0.9967) (tools/llm_bench.py, 2026-12-07).
SEARCH_COLUMNS = 512


def _qdq(desc: str, **cfg: Any) -> Recipe:
    """Equivalence passes, SmoothQuant with α searched per linear-layer group for this recipe's quantizers on
    held-out calibration samples ("no smoothing" among the choices: a group it does not help is declined),
    convolution equalization, then Q/DQ. Measured against the recipe without it (tools/llm_bench.py,
    BENCHMARKS.md): minilm pooled cosine 0.9940 -> 0.9972 and output SQNR 15.3 -> 19.8 dB, vit-digits top-1
    0.984 -> 0.986, llama-bytes next-byte agreement 0.981 -> 0.987; the zoo CNNs unchanged."""
    smooth = {"name": "smooth_quant", "search": True, "weight_bits": cfg.get("weight_bits", 8),
              "activation_bits": cfg.get("activation_bits", 8), "search_columns": SEARCH_COLUMNS, "holdout": True}
    return Recipe.from_dict({"name": "", "description": desc + "; SmoothQuant first, α searched per linear layer",
                             "passes": list(EQUIVALENCE) + [smooth, "equalize", "quantize_embedding",
                                                            {"name": "insert_qdq", **cfg}]})


def _repq(bits: int, log2: bool) -> Recipe:
    """RepQ-ViT / RepQuant: per-channel -> per-tensor reparameterization of every linear-layer input, GPTQ weight
    reconstruction on the fixed grid, attention MatMuls quantized too; log2 post-Softmax quantizer optional (on the
    zoo's short sequences it did not help: see BENCHMARKS.md, tools/ablation.py)."""
    passes: list = list(EQUIVALENCE) + ["quantize_embedding",
                                        {"name": "reparameterize", "bits": bits, "targets": "all"}]
    if log2:
        passes.append({"name": "log2_softmax", "bits": bits})
    passes += [{"name": "reconstruct_weights", "bits": bits},
               {"name": "insert_qdq", "weight_bits": bits, "activation_bits": bits, "activation_matmul": True,
                "observer": "percentile", "observer_params": {"percentile": 99.99}}]
    desc = f"W{bits}A{bits} RepQ: reparameterized per-channel activations, GPTQ weights" + (", log2 Softmax" if log2
                                                                                            else "")
    return Recipe.from_dict({"name": "", "description": desc, "passes": passes})


W4A16_BLOCK = 32  # rows of K per int4 scale in the w4a16 recipes (tools/int4_bench.py: block 32 vs 64 / 128)
# Emitted as com.microsoft.MatMulNBits with accuracy level 0 (float activations: the model computes exactly the QDQ
# semantics): never slower than the QDQ form, which ORT 1.32 fuses into MatMulNBits with level 4 (int8 activations)
# and not always (tools/int4_bench.py: synthetic MLP 1.28x fp32 vs 2.36x for QDQ; llama-bytes 0.99x vs 1.12x).
# Level 4 is faster on larger MatMuls (synthetic MLP 0.66x, minilm 0.84x) and slower on llama-bytes (1.12x).
W4A16_FORMAT, W4A16_LEVEL = "matmulnbits", 0


def _w4a16(method: str) -> Recipe:
    """Weight-only int4 blocks (activations float) with zero points, int8 embedding tables (a tied head reads the
    int8 table: smollm2-135m 1.054x fp32 perplexity with the head untied into int4 blocks, see BENCHMARKS.md);
    integers by round-to-nearest, GPTQ, or GPTQ on AWQ-scaled weights."""
    q = {"name": "insert_qdq", "weight_only": True, "weight_bits": 4, "weight_granularity": "per_block",
         "weight_block": W4A16_BLOCK, "weight_format": W4A16_FORMAT, "nbits_accuracy_level": W4A16_LEVEL,
         "weight_symmetric": False, "weight_dtype": "uint8"}
    gptq = {"name": "reconstruct_weights", "bits": 4, "weight_block": W4A16_BLOCK, "symmetric": False}
    solver = {"rtn": [], "gptq": [gptq],
              "awq": [{"name": "awq", "bits": 4, "weight_block": W4A16_BLOCK, "symmetric": False, "hints": False},
                      gptq]}[method]
    what = {"rtn": "round-to-nearest", "gptq": "GPTQ on the block grid",
            "awq": "AWQ activation-aware input-channel scales (folded, exact), then GPTQ on the scaled weights "
                   "(AWQ's own per-block clipping search instead: awq hints: true)"}[method]
    desc = (f"weight-only int4 (w4a16): asymmetric int4 MatMul/Gemm weights (uint4 with zero points) in blocks of "
            f"{W4A16_BLOCK} along K (block size by measurement, tools/int4_bench.py), {what}; activations float "
            f"(com.microsoft.MatMulNBits, accuracy level {W4A16_LEVEL}); int8 embedding tables, a head tied to the "
            f"table reading the same int8 table")
    return Recipe.from_dict({"name": "", "description": desc,
                             "passes": list(EQUIVALENCE) + solver + ["quantize_embedding", q]})


# The smoothing recipes quantize the inputs of linear layers and leave elementwise products float (no Mul in
# insert_qdq's chain_ops): SwiGLU's silu(gate)·up is then quantized once, smoothed, at the down projection, instead of
# each factor per tensor (gate's outliers cannot be smoothed through silu). smollm2-135m, w8a8-smooth perplexity
# 1.145x -> 1.041x fp32 on 16 test windows (BENCHMARKS.md, issue 16 status; full table from tools/llm_bench.py).
LINEAR_INPUTS_ONLY = ["Add", "Concat", "GlobalAveragePool"]


def _rotate(act_bits: int, learned: bool = False) -> Recipe:
    """QuaRot-style W4A{act_bits}: residual rotation with online rotations before every residual writer, GPTQ int4
    per-channel weights, linear-layer inputs quantized per token at run time (the rotation MatMuls stay float).
    ``learned``: SpinQuant, every rotation optimized for the per-token activation quantizer on calibration data."""
    online = "re:.*" + ONLINE_SUFFIX
    clip = 0.9 if act_bits <= 4 else 1.0  # QuaRot's activation clipping at 4 bits
    rotate = {"name": "rotate_residual", "online": True}
    if learned:
        rotate.update(rotation="learned", act_bits=act_bits, act_clip=clip)
    how = ("learned on calibration activations (SpinQuant: from a randomized Hadamard, or random orthogonal where "
           "the width has no known Hadamard, optimized in the orthogonal group for the per-token quantizer's output "
           "error; weights float in that loss, GPTQ picks them after)") if learned else \
        "a randomized Hadamard (m·2^k wide with a known Hadamard of order m; else random orthogonal)"
    return Recipe.from_dict({
        "name": "", "description": f"W4A{act_bits} with rotation ({'SpinQuant' if learned else 'QuaRot'}): the "
        f"residual stream rotated by {how} folded into the weights (LayerNorm streams centered first so that "
        "the LayerNorms become RMSNorms), the inputs of attention's output projection and the MLP's down projection "
        "rotated at run time (a Kronecker product of two Hadamards as two MatMuls, kept float; also on post-norm "
        "models, whose stream is left alone), "
        f"GPTQ int4 per-channel weights, int{act_bits} per-token activations on every linear layer's input"
        + (f" (scale from {clip} of each token's largest magnitude)" if clip < 1 else "") + "; int8 embedding tables",
        "passes": list(EQUIVALENCE) + [
            rotate, "quantize_embedding",
            {"name": "reconstruct_weights", "bits": 4, "overrides": {online: {"reconstruct": False}}},
            {"name": "insert_qdq", "weight_bits": 4, "activation_bits": act_bits, "per_token": "all",
             "per_token_clip": clip, "chain_ops": LINEAR_INPUTS_ONLY, "observer": "percentile",
             "observer_params": {"percentile": 99.99}, "overrides": {online: {"quantize": False}}}]})


def builtin_recipes() -> dict[str, Recipe]:
    from dataclasses import replace

    table = {
        "fp32": Recipe.from_dict({"name": "fp32", "description": "equivalence passes only (no quantization)",
                                  "passes": list(EQUIVALENCE)}),
        "w8a8": _qdq("int8 per-channel weights, uint8 per-tensor activations (percentile 99.999), U8S8 QDQ, "
                     "empirical bias correction", observer="percentile", observer_params={"percentile": 99.999},
                     bias_correction=1),
        "w8a8-auto": _qdq("w8a8, then mixed precision measured on the model: the most sensitive layers kept float "
                          "until every calibration sample's outputs agree with float (argmax of class scores keeping "
                          "half of float's lead, SQNR "
                          ">= 30 dB elsewhere; at most half of the layers), and regions ONNX Runtime runs slower "
                          "quantized kept float", observer="percentile", observer_params={"percentile": 99.999},
                          accuracy={"metric": "agreement", "target": 1.0, "max_float_fraction": 0.5, "margin": 0.5},
                          latency={"max_ratio": 1.0}),
        "w8a8-minmax": _qdq("w8a8 with min/max activation ranges", observer="minmax"),
        "w8a8-percentile": _qdq("w8a8 with 99.99th-percentile activation ranges", observer="percentile",
                                observer_params={"percentile": 99.99}),
        "w8a8-entropy": _qdq("w8a8 with KL-divergence (entropy) activation ranges", observer="entropy"),
        "w8a8-mse": _qdq("w8a8 with MSE-optimal activation ranges", observer="mse"),
        # CNNs for per-tensor weight grids; with per-channel weights CLE did not help (mobilenetv2-digits: see
        # qcompile/passes/cle.py), so plain w8a8 stays the per-channel recipe
        "w8a8-cle": Recipe.from_dict({
            "name": "", "description": "data-free cross-layer equalization with ReLU6 replaced by ReLU (DFQ's way: "
            "approximate, its effect on the fp32 outputs measured in the report; the exact per-channel Min form, "
            "relu6: per_channel_min, runs 1.5x slower in ONNX Runtime, tools/llm_bench.py), then int8 per-tensor "
            "weights, uint8 per-tensor activations (percentile 99.999), empirical bias correction",
            "passes": list(EQUIVALENCE) + [{"name": "cross_layer_equalize", "relu6": "replace"},
                                           {"name": "insert_qdq", "weight_granularity": "per_tensor",
                                            "observer": "percentile", "observer_params": {"percentile": 99.999},
                                            "bias_correction": 1}]}),
        "w8a8-smoothquant": Recipe.from_dict({
            "name": "", "description": "SmoothQuant (alpha 0.5) then w8a8",
            "passes": list(EQUIVALENCE) + ["smooth_quant", "quantize_embedding",
                                           {"name": "insert_qdq", "observer": "percentile",
                                            "observer_params": {"percentile": 99.999}}]}),
        # SmoothQuant's O1 setting: the static per-tensor form (per_token off) left smollm2-135m at 1.047x
        # perplexity, per-token activations 1.008x (tools/llm_bench.py; BENCHMARKS.md). alpha searched on held-out
        # samples as in w8a8: smollm2-135m 1.0135x -> 1.0096x, next-token agreement 0.935 -> 0.940 (2026-12-07)
        "w8a8-smooth": Recipe.from_dict({
            "name": "", "description": "SmoothQuant with alpha searched per layer group (quantized output error on "
            "held-out calibration rows), 1/s folded into norms / preceding linears / gated products, then int8 "
            "per-channel weights and int8 activations: MatMul inputs per token at run time, other quantized tensors "
            "uint8 per tensor (percentile 99.999)",
            "passes": list(EQUIVALENCE) + [{"name": "smooth_quant", "search": True, "per_token": True,
                                            "holdout": True},
                                           "quantize_embedding",
                                           {"name": "insert_qdq", "observer": "percentile",
                                            "observer_params": {"percentile": 99.999}, "bias_correction": 1,
                                            "chain_ops": LINEAR_INPUTS_ONLY, "per_token": "all"}]}),
        # plain low-bit baselines; percentile 99.99 beat minmax and 99.999 on vit-digits and minilm at both widths
        "w6a6": _qdq("6-bit per-channel symmetric weights, 6-bit asymmetric per-tensor activations (percentile "
                     "99.99), stored in int8 / uint8", weight_bits=6, activation_bits=6, observer="percentile",
                     observer_params={"percentile": 99.99}),
        "w4a4": _qdq("4-bit per-channel symmetric weights, 4-bit asymmetric per-tensor activations (percentile "
                     "99.99), stored in int8 / uint8", weight_bits=4,
                     activation_bits=4, observer="percentile", observer_params={"percentile": 99.99}),
        **{f"w{b}a{b}-repq": _repq(b, log2=False) for b in (4, 6, 8)},
        **{f"w{b}a{b}-repq-log2": _repq(b, log2=True) for b in (4, 6, 8)},
        "w4a16": _w4a16("rtn"),
        "w4a16-awq": _w4a16("awq"),
        "w4a16-gptq": _w4a16("gptq"),
        # W4A8 as ONNX Runtime runs it fastest and best: MatMulNBits with accuracy level 4 quantizes the activation to
        # int8 per block of K at run time and multiplies int8 x int4. smollm2-135m: 1.375x fp32 perplexity with
        # per-channel int4 weights and per-token int8 activations (QDQ), see BENCHMARKS.md for the block form
        "w4a8-smooth": Recipe.from_dict({
            "name": "", "description": "W4A8: SmoothQuant with alpha searched per group for 4-bit weights and "
            "per-token int8 activations, GPTQ on int4 blocks of 32 along K, emitted as com.microsoft.MatMulNBits "
            "with accuracy level 4 (ONNX Runtime quantizes each activation block to int8 at run time and multiplies "
            "int8 x int4); int8 embedding tables. ONNX Runtime only, like the w4a16 recipes",
            "passes": list(EQUIVALENCE) + [{"name": "smooth_quant", "search": True, "weight_bits": 4,
                                            "per_token": True},
                                           "quantize_embedding",
                                           {"name": "reconstruct_weights", "bits": 4, "weight_block": W4A16_BLOCK},
                                           {"name": "insert_qdq", "weight_only": True, "weight_bits": 4,
                                            "weight_granularity": "per_block", "weight_block": W4A16_BLOCK,
                                            "weight_format": "matmulnbits", "nbits_accuracy_level": 4}]}),
        "w4a4-rotate": _rotate(4),
        "w4a8-rotate": _rotate(8),
        "w4a4-spin": _rotate(4, learned=True),
        "prequantized": Recipe.from_dict({"name": "", "description": "a QDQ model another quantizer made (ONNX "
                                          "Runtime, NNCF, Quark, a QAT export) compiled as it is: its own "
                                          "Quantize/DequantizeLinear pairs, no pass changes it; the report's float "
                                          "reference is the model without its rounding",
                                          "passes": ["fold_constants", "import_qdq"]}),
        "w8a8-dynamic": Recipe.from_dict({"name": "", "description": "int8 per-channel weights, activations "
                                          "quantized at run time (DynamicQuantizeLinear, U8S8)",
                                          "passes": list(EQUIVALENCE) + ["quantize_embedding",
                                                                         "insert_dynamic"]}),
    }
    return {k: replace(v, name=k) for k, v in table.items()}


def load_recipe(spec: "str | Path | Recipe") -> Recipe:
    """A built-in recipe name, a YAML file path, or a Recipe."""
    if isinstance(spec, Recipe):
        return spec
    builtins = builtin_recipes()
    if str(spec) in builtins:
        return builtins[str(spec)]
    p = Path(spec)
    if p.suffix in (".yaml", ".yml") or p.is_file():
        if not p.is_file():
            raise ConfigError(f"recipe file not found: {p}")
        return Recipe.from_yaml(p.read_text(), str(p))
    raise ConfigError(f"unknown recipe {str(spec)!r}; built-ins: {sorted(builtins)} (or a .yaml path)")
