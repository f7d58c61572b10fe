"""Issue 16 ablation: what each equalization / smoothing / low-bit-weight recipe adds, per zoo model, with ONNX
Runtime latency and model size beside fp32 measured in the same run; writes a section of BENCHMARKS.md.

    python tools/llm_bench.py                                   # llama-bytes, minilm, mobilenetv2-digits
    python tools/llm_bench.py --models llama-bytes --recipes w8a8 w8a8-smooth --runs 30

Per model, the recipes of its task (a recipe that does not exist yet is listed as such):
  lm (llama-bytes)            fp32, w8a8, w8a8-smooth, w4a16, w4a16-awq, w4a16-awq-clip (AWQ's own clipping search
                              instead of GPTQ), w4a16-gptq, w4a8-smooth, w4a4-rtn, w4a4-smooth (issue 17's
                              baselines), w4a4-rotate, w4a4-rotate-random (random orthogonal rotations instead of
                              the randomized Hadamard), w4a4-spin (learned rotations), w4a4-ost (learned rotation and
                              OSTQuant scaling), w4a8-rotate
  embedding (minilm)          fp32, w8a8, w8a8-smoothquant (fixed alpha 0.5), w8a8-smooth
  classification (CNNs)       fp32, w8a8, pt (per-tensor int8 weights, no CLE), pt+bc (+ bias correction),
                              pt+cle (CLE, ReLU6 replaced by ReLU, no bias correction), w8a8-cle (the same + bias
                              correction), pt+cle(exact relu6)+bc (ReLU6 kept exact as a per-channel Min)
Columns: the zoo metric on the held-out set (lm: perplexity / fp32 perplexity and next-token agreement with fp32;
embedding: mean-pooled cosine; classification: top-1), ORT latency (ORT_ENABLE_ALL, 1 thread, batch 1, interleaved
rounds: tools/bench.py's timing) and its ratio to fp32, file size and its ratio to fp32, quantize seconds (numerics
instrument on), and what the smoothing / equalization pass reported (groups rewritten, where 1/s went, alphas).
"""
from __future__ import annotations

import argparse
import datetime
import json
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import qcompile_zoo as zoo
from bench import Variant, evaluate_variants, file_mb, qc_isolated, quantize, time_interleaved
from benchmd import replace_section

from qcompile.dataset import load_samples
from qcompile.recipe import EQUIVALENCE, LINEAR_INPUTS_ONLY, Recipe, builtin_recipes

START, END = "<!-- llm_bench:start -->", "<!-- llm_bench:end -->"
RECIPES = {
    "lm": ["w8a8-nosmooth", "w8a8", "w8a8-smooth", "w4a16", "w4a16-awq", "w4a16-awq-clip", "w4a16-gptq", "w4a8-smooth",
           "w4a4-rtn", "w4a4-smooth", "w4a4-rotate", "w4a4-rotate-random", "w4a4-spin", "w4a4-ost", "w4a8-rotate"],
    "embedding": ["w8a8-nosmooth", "w8a8", "w8a8-smoothquant", "w8a8-smooth"],
    "classification": ["w8a8-nosmooth", "w8a8", "pt", "pt+bc", "pt+cle", "w8a8-cle", "pt+cle(exact relu6)+bc"],
}


def _per_tensor(cle: bool, bc: bool, relu6: str = "replace") -> Recipe:
    """Ablation of w8a8-cle: per-tensor int8 weights, with or without CLE (ReLU6 kept exact as a per-channel Min, or
    replaced by ReLU) and bias correction."""
    passes: list = list(EQUIVALENCE) + ([{"name": "cross_layer_equalize", "relu6": relu6}] if cle else [])
    passes.append({"name": "insert_qdq", "weight_granularity": "per_tensor", "observer": "percentile",
                   "observer_params": {"percentile": 99.999}, "bias_correction": int(bc)})
    return Recipe.from_dict({"name": "", "passes": passes})


def _variant(base: str, changes: dict[str, dict | None]) -> Recipe:
    """A built-in recipe with some passes' settings changed (``{pass: {key: value}}``) or dropped (``{pass: None}``)."""
    table = builtin_recipes()[base].to_dict()
    out = []
    for p in table["passes"]:
        name = p["name"] if isinstance(p, dict) else p
        if name not in changes:
            out.append(p)
        elif changes[name] is not None:
            out.append({**(p if isinstance(p, dict) else {"name": p}), **changes[name]})
    table["passes"] = out
    return Recipe.from_dict(table)


