"""tvm-x86 compile time and latency with and without the float ``Let`` buffers before LLVM code generation
(``qcompile/targets/tvm/kernels/let_buffers.py``), on zoo models and on Conv -> activations -> Conv modules.

    python tools/let_buffers_bench.py                                  # minilm, vit-digits, three activation chains
    python tools/let_buffers_bench.py --models minilm --chains mish mish+softplus --rounds 9
    python tools/let_buffers_bench.py --chains mish+softplus --timeout 600   # "off" builds may not finish

Per model: one QDQ model (w8a8), built for tvm-x86 twice, with the pass (as qcompile builds) and without it (TVM's
code generator gets the ``Let`` chains); compile seconds of each (``qcompile.compile``, calibration included, the
same in both); batch-1 latency (``qcompile.driver.bench_artifact``: the median of ``--runs`` runs, in ``--rounds``
rounds that alternate the two builds, the median of those); whether both builds' outputs are equal. A
build without the pass that exceeds ``--timeout`` seconds is reported as such (run in a child process and killed).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ACTS = ("mish", "softplus", "gelu", "silu", "tanh", "sigmoid")


def chain_model(chain: str, folder: Path) -> tuple[Path, Path, dict]:
    """Conv(3->8, 3x3) -> the activations of ``chain`` ("mish+softplus") -> Conv(8->4, 1x1), exported by torch.onnx
    (TorchScript, opset 17, dynamic batch); its calibration file and one test input."""
    import torch
    import torch.nn.functional as F

    fns = {"mish": F.mish, "softplus": F.softplus, "gelu": F.gelu, "silu": F.silu, "tanh": torch.tanh,
           "sigmoid": torch.sigmoid}

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.a, self.b = torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Conv2d(8, 4, 1)

        def forward(self, x):
            y = self.a(x)
            for act in chain.split("+"):
                y = fns[act](y)
            return self.b(y)

    rng = np.random.default_rng(0)
    path, calib = folder / f"{chain}.onnx", folder / f"{chain}.calib.npy"
    torch.onnx.export(Net().eval(), (torch.zeros(1, 3, 16, 16),), str(path), input_names=["x"], opset_version=17,
                      dynamo=False, dynamic_axes={"x": {0: "n"}})
    np.save(calib, rng.standard_normal((16, 3, 16, 16)).astype(np.float32))
    return path, calib, {"x": rng.standard_normal((1, 3, 16, 16)).astype(np.float32)}


def zoo_model(name: str) -> tuple[Path, Path, dict]:
    import onnx
    import qcompile_zoo

    e = qcompile_zoo.build(name)
    names = {i.name for i in onnx.load(str(e.model)).graph.input}
    return e.model, e.calib, {k: v[:1] for k, v in np.load(e.test).items() if k in names}


def _build(model: str, calib: str, out: str, passes: bool, conn) -> None:
    """Child process: compile, report seconds (the artifact stays in ``out``)."""
    import tvm

    import qcompile
    import qcompile.targets.tvm.kernels.let_buffers as lb

    if not passes:
        lb.let_buffers_pass = lambda: tvm.transform.Sequential([])
    t = time.perf_counter()
    try:
        qcompile.compile(model, calib=calib, recipe="w8a8", target="tvm-x86", out_dir=out, measure_latency=False,
                         check_numerics=False)
        conn.send({"s": time.perf_counter() - t})
    except Exception as exc:  # noqa: BLE001 - a failed build is a row
        conn.send({"error": f"{type(exc).__name__}: {str(exc)[:120]}"})


def bench(name: str, model: Path, calib: Path, example: dict, runs: int, rounds: int, timeout: float,
          work: Path) -> dict:
    from qcompile import driver

    row: dict = {"model": name}
    built = {}
    for variant, passes in (("let_buffers", True), ("off", False)):
        out = work / f"{name}-{variant}"
        parent, child = mp.Pipe()
        proc = mp.get_context("spawn").Process(target=_build, args=(str(model), str(calib), str(out), passes, child))
        proc.start()
        proc.join(timeout)
        if proc.is_alive():
            proc.kill()
            proc.join()
            row[f"{variant}_s"] = f"> {timeout:.0f} (killed)"
            continue
        got = parent.recv() if parent.poll() else {"error": f"exit {proc.exitcode}"}
        row[f"{variant}_s"] = round(got["s"], 1) if "s" in got else got["error"]
        if "s" in got:
            built[variant] = out
    if len(built) == 2:
        outs = {v: driver.run_artifact(out, example) for v, out in built.items()}
        row["outputs_equal"] = all(np.array_equal(outs["off"][k], outs["let_buffers"][k]) for k in outs["off"])
        medians: dict = {v: [] for v in built}
        for _ in range(rounds):  # interleaved: the machine's drift reaches both alike
            for v, out in built.items():
                medians[v].append(driver.bench_artifact(out, example, runs=runs, compare=0)["median_ms"])
        med = {v: statistics.median(m) for v, m in medians.items()}
        row.update({"off_ms": round(med["off"], 3), "let_buffers_ms": round(med["let_buffers"], 3),
                    "latency_ratio": round(med["let_buffers"] / med["off"], 3)})
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="*", default=["minilm", "vit-digits"], help="zoo models")
    ap.add_argument("--chains", nargs="*", default=["mish", "gelu", "mish+softplus"],
                    help=f"activation chains, '+'-joined from {ACTS}")
    ap.add_argument("--runs", type=int, default=20, help="timed runs per round")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds; the median of their medians")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per build before it is killed")
    args = ap.parse_args(argv)
    bad = [c for c in args.chains if any(a not in ACTS for a in c.split("+"))]
    if bad:
        ap.error(f"unknown activations in {bad}; known: {ACTS}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="let-buffers-") as tmp:
        work = Path(tmp)
        for name in args.models:
            rows.append(bench(name, *zoo_model(name), args.runs, args.rounds, args.timeout, work))
            print(json.dumps(rows[-1]), file=sys.stderr)
        for chain in args.chains:
            rows.append(bench(f"conv-{chain}-conv", *chain_model(chain, work), args.runs, args.rounds, args.timeout,
                              work))
            print(json.dumps(rows[-1]), file=sys.stderr)
    cols = ["model", "let_buffers_s", "off_s", "let_buffers_ms", "off_ms", "latency_ratio", "outputs_equal"]
    print(f"`python tools/let_buffers_bench.py {' '.join(sys.argv[1:] if argv is None else argv)}` (tvm-x86, w8a8, "
          f"batch 1, median of {args.rounds} interleaved rounds' medians of {args.runs} runs; `_s`: compile "
          f"seconds)\n")
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(r.get(c, "-")) for c in cols) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
