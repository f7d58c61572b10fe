"""TVM x86 integer code vs ONNX Runtime on the model zoo; writes a section of BENCHMARKS.md.

    TVM_NUM_THREADS=1 python tools/tvm_bench.py                        # every zoo model
    TVM_NUM_THREADS=1 python tools/tvm_bench.py --models minilm --runs 100
    TVM_NUM_THREADS=1 python tools/tvm_bench.py --tune-trials 500      # + a MetaSchedule-tuned build per model
    TVM_NUM_THREADS=1 python tools/tvm_bench.py --tune-trials 300 --tune-models mobilenetv2-digits
    python tools/tvm_bench.py --general --threads 1 2        # the generality set (re-exports + corpus models)
    python tools/tvm_bench.py --general --with-zoo --threads 1 2   # the zoo's own exports too, one table
    python tools/tvm_bench.py --profile --models resnet18-224     # every kernel's time beside ORT's per-node times

Per model (recipe w8a8, one QDQ model shared by every variant): ONNX Runtime fp32 and int8 (the QDQ model,
ORT_ENABLE_ALL), TVM int8 with TVM's own CPU pipeline (untuned, no qcompile kernels), tvm-x86 as qcompile builds it
(VNNI kernels + epilogue schedules, untuned; static C executor), the same kernels on the Relax VM
(executor=vm), tvm-x86 --fast-math, and optionally tuned. Latency: batch 1, 1 thread,
median over rounds that interleave all variants (Python call overhead included for every engine alike), ratio to ORT
int8 from the same run. Task metric on the zoo test set; bit-exactness from the compile report (integer ops replayed
from the target's border values; share of integer tensor values equal end to end). Slowest kernels: the
static build's model.c recompiled with per-step timers, top 3.

--profile: prints (writes nothing) every tvm-x86 kernel's time (per-step timers) and ONNX Runtime's per-node times
(its session profiler) on the same QDQ model, 1 thread, with their totals: where the two spend their time.

--general: the generality set instead, models exported the way other users export them: every zoo model re-exported
with another exporter setting (models/reexport.py: torch.onnx dynamo / legacy, opset 13 / 17 / 18, dynamic axes,
folded or unfused BatchNorm, ReduceMean pooling, decomposed LayerNorm / GELU) and third-party corpus models. Per model:
which executor ran (and why not the static one), how many integer conv/matmul kernels took a VNNI path and which were
left to TVM's generic schedules, ORT int8 vs tvm-x86 at each --threads count (ORT with the same intra_op_num_threads).
"""
from __future__ import annotations

import argparse
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TVM_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import onnx  # noqa: E402

import qcompile_zoo as zoo  # noqa: E402
from benchmd import replace_section  # noqa: E402
from qcompile import dataset, driver, numerics  # noqa: E402
from qcompile.targets import get_target  # noqa: E402
from qcompile.targets.tvm import x86  # noqa: E402
from qcompile.targets.tvm.executors import static_c  # noqa: E402
from qcompile.targets.tvm.frontend.program import read_meta  # noqa: E402

START, END = "<!-- tvm_bench.py:start -->", "<!-- tvm_bench.py:end -->"
GSTART, GEND = "<!-- tvm_bench.py general:start -->", "<!-- tvm_bench.py general:end -->"
MODELS = ["digits-cnn", "mobilenetv2-digits", "resnet-digits", "resnet18-224", "vit-digits", "minilm"]


