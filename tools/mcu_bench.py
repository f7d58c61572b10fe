"""Cortex-M4 firmware figures per zoo CNN (QEMU mps2-an386); writes a section of BENCHMARKS.md.

    python tools/mcu_bench.py                       # digits-cnn, mobilenetv2-digits, resnet-digits
    python tools/mcu_bench.py --models digits-cnn

Per model (recipe w8a8, target mcu-cortex-m4): flash and RAM from arm-none-eabi-size, int8 weight bytes, the
static arena beside its liveness lower bound (largest total of simultaneously live tensors), the stack high-water
mark measured in QEMU (stack painting), instructions per inference (QEMU -icount), top-1 on the zoo test set for
the firmware and for the ONNX Runtime QDQ model, and whether every integer tensor equals the reference.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import qcompile_zoo as zoo
from benchmd import replace_section
from qcompile import driver

START, END = "<!-- mcu_bench.py:start -->", "<!-- mcu_bench.py:end -->"
MODELS = ["digits-cnn", "mobilenetv2-digits", "resnet-digits"]
PLAN_MODELS = ["resnet18-224"]  # zoo CNNs too large for a microcontroller: arena plan only


def row(name: str, work: Path, max_samples: int) -> dict:
    e = zoo.build(name)
    t0 = time.perf_counter()
    art = driver.compile(str(e.model), calib=str(e.calib), recipe="w8a8", target="mcu-cortex-m4",
                         out_dir=work / name, max_samples=max_samples, check_numerics=False, measure_latency=False)
    build_s = time.perf_counter() - t0
    meta = json.loads((work / name / "mcu-cortex-m4" / "meta.json").read_text())
    mem = meta["memory"]
    with np.load(e.test) as t:
        test = {k: t[k] for k in t.files}
    labels = np.load(e.labels)
    fw = art.run(test)
    ort = art.run(test, target="onnxruntime")
    lsb = art.report["lsb_vs_reference"]["mcu-cortex-m4"]
    return {"model": name, **mem, "build_s": build_s, "exact": lsb.get("integer_ops_exact") and lsb.get("max_lsb") == 0,
            "top1_fw": float(np.mean(next(iter(fw.values())).argmax(-1) == labels)),
            "top1_ort": float(np.mean(next(iter(ort.values())).argmax(-1) == labels)), "n": len(labels)}


def plan_row(name: str, work: Path, max_samples: int) -> dict:
    """The Cortex-M4 lowering, kernels and arena plan of a model no microcontroller holds (no firmware, no QEMU):
    the planner's arena against the liveness bound, with the kernels' workspaces, as the firmware would get."""
    import onnx

    from qcompile import dataset
    from qcompile.targets.tvm.executors import static_c
    from qcompile.targets.tvm.frontend import program as frontend
    from qcompile.targets.tvm.pipeline import mcu_phases
    from qcompile.targets.tvm.mcu import CORTEX_M4

    e = zoo.build(name)
    driver.compile(str(e.model), calib=str(e.calib), recipe="w8a8", target="onnxruntime", out_dir=work / name,
                   max_samples=max_samples, check_numerics=False, measure_latency=False)
    q = onnx.load(str(work / name / "model.qdq.onnx"))
    with np.load(e.calib) as c:
        example = dataset.split_samples(q, {k: c[k] for k in c.files}, "calib")[0]
    prog = frontend.lower_to_relax(q, example, quantized_io=True, probe=False)
    target = CORTEX_M4.target
    program = static_c.lower_static(frontend.entry_module(prog.mod, "main"), target, output_names=prog.returns,
                                    schedule=mcu_phases(target))
    facts = static_c.build_kernels(program, target, work / name / "kernels.o")
    plan = static_c.plan_with_workspace(program, facts["workspace_per_kernel"])
    weights = sum(b.nbytes for b in program.buffers.values() if b.kind == "const")
    return {"model": name, "arena_bytes": plan.arena_bytes, "arena_lower_bound": plan.lower_bound,
            "weights_bytes": weights, "steps": len(program.steps)}


def plan_table(rows: list[dict]) -> str:
    lines = ["| model | constants (weights) B | kernels | arena B | lower bound B | arena/bound |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['weights_bytes']} | {r['steps']} | {r['arena_bytes']} | "
                     f"{r['arena_lower_bound']} | {r['arena_bytes'] / max(r['arena_lower_bound'], 1):.3f} |")
    return "\n".join(lines)


def table(rows: list[dict]) -> str:
    head = ("| model | flash B | int8 weights B | flash - weights B | RAM B | arena B | lower bound B | arena/bound "
            "| stack used B | instructions/inference | top-1 firmware | top-1 ORT QDQ | integer tensors = reference | "
            "build s |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['flash_bytes']} | {r['weights_bytes']} | {r['flash_bytes'] - r['weights_bytes']} "
            f"| {r['ram_bytes']} | {r['arena_bytes']} | {r['arena_lower_bound']} | {r['arena_ratio']:.3f} "
            f"| {r['stack_used']} | {r.get('instructions_per_inference', '-')} | {r['top1_fw']:.4f} "
            f"| {r['top1_ort']:.4f} | {r['exact']} | {r['build_s']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=MODELS)
    ap.add_argument("--plan-models", nargs="*", default=PLAN_MODELS,
                    help="models too large for a microcontroller: arena plan only")
    ap.add_argument("--max-samples", type=int, default=32)
    ap.add_argument("--out", default="BENCHMARKS.md")
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="mcu_bench-") as tmp:
        rows = [row(name, Path(tmp), a.max_samples) for name in a.models]
        plans = [plan_row(name, Path(tmp), a.max_samples) for name in a.plan_models]
    body = table(rows)
    if plans:
        body += ("\n\nArena plan of the zoo CNNs no microcontroller holds (same lowering, DSP kernels and planner; "
                 "no firmware built):\n\n" + plan_table(plans))
    print(body)
    cmd = "python tools/mcu_bench.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    section = (f"{START}\n## Cortex-M4 firmware (QEMU mps2-an386)\n\n`{cmd.strip()}`, {time.strftime('%Y-%m-%d')}; "
               f"top-1 over the zoo test set ({rows[0]['n']} images).\n\n{body}\n{END}")
    replace_section(Path(a.out), START, END, section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
