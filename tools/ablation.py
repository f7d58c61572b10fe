"""Issue 4 ablation: plain low-bit quantization vs RepQ-ViT / RepQuant components, on the zoo transformers.

    python tools/ablation.py                       # vit-digits and minilm, W4A4 and W6A6, all variants
    python tools/ablation.py --models vit-digits --bits 6

Variants per bit width b (every one quantizes all linear-layer inputs and the attention MatMuls, as RepQ-ViT does;
activations not covered by a reparameterization use the 99.99th percentile):
  plain          per-channel b-bit weights, per-tensor b-bit activations
  +reparam-ln    RepQ-ViT: per-channel post-LayerNorm quantizers (minmax) reparameterized to per-tensor
  +reparam-all   the same for every linear-layer input (GELU outputs included)
  +reconstruct   + GPTQ weight reconstruction on the same grid  (= the built-in recipe wXaX-repq)
  repq+dual-clip wXaX-repq with RepQuant's learned per-channel clips instead of minmax
  repq+log2      wXaX-repq with the post-Softmax log√2 -> log2 quantizer (= wXaX-repq-log2)
The metric is the zoo's (top-1 for vit-digits, mean-pooled cosine for minilm) on its held-out test set, batch 1.
Writes the section between the ablation markers of BENCHMARKS.md (--out).
"""
from __future__ import annotations

import argparse
import datetime
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

import qcompile
import qcompile_zoo as zoo
from qcompile import numerics
from qcompile.dataset import load_samples
from qcompile.recipe import EQUIVALENCE, Recipe

from benchmd import replace_section

START, END = "<!-- ablation:start -->", "<!-- ablation:end -->"
VARIANTS = ["plain", "+reparam-ln", "+reparam-all", "+reconstruct", "repq+dual-clip", "repq+log2"]


def recipe(variant: str, bits: int) -> Recipe:
    passes: list = list(EQUIVALENCE) + ["quantize_embedding"]
    if variant != "plain":
        passes.append({"name": "reparameterize", "bits": bits, "targets": "layernorm" if variant == "+reparam-ln"
                       else "all", "ranges": "dual_clip" if variant == "repq+dual-clip" else "minmax"})
    if variant == "repq+log2":
        passes.append({"name": "log2_softmax", "bits": bits})
    if variant in ("+reconstruct", "repq+dual-clip", "repq+log2"):
        passes.append({"name": "reconstruct_weights", "bits": bits})
    passes.append({"name": "insert_qdq", "weight_bits": bits, "activation_bits": bits, "observer": "percentile",
                   "observer_params": {"percentile": 99.99}, "activation_matmul": True})
    return Recipe.from_dict({"name": f"w{bits}a{bits}{variant}", "passes": passes})


def outputs(path: Path, samples: list) -> dict[str, np.ndarray]:
    sess = numerics.session(str(path), optimize=True)
    res = [numerics.run(sess, s) for s in samples]
    return {k: np.concatenate([r[k] for r in res]) for k in res[0]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="vit-digits,minilm")
    ap.add_argument("--bits", default="4,6")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--out", default="BENCHMARKS.md")
    args = ap.parse_args()
    rows: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            e = zoo.build(name)
            samples = load_samples(onnx.load(str(e.model), load_external_data=False), e.test, "test")
            ref = outputs(e.model, samples)
            metric = {"classification": "top-1", "embedding": "cosine", "lm": "next-token agreement"}.get(
                e.task, "SQNR dB")
            rows += [f"\n### {name} ({metric}; fp32 {zoo.evaluate(name, ref, ref, e):.4f})\n",
                     "| bits | " + " | ".join(VARIANTS) + " |", "|---" * (len(VARIANTS) + 1) + "|"]
            for bits in [int(b) for b in args.bits.split(",")]:
                cells = []
                for v in VARIANTS:
                    if v not in args.variants.split(","):
                        cells.append("")
                        continue
                    out = Path(tmp) / f"{name}-{bits}-{v}"
                    t0 = time.perf_counter()
                    try:
                        qcompile.compile(str(e.model), calib=str(e.calib), recipe=recipe(v, bits), out_dir=out,
                                         measure_latency=False)
                        val = zoo.evaluate(name, outputs(out / "model.qdq.onnx", samples), ref, e)
                        cells.append(f"{val:.4f}")
                    except Exception as exc:  # noqa: BLE001 - a failing variant is a result
                        cells.append(f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:80]}")
                    print(f"[ablation] {name} w{bits}a{bits} {v}: {cells[-1]} ({time.perf_counter() - t0:.0f} s)",
                          file=sys.stderr, flush=True)
                rows.append(f"| W{bits}A{bits} | " + " | ".join(cells) + " |")
    cmd = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    section = "\n".join([START, "## Reparameterization ablation (tools/ablation.py)", "",
                         f"Command: `{cmd}`  ", f"Date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC", "",
                         "plain, +reparam-ln, +reparam-all, +reconstruct add one component each (cumulative; "
                         "+reconstruct is the built-in wXaX-repq); the last two are wXaX-repq with one component "
                         "swapped in. All linear-layer inputs and the attention MatMuls are quantized; LayerNorm, "
                         "Softmax and GELU run in float.",
                         *rows, "", END])
    print(section)
    replace_section(Path(args.out), START, END, section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
