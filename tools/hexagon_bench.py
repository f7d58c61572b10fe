"""Hexagon DSP figures per zoo model (tvm-hexagon under qemu-hexagon); writes a section of BENCHMARKS.md.

    python tools/hexagon_bench.py                        # digits-cnn, mobilenetv2-digits, vit-digits
    python tools/hexagon_bench.py --models digits-cnn
    python tools/hexagon_bench.py --general reexport:mobilenetv2-digits corpus:ppocr-cls   # exports not in the zoo

Per model (recipe w8a8): Hexagon packets (VLIW bundles, QEMU's instruction unit for Hexagon) per inference of the
HVX build (int8 conv/matmul on vrmpy) beside a scalar build of the same model (--no-hvx), counted by a QEMU TCG
plugin; vrmpy instructions in the kernels' disassembly; top-1 over the zoo test set for the HVX build and for ONNX
Runtime's QDQ model; the report's integer comparison with the reference (every integer tensor of its samples).
Packet counts are deterministic: they do not depend on the machine's load. ``--general``: models exported another
way (tools/tvm_bench.py's generality set), with the task metric of tvm-hexagon and of ORT's QDQ model against fp32.
"""
from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

import qcompile_zoo as zoo
from benchmd import replace_section
from qcompile import dataset, driver
from qcompile.targets.tvm import hexagon

START, END = "<!-- hexagon_bench.py:start -->", "<!-- hexagon_bench.py:end -->"
GSTART, GEND = "<!-- hexagon_bench.py general:start -->", "<!-- hexagon_bench.py general:end -->"
MODELS = ["digits-cnn", "mobilenetv2-digits", "vit-digits"]


def _vrmpy(obj: Path) -> int:
    asm = subprocess.run(["llvm-objdump", "-d", "--mcpu=hexagonv66", "--mattr=+hvxv66,+hvx-length128b", str(obj)],
                         capture_output=True, text=True, check=True).stdout
    return asm.count("vrmpy(")


def row(name: str, work: Path, max_samples: int) -> dict:
    e = zoo.build(name)
    t0 = time.perf_counter()
    art = driver.compile(str(e.model), calib=str(e.calib), recipe="w8a8", target="tvm-hexagon",
                         out_dir=work / name, max_samples=max_samples, check_numerics=False, measure_latency=False)
    build_s = time.perf_counter() - t0
    q = onnx.load(str(art.out_dir / "model.qdq.onnx"))
    with np.load(e.calib) as c:
        example = dataset.split_samples(q, {k: c[k] for k in c.files}, "calib")[0]
    scalar = work / f"{name}-scalar"
    hexagon.TvmHexagonTarget(hvx=False).build(q, scalar, example)
    with np.load(e.test) as t:
        test = {k: t[k] for k in t.files}
    sample = dataset.split_samples(q, test, "test")[0]
    labels = np.load(e.labels)
    got, ort = art.run(test), art.run(test, target="onnxruntime")
    top1 = lambda o: float(np.mean(next(iter(o.values())).reshape(len(labels), -1).argmax(-1) == labels))  # noqa
    lsb = art.report["lsb_vs_reference"]["tvm-hexagon"]
    meta = hexagon.frontend.read_meta(art.out_dir / hexagon.SUBDIR)
    hvx, plain = hexagon.packets_per_inference(art.out_dir, sample), hexagon.packets_per_inference(scalar, sample)
    return {"model": name, "hvx": hvx, "scalar": plain, "vrmpy": _vrmpy(art.out_dir / hexagon.SUBDIR / "main" /
                                                                        "kernels.o"),
            "kernels": meta["vrmpy_kernels"], "generic": len(meta["generic_int8_kernels"]),
            "top1": top1(got), "top1_ort": top1(ort), "n": len(labels), "exact": lsb.get("integer_ops_exact"),
            "equal": lsb.get("equal"), "build_s": build_s}