def _awq_clip() -> Recipe:
    """w4a16-awq with AWQ's own integers (per-block clipping search) instead of GPTQ on the scaled weights."""
    return _variant("w4a16-awq", {"awq": {"hints": True}, "reconstruct_weights": None})


def _w4a4(smooth: bool) -> Recipe:
    """Issue 17's baselines: W4A4 with the activation quantizer of w4a4-rotate (int4 per token, scale from the token's
    max) and no rotation: round-to-nearest per-channel int4 weights, or SmoothQuant (alpha searched for 4-bit
    weights and per-token activations) with GPTQ weights."""
    passes: list = list(EQUIVALENCE)
    if smooth:
        passes += [{"name": "smooth_quant", "search": True, "weight_bits": 4, "activation_bits": 4, "per_token": True},
                   {"name": "reconstruct_weights", "bits": 4}]
    passes += ["quantize_embedding",
               {"name": "insert_qdq", "weight_bits": 4, "activation_bits": 4, "per_token": "all",
                "chain_ops": LINEAR_INPUTS_ONLY, "observer": "percentile", "observer_params": {"percentile": 99.99}}]
    return Recipe.from_dict({"name": "", "passes": passes})


def _ost() -> Recipe:
    """w4a4-spin with OSTQuant's learnable scaling beside the learned rotation (per-norm channel scales, learned with
    the readers' int4 weights in the loss)."""
    return _variant("w4a4-spin", {"rotate_residual": {"scaling": True}})


def _random_rotation() -> Recipe:
    """w4a4-rotate with random orthogonal rotations (the baseline a learned rotation has to beat)."""
    return _variant("w4a4-rotate", {"rotate_residual": {"rotation": "random"}})


ABLATIONS = {"w8a8-nosmooth": _variant("w8a8", {"smooth_quant": None}),  # w8a8 before 2026-12-07
             # w8a8-smooth before 2026-12-07 (alpha searched on the samples that set s); w4a8-smooth held out
             "w8a8-smooth-insample": _variant("w8a8-smooth", {"smooth_quant": {"holdout": False}}),
             "w4a8-smooth-holdout": _variant("w4a8-smooth", {"smooth_quant": {"holdout": True}}),
             "pt": _per_tensor(cle=False, bc=False), "pt+bc": _per_tensor(cle=False, bc=True),
             "w4a16-awq-clip": _awq_clip(), "w4a4-rtn": _w4a4(smooth=False), "w4a4-smooth": _w4a4(smooth=True),
             "w4a4-rotate-random": _random_rotation(), "w4a4-ost": _ost(),
             "pt+cle": _per_tensor(cle=True, bc=False),
             "pt+cle(exact relu6)+bc": _per_tensor(cle=True, bc=True, relu6="per_channel_min")}
DEFAULT_MODELS = ["llama-bytes", "minilm", "mobilenetv2-digits"]


