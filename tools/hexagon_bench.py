"""Hexagon DSP figures per zoo model (tvm-hexagon under qemu-hexagon); writes a section of BENCHMARKS.md.

    python tools/hexagon_bench.py                        # digits-cnn, mobilenetv2-digits, vit-digits
    python tools/hexagon_bench.py --models digits-cnn

Per model (recipe w8a8): Hexagon packets (VLIW bundles, QEMU's instruction unit for Hexagon) per inference of the
HVX build (int8 conv/matmul on vrmpy) beside a scalar build of the same model (--no-hvx), counted by a QEMU TCG
plugin; vrmpy instructions in the kernels' disassembly; top-1 over the zoo test set for the HVX build and for ONNX
Runtime's QDQ model; the report's integer comparison with the reference (every integer tensor of its samples).
Packet counts are deterministic: they do not depend on the machine's load.
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
    ap.add_argument("--models", nargs="+", default=MODELS)
    ap.add_argument("--max-samples", type=int, default=32)
    ap.add_argument("--out", default="BENCHMARKS.md")
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="hexagon_bench-") as tmp:
        rows = [row(name, Path(tmp), a.max_samples) for name in a.models]
    body = table(rows)
    print(body)
    cmd = "python tools/hexagon_bench.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    section = (f"{START}\n## Hexagon DSP v66, HVX 128 B (qemu-hexagon 7.2)\n\n`{cmd.strip()}`, "
               f"{time.strftime('%Y-%m-%d')}; top-1 over the zoo test set ({rows[0]['n']} images); packets are "
               f"Hexagon VLIW bundles per inference (a QEMU plugin's count of a 2-sample run minus a 1-sample run)."
               f"\n\n{body}\n{END}")
    replace_section(Path(a.out), START, END, section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