def general_row(key: str, work: Path, max_samples: int) -> dict:
    """A model of tools/tvm_bench.py's generality set on tvm-hexagon: kernels, exactness, task metric vs ORT QDQ."""
    from tvm_bench import _general_entry

    from qcompile import numerics

    e, samples, metric, setting = _general_entry(key)
    art = driver.compile(str(e.model), calib=str(e.calib), recipe="w8a8", target="tvm-hexagon",
                         out_dir=work / key.replace(":", "-"), max_samples=max_samples, check_numerics=False,
                         measure_latency=False)
    outs = hexagon.TvmHexagonTarget().runner(art.out_dir).run(samples)  # one qemu-hexagon start
    ref = [numerics.run(numerics.session(str(e.model), optimize=True), s) for s in samples]
    ort_q = numerics.session(str(art.out_dir / "model.qdq.onnx"), optimize=True)
    lsb = art.report["lsb_vs_reference"]["tvm-hexagon"]
    meta = hexagon.frontend.read_meta(art.out_dir / hexagon.SUBDIR)
    return {"model": key, "setting": setting, "kernels": meta["vrmpy_kernels"],
            "generic": len(meta["generic_int8_kernels"]), "exact": lsb.get("integer_ops_exact"),
            "equal": lsb.get("equal"), "metric": metric(outs, ref),
            "metric_ort": metric([numerics.run(ort_q, s) for s in samples], ref), "n": len(samples),
            "packets": hexagon.packets_per_inference(art.out_dir, samples[0])}


def general_table(rows: list[dict]) -> str:
    lines = ["| model (export setting) | int8 kernels on vrmpy / generic | packets/inference HVX | samples | "
             "metric tvm-hexagon | metric ORT QDQ | integer ops bit-exact | int tensors equal (report) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} ({r['setting']}) | {r['kernels']} / {r['generic']} | {r['packets']} | {r['n']} | "
                     f"{r['metric']:.4f} | {r['metric_ort']:.4f} | {r['exact']} | {r['equal']:.2%} |")
    return "\n".join(lines)


def table(rows: list[dict]) -> str:
    head = ("| model | packets/inference HVX | packets/inference scalar | scalar / HVX | vrmpy in kernels.o | "
            "int8 kernels on vrmpy / generic | top-1 tvm-hexagon | top-1 ORT QDQ | integer ops bit-exact | "
            "int tensors equal (report) | build s |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        lines.append(f"| {r['model']} | {r['hvx']} | {r['scalar']} | {r['scalar'] / r['hvx']:.1f}x | {r['vrmpy']} | "
                     f"{r['kernels']} / {r['generic']} | {r['top1']:.4f} | {r['top1_ort']:.4f} | {r['exact']} | "
                     f"{r['equal']:.2%} | {r['build_s']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="*", default=MODELS)
    ap.add_argument("--general", nargs="*", default=[], help="tools/tvm_bench.py generality-set keys, e.g. "
                    "reexport:mobilenetv2-digits corpus:ppocr-cls")
    ap.add_argument("--max-samples", type=int, default=32)
    ap.add_argument("--out", default="BENCHMARKS.md")
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="hexagon_bench-") as tmp:
        rows = [row(name, Path(tmp), a.max_samples) for name in a.models]
        general = [general_row(key, Path(tmp), a.max_samples) for key in a.general]
    cmd = "python tools/hexagon_bench.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    where = (f"`{cmd.strip()}`, {time.strftime('%Y-%m-%d')}; packets are Hexagon VLIW bundles per inference (a QEMU "
             "plugin's count of a 2-sample run minus a 1-sample run)")
    if rows:  # each table owns its section: a run of one set keeps the other
        print(table(rows))
        replace_section(Path(a.out), START, END,
                        f"{START}\n## Hexagon DSP v66, HVX 128 B (qemu-hexagon 7.2)\n\n{where}; top-1 over the zoo "
                        f"test set.\n\n{table(rows)}\n{END}")
    if general:
        print(general_table(general))
        replace_section(Path(a.out), GSTART, GEND,
                        f"{GSTART}\n### Hexagon: exports not in the zoo\n\n{where}; task metric against fp32 as "
                        f"tools/tvm_bench.py's generality set computes it.\n\n{general_table(general)}\n{GEND}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