def log(msg: str) -> None:
    print(f"[tvm_bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def fp32_outputs(e, test: dict) -> dict:
    model = onnx.load(str(e.model))
    sess = numerics.session(str(e.model), optimize=True)
    outs = [numerics.run(sess, s) for s in dataset.split_samples(model, test, "test")]
    return {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}


def profile(out: Path, sample: dict, runs: int = 50) -> list[tuple[str, float, int]]:
    """Top kernels of a tvm-x86 (static executor) build: (name, ms per inference, calls per inference), from
    its model.c recompiled with per-step timers (static_c.profile_shared)."""
    return static_c.profile_shared(out / "tvm-x86" / "main", x86.HOST_CC, sample, runs)[:3]


def compile_w8a8(label: str, e, out: Path, max_samples: int) -> tuple[driver.Artifacts, float, onnx.ModelProto]:
    """qcompile w8a8 for tvm-x86 into ``out``: (artifacts, seconds, the QDQ model)."""
    log(f"{label}: compile (w8a8, tvm-x86)")
    t0 = time.perf_counter()
    art = driver.compile(str(e.model), calib=str(e.calib), recipe="w8a8", target="tvm-x86", out_dir=out,
                         max_samples=max_samples, check_numerics=False, measure_latency=False)
    return art, time.perf_counter() - t0, onnx.load(str(out / "model.qdq.onnx"))


def interleaved_medians(fns: dict, runs: int) -> dict[str, float]:
    """Median ms per call of every function, timed in 5 rounds that interleave them (after one warm-up call); each
    block of calls starts after a 0.1 s pause and one untimed call. Without the pause, thread pools still spinning
    from the previous variant (ORT's for well over 20 ms) share the 2 cores with the next one: MiniLM's 2-thread
    tvm-x86 measured 6.8 ms interleaved that way, 2.9 ms with it."""
    for f in fns.values():
        f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(5):
        for k, f in fns.items():
            time.sleep(0.1)  # the previous variant's pool threads (ORT's, ours) stop spinning on the other core
            f()  # and this one's are awake again: steady back-to-back latency, as a serving loop sees it
            for _ in range(max(1, runs // 5)):
                t = time.perf_counter()
                f()
                times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def bench_model(name: str, runs: int, max_samples: int, tune_trials: int, work: Path) -> tuple[dict, list]:
    e = zoo.build(name)
    with np.load(e.test) as t:
        test = {k: t[k] for k in t.files}
    if name == "resnet18-224":
        test = {k: v[:16] for k, v in test.items()}
    out = work / name
    art, compile_s, q = compile_w8a8(name, e, out, max_samples)
    sample = dataset.split_samples(q, test, "test")[0]
    example = dataset.split_samples(q, dict(np.load(e.calib)), "calib")[0]
    variants: dict[str, object] = {}
    builds = {"tvm-default": {"schedules": "tvm"}, "tvm-x86 VM": {"executor": "vm"}, "tvm-x86": {},
              "tvm-x86 fast-math": {"fast_math": True}}
    if tune_trials:
        builds["tvm-x86 tuned"] = {"tune_trials": tune_trials, "tune_db": str(work / f"{name}-db")}
    build_s = {}
    for label, opts in builds.items():
        folder = out if label == "tvm-x86" else work / f"{name}-{label.replace(' ', '-')}"
        tgt = get_target("tvm-x86", **opts)
        if label != "tvm-x86":
            log(f"{name}: build {label}")
            t0 = time.perf_counter()
            folder.mkdir(parents=True, exist_ok=True)
            tgt.build(q, folder, example)
            build_s[label] = time.perf_counter() - t0
        else:
            build_s[label] = compile_s
        variants[label] = tgt.runner(folder)
    ort_q = numerics.session(str(out / "model.qdq.onnx"), optimize=True, threads=1)
    ort_f = numerics.session(str(e.model), optimize=True, threads=1)
    fns = {"ORT fp32": lambda: numerics.run(ort_f, sample), "ORT int8": lambda: numerics.run(ort_q, sample)}
    fns.update({k: (lambda r=r: r(sample)) for k, r in variants.items()})
    log(f"{name}: timing {len(fns)} variants x {runs} runs")
    med = interleaved_medians(fns, runs)
    log(f"{name}: task metric")
    fp32 = fp32_outputs(e, test)
    samples = dataset.split_samples(q, test, "test")
    ort_out = [numerics.run(ort_q, s) for s in samples]
    m_ort = zoo.evaluate(name, {k: np.concatenate([o[k] for o in ort_out]) for k in fp32}, fp32, e, test)
    lsb = art.report["lsb_vs_reference"]["tvm-x86"]
    row = {"model": name, "ort_fp32": med["ORT fp32"], "ort_int8": med["ORT int8"], "metric_ort": m_ort,
           "exact": lsb.get("integer_ops_exact"), "equal": lsb.get("equal"), "build_s": build_s, "ms": med}
    for label, r in variants.items():
        outs = [r(s) for s in samples]
        joined = {k: np.concatenate([o[k] for o in outs]) for k in fp32}
        row[f"metric {label}"] = zoo.evaluate(name, joined, fp32, e, test)
    tune_meta = variants.get("tvm-x86 tuned")
    row["tune_s"] = tune_meta.meta.get("tune_s") if tune_meta is not None else None
    return row, profile(out, sample)


GENERAL = [*(f"reexport:{n}" for n in MODELS), "corpus:minilm-dynamo", "corpus:ppocr-cls"]
ZOO_SET = [f"zoo:{n}" for n in MODELS]


def _general_entry(key: str):
    """(entry, test samples, metric(outputs, fp32 outputs) -> float, description) of one generality-set model."""
    from qcompile_zoo import corpus
    from qcompile_zoo import reexport

    kind, name = key.split(":", 1)
    if kind == "corpus":
        e = corpus.build(name)
        return e, corpus.test_samples(e), lambda o, r: corpus.evaluate(name, o, r)["agreement"], e.description
    e = reexport.build(name) if kind == "reexport" else zoo.build(name)
    with np.load(e.test) as t:
        test = {k: t[k] for k in t.files}
    if name == "resnet18-224":
        test = {k: v[:16] for k, v in test.items()}
    header = onnx.load(str(e.model), load_external_data=False)

    def metric(outs: list[dict], ref: list[dict]) -> float:
        cat = {k: np.concatenate([o[k] for o in outs]) for k in ref[0]}
        return zoo.evaluate(name, cat, {k: np.concatenate([r[k] for r in ref]) for k in ref[0]}, e, test)

    setting = reexport.SETTINGS[name].description if kind == "reexport" else "the zoo's own export"
    return e, dataset.split_samples(header, test, "test"), metric, setting


def bench_general(key: str, runs: int, max_samples: int, threads: list[int], work: Path) -> dict:
    """One generality-set model: w8a8 QDQ, tvm-x86 (static executor unless it declines) at each thread count vs ORT
    int8 with the same intra_op_num_threads; which executor ran and which integer kernels missed the VNNI path."""
    e, samples, metric, description = _general_entry(key)
    out = work / key.replace(":", "-")
    art, build_s, q = compile_w8a8(key, e, out, max_samples)
    example = dataset.split_samples(q, dict(np.load(e.calib)), "calib")[0]
    meta = read_meta(out / "tvm-x86")
    runners = {1: get_target("tvm-x86").runner(out)}
    for t in threads:
        if t != 1:
            folder = work / f"{key.replace(':', '-')}-t{t}"
            folder.mkdir(parents=True, exist_ok=True)
            tgt = get_target("tvm-x86", threads=t)
            tgt.build(q, folder, example)
            runners[t] = tgt.runner(folder)
    sample = samples[0]
    fns: dict = {}
    for t in threads:
        ort_q = numerics.session(str(out / "model.qdq.onnx"), optimize=True, threads=t)
        fns[f"ORT int8 t{t}"] = lambda s=ort_q: numerics.run(s, sample)
        fns[f"tvm-x86 t{t}"] = lambda r=runners[t]: r(sample)
    ort_f = numerics.session(str(e.model), optimize=True, threads=1)
    fns["ORT fp32 t1"] = lambda: numerics.run(ort_f, sample)
    log(f"{key}: timing {len(fns)} variants x {runs} runs")
    med = interleaved_medians(fns, runs)
    log(f"{key}: task metric")
    ref = [numerics.run(ort_f, s) for s in samples]
    ort_q = numerics.session(str(out / "model.qdq.onnx"), optimize=True, threads=1)
    lsb = art.report["lsb_vs_reference"]["tvm-x86"]
    return {"model": key, "setting": description, "ms": med, "executor": meta["executor"],
            "executor_note": meta.get("executor_note", ""), "vnni": meta.get("vnni_kernels"),
            "generic": meta.get("generic_int8_kernels", []),
            "metric_ort": metric([numerics.run(ort_q, s) for s in samples], ref),
            "metric_tvm": metric([runners[1](s) for s in samples], ref),
            "exact": lsb.get("integer_ops_exact"), "equal": lsb.get("equal"), "build_s": build_s}


def general_table(rows: list[dict], threads: list[int]) -> str:
    head = ("| model (export setting) | executor | int8 kernels on VNNI / generic | ORT fp32 ms | "
            + " | ".join(f"ORT int8 ms {t}T | tvm-x86 ms {t}T (x ORT int8)" for t in threads)
            + " | metric ORT int8 | metric tvm-x86 | integer ops bit-exact | int tensors equal e2e | build s |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    notes = []
    for r in rows:
        ms = r["ms"]
        cells = [f"{r['model']} ({r['setting']})", r["executor"], f"{r['vnni']} / {len(r['generic'])}",
                 f"{ms['ORT fp32 t1']:.3f}"]
        for t in threads:
            o, v = ms[f"ORT int8 t{t}"], ms[f"tvm-x86 t{t}"]
            cells += [f"{o:.3f}", f"{v:.3f} ({v / o:.2f}x)"]
        cells += [f"{r['metric_ort']:.4f}", f"{r['metric_tvm']:.4f}", str(r["exact"]),
                  f"{r['equal']:.2%}" if r["equal"] is not None else "-", f"{r['build_s']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
        if r["generic"]:
            kinds = {}
            for g in r["generic"]:
                kinds[g] = kinds.get(g, 0) + 1
            notes.append(f"- {r['model']}: " + "; ".join(f"`{k}`" + (f" x{n}" if n > 1 else "")
                                                        for k, n in kinds.items()))
        if r["executor_note"]:
            notes.append(f"- {r['model']}: Relax VM because {r['executor_note']}")
    if notes:
        lines += ["", "Integer kernels off the VNNI path (generic TVM schedules), and executor notes:", "", *notes]
    return "\n".join(lines)


def tables(rows: list[dict], profiles: dict) -> str:
    labels = list(dict.fromkeys(k for r in rows for k in r["ms"] if k not in ("ORT fp32", "ORT int8")))
    head = "| model | ORT fp32 ms | ORT int8 ms | " + " | ".join(f"{k} ms (x ORT int8)" for k in labels) + \
           " | metric ORT int8 | metric tvm-x86 | integer ops bit-exact | int tensors equal e2e | build s |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        cells = [r["model"], f"{r['ort_fp32']:.3f}", f"{r['ort_int8']:.3f}"]
        cells += [f"{r['ms'][k]:.3f} ({r['ms'][k] / r['ort_int8']:.2f}x)" if k in r["ms"] else "-" for k in labels]
        cells += [f"{r['metric_ort']:.4f}", f"{r['metric tvm-x86']:.4f}", str(r["exact"]),
                  f"{r['equal']:.2%}" if r["equal"] is not None else "-",
                  " / ".join(f"{v:.0f}" for v in r["build_s"].values())]
        if r.get("tune_s"):
            cells[-1] += f" (tuning {r['tune_s']:.0f})"
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Slowest kernels of the tvm-x86 build (per inference, 1 thread):", "",
              "| model | kernel | ms | calls |", "|---|---|---|---|"]
    for model, prof in profiles.items():
        for k, ms, n in prof:
            lines.append(f"| {model} | `{k[:90]}` | {ms:.3f} | {n} |")
    other = [f"metric {k}" for k in labels if k != "tvm-x86"]
    lines += ["", "Task metric of the other TVM builds: " + "; ".join(
        f"{r['model']}: " + ", ".join(f"{k[7:]} {r[k]:.4f}" for k in other if k in r) for r in rows)]
    return "\n".join(lines)


def ort_node_profile(path: Path, sample: dict, runs: int) -> list[tuple[str, str, float]]:
    """(node, op, median ms) of every node of an ONNX Runtime session (1 thread, ORT_ENABLE_ALL), slowest first."""
    import json

    import onnxruntime as ort

    so = ort.SessionOptions()
    so.enable_profiling, so.intra_op_num_threads = True, 1
    with tempfile.TemporaryDirectory(prefix="ort-prof-") as tmp:
        so.profile_file_prefix = str(Path(tmp) / "ort")
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        for _ in range(runs):
            sess.run(None, sample)
        events = json.loads(Path(sess.end_profiling()).read_text())
    times: dict[tuple[str, str], list[float]] = {}
    for ev in events:
        if ev.get("cat") == "Node" and ev["name"].endswith("_kernel_time"):
            times.setdefault((ev["name"][: -len("_kernel_time")], ev["args"].get("op_name", "")), []).append(
                ev["dur"] / 1e3)
    return sorted(((n, op, statistics.median(v)) for (n, op), v in times.items()), key=lambda r: -r[2])


def profile_model(name: str, runs: int, max_samples: int, work: Path) -> str:
    e = zoo.build(name)
    art, _, q = compile_w8a8(name, e, work / name, max_samples)
    with np.load(e.test) as t:
        sample = dataset.split_samples(q, {k: t[k][:1] for k in t.files}, "test")[0]
    ours = static_c.profile_shared(work / name / "tvm-x86" / "main", x86.HOST_CC, sample, runs)
    theirs = ort_node_profile(work / name / "model.qdq.onnx", sample, runs)
    lines = [f"### {name}: tvm-x86 kernels, total {sum(r[1] for r in ours):.3f} ms", "",
             "| ms | calls | kernel |", "|---|---|---|"]
    lines += [f"| {ms:.3f} | {calls} | `{k if len(k) <= 90 else k[:70] + f'… ({len(k.split(chr(95)))} parts)'}` |"
              for k, ms, calls in ours]
    lines += ["", f"### {name}: ONNX Runtime nodes, total {sum(r[2] for r in theirs):.3f} ms", "",
              "| ms | op | node |", "|---|---|---|"]
    lines += [f"| {ms:.3f} | {op} | `{n}` |" for n, op, ms in theirs]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=MODELS)
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--max-samples", type=int, default=32)
    ap.add_argument("--tune-trials", type=int, default=0)
    ap.add_argument("--tune-models", nargs="+", default=None,
                    help="models that get the tuned variant (default: every model when --tune-trials is given)")
    ap.add_argument("--out", default="BENCHMARKS.md")
    ap.add_argument("--general", action="store_true",
                    help="the generality set instead: every zoo model re-exported with another exporter setting "
                         "(models/reexport.py) and third-party corpus models")
    ap.add_argument("--threads", nargs="+", type=int, default=[1], help="thread counts (--general)")
    ap.add_argument("--with-zoo", action="store_true", help="--general: the zoo's own exports first, same table")
    ap.add_argument("--profile", action="store_true",
                    help="print every tvm-x86 kernel's time beside ORT's per-node times (writes nothing)")
    a = ap.parse_args(argv)
    if a.profile:
        with tempfile.TemporaryDirectory(prefix="tvm_bench-") as tmp:
            print("\n\n".join(profile_model(n, a.runs, a.max_samples, Path(tmp)) for n in a.models))
        return 0
    cmd = "python tools/tvm_bench.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    where = f"on {platform.processor() or platform.machine()}, {os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}"
    if a.general:
        keys = [k for k in (ZOO_SET if a.with_zoo else []) + GENERAL
                if a.models == MODELS or k.split(":", 1)[1] in a.models]
        with tempfile.TemporaryDirectory(prefix="tvm_bench-") as tmp:
            grows = [bench_general(k, a.runs, a.max_samples, a.threads, Path(tmp)) for k in keys]
        body = general_table(grows, a.threads)
        print(body)
        replace_section(Path(a.out), GSTART, GEND, f"{GSTART}\n## TVM x86 on exports it was not tuned for (generality "
                        f"set)\n\n`{cmd.strip()}` {where}. Latency: batch 1, median of interleaved rounds, ORT with "
                        f"the same intra_op_num_threads.\n\n{body}\n{GEND}")
        return 0
    rows, profs = [], {}
    with tempfile.TemporaryDirectory(prefix="tvm_bench-") as tmp:
        for name in a.models:
            trials = a.tune_trials if a.tune_models is None or name in a.tune_models else 0
            row, prof = bench_model(name, a.runs, a.max_samples, trials, Path(tmp))
            rows.append(row)
            profs[name] = prof
    body = tables(rows, profs)
    print(body)
    section = f"{START}\n## TVM x86 integer code vs ONNX Runtime\n\n`TVM_NUM_THREADS=1 {cmd.strip()}` {where}.\n\n{body}\n{END}"
    replace_section(Path(a.out), START, END, section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
