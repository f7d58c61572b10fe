"""tvm-opencl on the zoo under the OpenCL device here (POCL on this CPU): per model, the integer tensors against the
integer reference (from the compile report) and the task metric of the OpenCL build beside ONNX Runtime QDQ's on
the test set, both runs in this process's batch. Prints a Markdown table (and writes it into BENCHMARKS.md with
--write).

    python tools/opencl_zoo.py                                  # every zoo model, whole test sets
    python tools/opencl_zoo.py --models smollm2-135m --n 64     # one model, its first 64 test samples
    python tools/opencl_zoo.py --corpus ppocr-cls               # third-party corpus models (task agreement)
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import benchmd  # noqa: E402
import helpers  # noqa: E402

import qcompile_zoo as zoo  # noqa: E402
from qcompile import driver  # noqa: E402

START, END = "<!-- opencl_zoo.py:start -->", "<!-- opencl_zoo.py:end -->"


def row(name: str, n: int | None, folder: Path) -> str:
    e = zoo.build(name)
    t0 = time.perf_counter()
    art = driver.compile(str(e.model), calib=str(e.calib), recipe="w8a8", target="tvm-opencl", out_dir=folder / name,
                         max_samples=4, check_numerics=False, measure_latency=False)
    built = time.perf_counter() - t0
    lsb = art.report["lsb_vs_reference"]["tvm-opencl"]
    with np.load(e.test) as t:
        test = {k: t[k][:n] for k in t.files}
    samples = len(next(iter(test.values())))
    fp32 = helpers.zoo_fp32(e, test)
    t0 = time.perf_counter()
    m_ocl = zoo.evaluate(name, art.run(test), fp32, e, test)
    ran = time.perf_counter() - t0
    m_ort = zoo.evaluate(name, art.run(test, target="onnxruntime"), fp32, e, test)
    unit = "dB" if e.task == "none" else ""
    return (f"| {name} | {lsb.get('integer_ops_exact')} | {100 * lsb.get('equal', 0):.4f} % | {lsb.get('max_lsb')} "
            f"| {m_ocl:.4f}{unit} | {m_ort:.4f}{unit} | {abs(m_ocl - m_ort):.4f} | {samples} | {built:.0f} s "
            f"| {ran:.0f} s |")


def corpus_row(name: str, folder: Path) -> str:
    """A third-party corpus model: its task agreement with fp32 (the corpus's own metric) on both back ends."""
    from qcompile import numerics
    from qcompile_zoo import corpus

    e = corpus.build(name)
    test = corpus.test_samples(e)
    sess = numerics.session(str(e.model), optimize=True)
    ref = [numerics.run(sess, s) for s in test]
    t0 = time.perf_counter()
    art = driver.compile(str(e.model), calib=str(e.calib), recipe="w8a8", target="tvm-opencl", out_dir=folder / name,
                         max_samples=4, check_numerics=False, measure_latency=False)
    built = time.perf_counter() - t0
    lsb = art.report["lsb_vs_reference"]["tvm-opencl"]
    t0 = time.perf_counter()
    ocl = corpus.evaluate(name, [art.run(s) for s in test], ref)["agreement"]
    ran = time.perf_counter() - t0
    ort = corpus.evaluate(name, [art.run(s, target="onnxruntime") for s in test], ref)["agreement"]
    return (f"| {name} (corpus) | {lsb.get('integer_ops_exact')} | {100 * lsb.get('equal', 0):.4f} % "
            f"| {lsb.get('max_lsb')} | {ocl:.4f} | {ort:.4f} | {abs(ocl - ort):.4f} | {len(test)} | {built:.0f} s "
            f"| {ran:.0f} s |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="*", default=zoo.names())
    ap.add_argument("--corpus", nargs="*", default=[], help="third-party corpus models too (qcompile_zoo.corpus)")
    ap.add_argument("--n", type=int, default=None, help="test samples per model (default: the whole test set)")
    ap.add_argument("--write", action="store_true", help="write the table into BENCHMARKS.md")
    args = ap.parse_args()
    lines = ["| model | integer ops exact | integer tensors equal | max LSB | metric tvm-opencl | metric ORT QDQ "
             "| difference | test samples | compile | POCL run |", "|---|---|---|---|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory(prefix="qc-opencl-zoo-") as tmp:
        for name in args.models:
            lines.append(row(name, args.n, Path(tmp)))
            print(lines[-1], flush=True)
        for name in args.corpus:
            lines.append(corpus_row(name, Path(tmp)))
            print(lines[-1], flush=True)
    table = "\n".join(lines)
    print(table)
    if args.write:
        cmd = "python tools/opencl_zoo.py " + " ".join(sys.argv[1:])
        cmd = cmd.replace(" --write", "")
        text = (f"{START}\n### tvm-opencl on the zoo under POCL (OpenCL on this CPU)\n\n`{cmd}` "
                f"(w8a8, 4 calibration samples; the integer-tensor columns come from the compile report)\n\n"
                f"{table}\n{END}")
        benchmd.replace_section(Path(__file__).resolve().parent.parent / "BENCHMARKS.md", START, END, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
