"""Benchmark qcompile against ONNX Runtime's own quantizers on the model zoo; writes a section of BENCHMARKS.md.

    python tools/bench.py                                # every zoo model, 50 timed runs per variant
    python tools/bench.py --models digits-cnn --runs 20  # quick check
    python tools/bench.py --all-recipes --no-ort-static  # qcompile observer variants, skip ORT calibration

Per model and variant (fp32; ORT quantize_static QDQ U8S8 per-channel MinMax/Percentile/Entropy; ORT
quantize_dynamic; qcompile w8a8 and w8a8-dynamic, plus the observer recipes with --all-recipes): the zoo task metric
and the output SQNR vs fp32 over the test set run at batch 1, ORT latency (ORT_ENABLE_ALL, 1 intra/inter-op thread,
batch 1 = first test sample, median over rounds that interleave all variants), the ratio to fp32 measured in the same
run, file size and time to quantize. Tables go to stdout; the section between the bench.py markers in --out is
replaced (the rest of the file is kept). Progress goes to stderr.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import math
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                      quantize_dynamic, quantize_static)

import qcompile
import qcompile_zoo as zoo
from qcompile.dataset import load_samples
from qcompile.recipe import Recipe, load_recipe

Feed = dict[str, np.ndarray]
START, END = "<!-- bench.py:start -->", "<!-- bench.py:end -->"
ROUNDS = 5
OBSERVER_RECIPES = ["w8a8-minmax", "w8a8-percentile", "w8a8-entropy", "w8a8-mse"]
TYPES_NOTE = ("Integer types: qcompile quantizes to U8S8 (uint8 activations, int8 weights) because ONNX Runtime's "
              "x86 integer kernels are fastest there (S8S8 activations are rewritten to U8 internally or run on "
              "slower paths); the ORT baselines use the same types (activations QUInt8, weights QInt8; static: QDQ, "
              "per-channel; dynamic: default options, per-tensor weights).")


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def crash_text(exc: BaseException) -> str:
    lines = [s for s in str(exc).strip().splitlines() if s.strip()]
    text = f"{type(exc).__name__}: {lines[0].strip() if lines else ''}"
    return (text[:237] + "...") if len(text) > 240 else text


@dataclass
class Variant:
    name: str
    path: Path | None = None
    quant_s: float | None = None
    error: str | None = None
    session: ort.InferenceSession | None = None
    metric: float | None = None
    sqnr: float | None = None
    times: list[float] = field(default_factory=list)  # seconds, one per timed run


class Reader(CalibrationDataReader):
    def __init__(self, samples: list[Feed]) -> None:
        self.samples, self.i = samples, 0

    def get_next(self) -> Feed | None:
        self.i += 1
        return self.samples[self.i - 1] if self.i <= len(self.samples) else None

    def rewind(self) -> None:
        self.i = 0


def file_mb(path: Path) -> float:
    """Size of an ONNX file plus the external data files it references, in MB."""
    model = onnx.load(str(path), load_external_data=False)
    extra = {e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"}
    return (path.stat().st_size + sum((path.parent / f).stat().st_size for f in extra)) / 1e6


def session(path: Path) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def run_all(sess: ort.InferenceSession, samples: list[Feed]) -> dict[str, np.ndarray]:
    names = [o.name for o in sess.get_outputs()]
    results = [sess.run(names, s) for s in samples]
    return {n: np.concatenate([r[i] for r in results], axis=0) for i, n in enumerate(names)}


def quantize(v: Variant, fn: Callable[[], Path], cwd: Path) -> None:
    log(f"  quantizing: {v.name}")
    t0 = time.perf_counter()
    try:
        with contextlib.redirect_stdout(sys.stderr), contextlib.chdir(cwd):  # ORT prints progress, may leave files
            v.path = fn()
        v.quant_s = time.perf_counter() - t0
    except Exception as exc:  # noqa: BLE001 - a crashing quantizer is a result
        v.error = crash_text(exc)
        log(f"  {v.name} crashed after {time.perf_counter() - t0:.1f} s: {v.error}")


def ort_static(model: Path, out: Path, calib: list[Feed], method: CalibrationMethod) -> Path:
    quantize_static(str(model), str(out), Reader(calib), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, calibrate_method=method)
    return out


def qc(entry: zoo.ZooEntry, recipe: str | Recipe, out: Path) -> Path:
    qcompile.compile(str(entry.model), calib=str(entry.calib), recipe=recipe, target="onnxruntime",
                     out_dir=str(out), measure_latency=False)
    return out / "model.qdq.onnx"


def _qc_child(model: str, calib: str, recipe: str | dict, out: str) -> str:
    qcompile.compile(model, calib=calib, recipe=recipe if isinstance(recipe, str) else Recipe.from_dict(recipe),
                     target="onnxruntime", out_dir=out, measure_latency=False)
    return str(Path(out) / "model.qdq.onnx")


def qc_isolated(entry: zoo.ZooEntry, recipe: str | Recipe, out: Path) -> Path:
    """:func:`qc` in a fresh (spawned) process: what the compile allocated goes back to the OS when it exits. In one
    process, six smollm2-135m recipes in a row (each peaking at ~9 GB) were OOM-killed at 24 GB."""
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    spec = recipe if isinstance(recipe, str) else recipe.to_dict()
    with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
        return Path(pool.submit(_qc_child, str(Path(entry.model).resolve()), str(Path(entry.calib).resolve()), spec,
                                str(Path(out).resolve())).result())


def time_interleaved(variants: list[Variant], feed: Feed, runs: int) -> None:
    """Warm up every session, then ROUNDS rounds that each time every variant for runs/ROUNDS runs (order rotated)."""
    live = [v for v in variants if v.session is not None]
    for v in live:
        for _ in range(max(3, runs // 10)):
            v.session.run(None, feed)
    per_round = max(1, math.ceil(runs / ROUNDS))
    for r in range(ROUNDS):
        for v in live[r % len(live):] + live[: r % len(live)]:
            for _ in range(per_round):
                t0 = time.perf_counter()
                v.session.run(None, feed)
                v.times.append(time.perf_counter() - t0)


def evaluate_variants(variants: list[Variant], test: list[Feed], name: str, entry: zoo.ZooEntry,
                      score: Callable[[dict, dict], dict] | None = None) -> dict[str, dict]:
    """Open a session per variant that quantized, run the test set (batch 1) and score it against the first
    variant's outputs (fp32): ``metric`` and ``sqnr``; a variant that fails to run keeps the error. Returns
    ``score(outputs, fp32 outputs)`` by variant name; only the fp32 outputs are kept (a 49k-vocabulary decoder's
    logits on 64 windows are 1.6 GB per variant)."""
    ref: dict[str, np.ndarray] = {}
    scores = {}
    for v in variants:
        if v.error is not None:
            continue
        try:
            v.session = session(v.path)
            outs = run_all(v.session, test)
            ref = ref or outs
            v.metric = zoo.evaluate(name, outs, ref, entry)
            v.sqnr = zoo.sqnr_db(outs, ref)
            if score is not None:
                scores[v.name] = score(outs, ref)
            del outs
        except Exception as exc:  # noqa: BLE001 - a model ORT cannot run is a result
            v.error, v.session = f"run: {crash_text(exc)}", None
            log(f"  {v.name} failed to run: {v.error}")
    return scores


def fmt_metric(task: str, x: float | None) -> str:
    if x is None:
        return ""
    return f"{x:.2f} dB" if task == "none" else f"{x:.4f}"


def fmt_db(x: float | None) -> str:
    return "" if x is None else ("inf" if math.isinf(x) else f"{x:.2f}")


def bench_model(name: str, args: argparse.Namespace, workdir: Path) -> str:
    log(f"{name}: building zoo entry")
    entry = zoo.build(name)
    entry = dataclasses.replace(entry, model=entry.model.resolve(), calib=entry.calib.resolve())  # we chdir below
    proto = onnx.load(str(entry.model), load_external_data=False)
    test = load_samples(proto, entry.test, "test")
    n_calib = load_recipe("w8a8").calibration.max_samples  # what qcompile calibrates on; ORT gets the same
    calib = load_samples(proto, entry.calib, "calibration", max_samples=n_calib)
    mdir = workdir / name
    mdir.mkdir(parents=True, exist_ok=True)
    fp32 = Variant("fp32", path=entry.model)
    variants = [fp32]
    recipes = ["w8a8", "w8a8-dynamic"] + (OBSERVER_RECIPES if args.all_recipes else [])
    for r in recipes:
        v = Variant(f"qcompile {r}")
        quantize(v, lambda r=r: qc(entry, r, mdir / f"qc-{r}"), mdir)
        variants.append(v)
    if not args.no_ort_static:
        pre_s, src = 0.0, entry.model
        t0 = time.perf_counter()
        try:
            from onnxruntime.quantization.shape_inference import quant_pre_process
            with contextlib.redirect_stdout(sys.stderr), contextlib.chdir(mdir):  # it leaves temp files in cwd
                quant_pre_process(str(entry.model), str(mdir / "pre.onnx"))
            src, pre_s = mdir / "pre.onnx", time.perf_counter() - t0
            log(f"  quant_pre_process ok ({pre_s:.1f} s)")
        except Exception as exc:  # noqa: BLE001
            log(f"  quant_pre_process failed, quantizing the raw model: {crash_text(exc)}")
        for method in (CalibrationMethod.MinMax, CalibrationMethod.Percentile, CalibrationMethod.Entropy):
            v = Variant(f"ORT static {method.name}")
            out = mdir / f"ort-static-{method.name}.onnx"
            quantize(v, lambda m=method, s=src, o=out: ort_static(s, o, calib, m), mdir)
            if v.quant_s is not None:
                v.quant_s += pre_s
            variants.append(v)
    v = Variant("ORT dynamic")
    quantize(v, lambda: (quantize_dynamic(str(entry.model), str(mdir / "ort-dynamic.onnx"),
                                          weight_type=QuantType.QInt8), mdir / "ort-dynamic.onnx")[1], mdir)
    variants.append(v)

    log(f"  evaluating {len(test)} test samples per variant (batch 1)")
    evaluate_variants(variants, test, name, entry)
    log(f"  timing {sum(v.session is not None for v in variants)} variants, {args.runs} runs each, interleaved")
    time_interleaved(variants, test[0], args.runs)

    base = statistics.median(fp32.times) if fp32.times else None
    task = entry.task
    metric_name = {"classification": "top-1", "embedding": "cosine (mean-pooled)", "lm": "next-token agreement",
                   "none": "SQNR vs fp32"}[task]
    lines = [f"### {name}", "", zoo.describe(name) + ".", "",
             f"{len(test)} test samples, {len(calib)} calibration samples (qcompile and ORT static alike).", "",
             f"| variant | {metric_name} | output SQNR dB | latency ms | latency / fp32 | size MB | quantize s |",
             "|---|---|---|---|---|---|---|"]
    for v in variants:
        if v.error is not None:
            lines.append(f"| {v.name} | crash: {v.error.replace('|', '/')} | | | | | |")
            continue
        lat = statistics.median(v.times) * 1e3 if v.times else None
        ratio = f"{lat / (base * 1e3):.2f}x" if lat is not None and base else ""
        lines.append(f"| {v.name} | {fmt_metric(task, v.metric)} | {fmt_db(v.sqnr)} | "
                     f"{'' if lat is None else f'{lat:.3f}'} | {ratio} | {file_mb(v.path):.3f} | "
                     f"{'' if v.quant_s is None else f'{v.quant_s:.2f}'} |")
    for v in variants:
        v.session = None
    if not args.keep:
        shutil.rmtree(mdir, ignore_errors=True)
    return "\n".join(lines) + "\n"


def header(args: argparse.Namespace) -> str:
    cpu = "unknown CPU"
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                   if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cmd = "python " + shlex.join(sys.argv)
    git = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parent).stdout.strip() or "unknown"
    return "\n".join([
        "## qcompile vs ONNX Runtime quantization (tools/bench.py)", "",
        f"Command: `{cmd}`  ", f"Date: {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}  ",
        f"Machine: {cpu}, {cores} cores available; Python {platform.python_version()}, onnxruntime "
        f"{ort.__version__}, onnx {onnx.__version__}, numpy {np.__version__}, qcompile {qcompile.__version__} "
        f"(git {git})", "",
        TYPES_NOTE, "",
        f"Latency: CPUExecutionProvider, ORT_ENABLE_ALL, intra_op = inter_op = 1 thread, batch 1 (the first test "
        f"sample); warm-up, then {ROUNDS} rounds each timing every variant for {math.ceil(args.runs / ROUNDS)} runs "
        f"(order rotated), median of all {ROUNDS * math.ceil(args.runs / ROUNDS)}; `latency / fp32` < 1 is faster. "
        "Metric and output SQNR: the whole test set run one sample at a time, against fp32's outputs. Quantize "
        "time: qcompile.compile (numerics checks on, latency off); ORT static includes quant_pre_process and "
        "calibration. Size includes external data. Models are the zoo's (qcompile_zoo).", ""])


def write_section(path: Path, body: str) -> None:
    section = f"{START}\n{body.rstrip()}\n{END}\n"
    text = path.read_text() if path.exists() else "# Benchmarks\n\n"
    if START in text and END in text.split(START, 1)[1]:
        before, rest = text.split(START, 1)
        text = before + section + rest.split(END, 1)[1].lstrip("\n")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", help="comma-separated zoo names (default: all: " + ",".join(zoo.names()) + ")")
    ap.add_argument("--runs", type=int, default=50, help="timed runs per variant (default 50)")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "BENCHMARKS.md")
    ap.add_argument("--all-recipes", action="store_true", help="also qcompile " + ", ".join(OBSERVER_RECIPES))
    ap.add_argument("--no-ort-static", action="store_true", help="skip ORT quantize_static (slow calibration)")
    ap.add_argument("--workdir", type=Path, help="where quantized models go (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the quantized models")
    args = ap.parse_args(argv)
    names = args.models.split(",") if args.models else zoo.names()
    unknown = [n for n in names if n not in zoo.names()]
    if unknown:
        ap.error(f"unknown models {unknown}; known: {zoo.names()}")
    workdir = (args.workdir or Path(tempfile.mkdtemp(prefix="qcompile-bench-"))).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    parts = [header(args)]
    try:
        for name in names:
            t0 = time.perf_counter()
            try:
                table = bench_model(name, args, workdir)
            except Exception as exc:  # noqa: BLE001 - e.g. the zoo entry failed to build
                log(f"{name}: failed: {crash_text(exc)}")
                table = f"### {name}\n\nfailed: {crash_text(exc)}\n"
            print(table, flush=True)
            parts.append(table)
            log(f"{name}: done in {time.perf_counter() - t0:.0f} s")
    finally:
        if args.workdir is None and not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    write_section(args.out, "\n".join(parts))
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
