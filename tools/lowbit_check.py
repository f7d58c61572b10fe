"""Plain low-bit baselines on the zoo: compile with w8a8 / w6a6 / w4a4 and print the task metric.

    python tools/lowbit_check.py                              # vit-digits and minilm, w8a8 w6a6 w4a4
    python tools/lowbit_check.py --models vit-digits --sweep  # also w6a6 / w4a4 with each observer below
    python tools/lowbit_check.py --int4                       # also w4a4 with INT4 weight storage (opset 21)

Metric: top-1 for classification, mean-pooled cosine vs fp32 for minilm (``qcompile_zoo.evaluate`` against the fp32
outputs on the entry's test set, batch 1, ORT_ENABLE_ALL), plus the output SQNR vs fp32, the file size and the
median latency of the first test sample (batch 1, one thread; a rough figure, not a benchmark: see tools/bench.py).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

import qcompile
import qcompile_zoo as zoo
from qcompile.dataset import load_samples
from qcompile.recipe import EQUIVALENCE, Recipe

OBSERVERS = {"minmax": ("minmax", {}), "p99.99": ("percentile", {"percentile": 99.99}),
             "p99.999": ("percentile", {"percentile": 99.999})}


def recipe(bits: int, observer: str, **extra) -> Recipe:
    name, params = OBSERVERS[observer]
    label = f"w{bits}a{bits}-{observer}" + "".join(f"-{v}" for v in extra.values())
    return Recipe.from_dict({"name": label, "passes": list(EQUIVALENCE) + [
        "quantize_embedding", {"name": "insert_qdq", "weight_bits": bits, "activation_bits": bits,
                               "observer": name, "observer_params": params, **extra}]})


def session(path: Path) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def run_all(path: Path, samples: list[dict], runs: int = 30) -> tuple[dict[str, np.ndarray], float]:
    """Outputs on every sample, and the median latency (ms) of the first one."""
    sess = session(path)
    names = [o.name for o in sess.get_outputs()]
    res = [sess.run(names, s) for s in samples]
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        sess.run(names, samples[0])
        times.append(time.perf_counter() - t0)
    return {n: np.concatenate([r[i] for r in res], axis=0) for i, n in enumerate(names)}, statistics.median(times) * 1e3


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["vit-digits", "minilm"])
    ap.add_argument("--recipes", nargs="+", default=["w8a8", "w6a6", "w4a4"])
    ap.add_argument("--sweep", action="store_true", help="also w6a6 / w4a4 with each observer in OBSERVERS")
    ap.add_argument("--int4", action="store_true", help="also w4a4 with INT4 weight storage (upgrades to opset 21)")
    args = ap.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            entry = zoo.build(name)
            test = load_samples(onnx.load(str(entry.model), load_external_data=False), entry.test, "test")
            ref, ms = run_all(entry.model, test)
            recipes: list = list(args.recipes)
            if args.sweep:
                recipes += [recipe(b, o) for b in (6, 4) for o in OBSERVERS]
            if args.int4:
                recipes.append(recipe(4, "p99.99", weight_storage="int4"))
            rows.append((name, "fp32", zoo.evaluate(name, ref, ref, entry), float("inf"),
                         entry.model.stat().st_size / 1e6, ms, 0.0))
            for r in recipes:
                label = r if isinstance(r, str) else r.name
                out = Path(tmp) / f"{name}-{label}"
                t0 = time.perf_counter()
                qcompile.compile(str(entry.model), calib=str(entry.calib), recipe=r, out_dir=out,
                                 measure_latency=False)
                dt = time.perf_counter() - t0
                outs, ms = run_all(out / "model.qdq.onnx", test)
                rows.append((name, label, zoo.evaluate(name, outs, ref, entry), zoo.sqnr_db(outs, ref),
                             (out / "model.qdq.onnx").stat().st_size / 1e6, ms, dt))
                print(f"{name:12s} {label:20s} metric {rows[-1][2]:.4f}", file=sys.stderr, flush=True)
    print("| model | recipe | metric | SQNR dB | size MB | latency ms | compile s |")
    print("|---|---|---|---|---|---|---|")
    for m, r, metric, sqnr, mb, ms, dt in rows:
        print(f"| {m} | {r} | {metric:.4f} | {sqnr:.1f} | {mb:.2f} | {ms:.2f} | {dt:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