def log(msg: str) -> None:
    print(f"[llm_bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def pass_summary(report_path: Path) -> str:
    """What the smoothing / equalization / AWQ passes of a compile did, from its report.json."""
    try:
        report = json.loads(report_path.read_text())
    except (OSError, ValueError):
        return ""
    parts = []
    for p in report.get("passes", []):
        if p.get("pass") not in ("smooth_quant", "awq", "cross_layer_equalize", "equalize", "rotate_residual") \
                or not p.get("modified"):
            continue
        st = dict(p.get("stats", {}))
        if isinstance(st.get("learned_loss"), dict):  # the residual rotation's loss; one entry per online one too
            st["learned_loss"] = st["learned_loss"].get("residual")
        alphas = st.pop("alpha", None)
        if isinstance(alphas, dict) and alphas:
            vals = sorted(alphas.values())
            st["alpha"] = f"{vals[0]}-{vals[-1]} (median {statistics.median(vals):.2f})"
        st.pop("max_channel_outlier_ratio", None)

        def fmt(v) -> str:
            if isinstance(v, dict):
                return ", ".join(f"{k} {fmt(x)}" for k, x in v.items())
            return f"{v:.4g}" if isinstance(v, float) else str(v)
        parts.append(f"{p['pass']}: " + "; ".join(f"{k} {fmt(v)}" for k, v in st.items()
                                                  if v not in (None, {}, 0) and not isinstance(v, list)))
    return "; ".join(parts).replace("|", "/")


def bench_model(name: str, recipes: list[str], runs: int, workdir: Path) -> str:
    entry = zoo.build(name)
    proto = onnx.load(str(entry.model), load_external_data=False)
    test = load_samples(proto, entry.test, "test")
    with np.load(entry.test) as t:
        test_arrays = {k: t[k] for k in t.files}
    known = {**builtin_recipes(), **ABLATIONS}
    variants = [Variant("fp32", path=entry.model)]
    missing = [r for r in recipes if r not in known]
    for r in recipes:
        if r in known:
            v = Variant(r)
            quantize(v, lambda r=r: qc_isolated(entry, known[r], workdir / name / r), workdir)
            variants.append(v)
    extra = evaluate_variants(variants, test, name, entry,
                              (lambda o, r: zoo.lm_metrics(o, r, test_arrays)) if entry.task == "lm" else None)
    log(f"{name}: timing {sum(v.session is not None for v in variants)} variants x {runs} runs")
    time_interleaved(variants, test[0], runs)
    base_ms = statistics.median(variants[0].times) * 1e3
    base_mb = file_mb(entry.model)
    if entry.task == "lm":
        head = "| recipe | perplexity | / fp32 | next-token agreement |"
    else:
        head = f"| recipe | {'cosine' if entry.task == 'embedding' else 'top-1'} |"
    lines = [f"### {name}", "", zoo.describe(name) + ".", "",
             head + " ORT ms | / fp32 | size MB | / fp32 | quantize s | passes |",
             "|" + "---|" * (head.count("|") - 1 + 6)]
    for v in variants:
        cells = [v.name]
        if v.error is not None:
            cells += [f"failed: {v.error}"] + [""] * (head.count("|") - 3 + 6)
            lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
            continue
        if entry.task == "lm":
            m = extra[v.name]
            cells += [f"{m['perplexity']:.4f}", f"{m['ratio']:.4f}x", f"{m['agreement']:.4f}"]
        else:
            cells += [f"{v.metric:.4f}"]
        ms, mb = statistics.median(v.times) * 1e3, file_mb(v.path)
        report = v.path.parent / "report.json"
        cells += [f"{ms:.3f}", f"{ms / base_ms:.2f}x", f"{mb:.3f}", f"{mb / base_mb:.2f}x",
                  "" if v.quant_s is None else f"{v.quant_s:.0f}", pass_summary(report) if v.name != "fp32" else ""]
        lines.append("| " + " | ".join(cells) + " |")
        v.session = None
    if missing:
        lines += ["", "Not built yet (no such recipe): " + ", ".join(missing) + "."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=DEFAULT_MODELS)
    ap.add_argument("--recipes", nargs="+", help="instead of each task's list")
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--out", type=Path, help="write the section into this markdown file (BENCHMARKS.md)")
    args = ap.parse_args(argv)
    unknown = [n for n in args.models if n not in zoo.names()]
    if unknown:
        ap.error(f"unknown models {unknown}; known: {zoo.names()}")
    parts = ["## Equalization, smoothing and low-bit weights per zoo model (tools/llm_bench.py)", "",
             (f"`python tools/llm_bench.py {shlex.join(sys.argv[1:])}` on "
              f"{datetime.date.today().isoformat()}. ORT latency: ORT_ENABLE_ALL, 1 thread, batch 1, median of "
              "interleaved rounds; ratios against fp32 from the same run."), ""]
    with tempfile.TemporaryDirectory(prefix="qc-llm-bench-") as tmp:
        for name in args.models:
            recipes = args.recipes or RECIPES.get(zoo.build(name).task, ["w8a8"])
            log(f"{name}: {', '.join(recipes)}")
            parts.append(bench_model(name, recipes, args.runs, Path(tmp)))
    body = "\n".join(parts)
    print(body)
    if args.out:
        replace_section(args.out, START, END, f"{START}\n{body.rstrip()}\n{END}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
