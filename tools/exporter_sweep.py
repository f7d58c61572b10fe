"""Models other frameworks exported: Keras 3 models (TensorFlow backend) through tf2onnx and PaddlePaddle models
through paddle2onnx, built with random weights (no downloads), exported as their users export them, then compiled by
qcompile. A robustness sweep like tools/arch_sweep.py (same row format, same caveat: random weights say nothing about
accuracy): every crash and every decline here is one a user with a trained model of that kind meets.

    bash tools/setup-exporters                               # once: a venv with TF/Keras/tf2onnx/Paddle/paddle2onnx
    python tools/exporter_sweep.py                           # every model, w8a8, onnxruntime + tvm-x86
    python tools/exporter_sweep.py --models keras:mobilenet_v3_small paddle:resnet18 --targets tvm-opencl
    python tools/exporter_sweep.py --opset 11                # as older converters write them (upgraded on load)
    python tools/exporter_sweep.py --keep /tmp/ex --targets tvm-hexagon   # exports kept; a second run reuses them

The exporters run in their own environment (tools/export_worker.py under ``--python``, default the venv that
tools/setup-exporters makes), one subprocess per model; the compile runs here. A table goes to stdout, progress to
stderr.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).parent))
from arch_sweep import compile_rows, print_table, quiet_logs, work_folder  # noqa: E402

log = logging.getLogger("exporter_sweep")
HERE = Path(__file__).parent
WORKER = HERE / "export_worker.py"
DEFAULT_PYTHON = Path(os.environ.get("QC_EXPORTERS_VENV", "/opt/qcompile/exporters-venv")) / "bin" / "python"


def listed(python: Path) -> list[str]:
    """``family:model`` for every model the worker can export."""
    out = subprocess.run([str(python), str(WORKER), "--list"], capture_output=True, text=True, check=True).stdout
    return [":".join(line.split()) for line in out.splitlines() if line.strip()]


def export(python: Path, spec: str, work: Path, timeout_s: float, opset: int | None = None,
           reuse: bool = False) -> dict:
    """Runs the worker for ``family:model`` (at ``opset``, default the exporter's): its JSON line, or ``{"error":
    ...}`` with the worker's last words. ``reuse``: an export this function finished before in ``work`` (its JSON
    line kept beside the model) is taken as it is."""
    family, model = spec.split(":", 1)
    done = work / f"{model}.export.json"
    if reuse and done.is_file() and (work / f"{model}.onnx").is_file():
        log.info("reusing the export in %s", work)
        return json.loads(done.read_text())
    at = ["--opset", str(opset)] if opset is not None else []
    try:
        p = subprocess.run([str(python), str(WORKER), "--family", family, "--model", model, "--out", str(work), *at],
                           capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"error": f"export ran past {timeout_s:.0f} s"}
    if p.returncode != 0:
        last = [ln for ln in p.stderr.splitlines() if ln.strip()][-1:] or [f"exit {p.returncode}"]
        return {"error": f"export failed: {last[0][:160]}"}
    info = json.loads(p.stdout.strip().splitlines()[-1])
    done.write_text(json.dumps(info))
    return info


def sweep_one(python: Path, spec: str, targets: list[str], recipes: list[str], work: Path,
              timeout_s: float, opset: int | None = None, reuse: bool = False) -> list[dict]:
    family, model = spec.split(":", 1)
    key = {"family": family, "model": model}
    work = work / family / (f"opset{opset}" if opset else "")  # the families share model names
    info = export(python, spec, work, timeout_s, opset, reuse)
    if "error" in info:
        return [{**key, "target": "-", "result": info["error"]}]
    path = work / f"{model}.onnx"
    opset = next((o.version for o in onnx.load(str(path), load_external_data=False).opset_import
                  if o.domain in ("", "ai.onnx")), None)
    with np.load(work / f"{model}.test.npz") as t:
        test = {k: t[k] for k in t.files}
    rows = compile_rows(key, path, work / f"{model}.calib.npz", test, targets, recipes, work)
    return [{**r, "export": f"{info.get('exporter', '?')}, opset {opset}"} for r in rows]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--python", type=Path, default=DEFAULT_PYTHON,
                    help="the exporters' interpreter (tools/setup-exporters prints it)")
    ap.add_argument("--models", nargs="*", help="family:model pairs (default: every one the worker lists)")
    ap.add_argument("--targets", nargs="*", default=["onnxruntime", "tvm-x86"])
    ap.add_argument("--recipes", nargs="*", default=["w8a8"])
    ap.add_argument("--export-timeout", type=float, default=900.0)
    ap.add_argument("--opset", type=int, help="export at this opset (default: each exporter's own; 11 is the oldest "
                    "qcompile takes, and the file is upgraded on load)")
    ap.add_argument("--keep", type=Path, help="keep the exported models and outputs here; a later run with the same "
                    "folder takes the exports it finds there (the exporters' environment is slow to start)")
    ap.add_argument("--reexport", action="store_true", help="with --keep: export again even where an export is kept")
    args = ap.parse_args(argv)
    quiet_logs("qcompile")
    if not args.python.is_file():
        ap.error(f"no exporters' interpreter at {args.python}: run `bash tools/setup-exporters` or pass --python")
    known = listed(args.python)
    models = args.models or known
    unknown = [m for m in models if m not in known]
    if unknown:
        ap.error(f"unknown models {unknown}; known: {known}")
    rows = []
    with work_folder(args.keep) as work:
        for spec in models:
            log.info("== %s", spec)
            rows += sweep_one(args.python, spec, args.targets, args.recipes, work, args.export_timeout, args.opset,
                              reuse=args.keep is not None and not args.reexport)
    print(f"`python tools/exporter_sweep.py {' '.join(sys.argv[1:])}` (onnx {onnx.__version__})\n")
    print_table(rows, ["family", "model", "export", "recipe", "target", "result", "cosine", "min_layer_sqnr",
                       "int_equal", "main_equal", "s"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
