#!/usr/bin/env python
"""Tuning wall time with the candidates measured on 1 vs N loopback RPC servers, same model and trials.

    python tools/rpc_bench.py --model mobilenetv2-digits --trials 128 --servers 1 2
    python tools/rpc_bench.py --target tvm-aarch64 --model mobilenetv2-digits --trials 64 --servers 1 2

Per server count: a fresh tracker + servers (:class:`qcompile.targets.tvm.rpc.LocalCluster`), a fresh tuning
database, ``qcompile`` tvm-x86 (or tvm-aarch64: AArch64 servers under qemu-aarch64,
``LocalCluster(arch="aarch64")``; candidates cross-compiled here) with ``--tune-trials T --rpc ... --key ...``; the
row gives the tuning seconds
(``meta.json`` ``tune_s``: seeds, search, builds and remote measurements), the records written, how many
candidates each server measured (its log's ``load_module`` lines), and whether the tuned build is bit-exact with
the integer reference. On loopback every server shares this machine's cores with the builder, so the ratio
says how much of the tuning time is measurement that a second device takes over, not what a farm of separate
boards gives. Writes its table into BENCHMARKS.md between markers.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import qcompile_zoo as zoo  # noqa: E402
from benchmd import replace_section  # noqa: E402
from qcompile import driver  # noqa: E402
from qcompile.targets.tvm.rpc import LocalCluster  # noqa: E402
from qcompile.targets.tvm.schedules import tune  # noqa: E402

ARCH = {"tvm-x86": None, "tvm-aarch64": "aarch64"}  # the servers' architecture per target


def markers(target: str) -> tuple[str, str]:
    tag = "" if target == "tvm-x86" else f" {target}"
    return f"<!-- rpc_bench.py{tag}:start -->", f"<!-- rpc_bench.py{tag}:end -->"
MEASURED = re.compile(r"load_module .*tvm_tmp_mod\.so")


def log(msg: str) -> None:
    print(f"[rpc_bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def one(target: str, model: str, trials: int, servers: int, work: Path) -> dict:
    e = zoo.build(model)
    out, db = work / f"out-{servers}", work / f"db-{servers}"
    with LocalCluster(servers, log_dir=work / f"logs-{servers}", arch=ARCH[target]) as cluster:
        log(f"{model}: {servers} server(s) up at {cluster.address}; tuning {trials} trials")
        t0 = time.perf_counter()
        art = driver.compile(str(e.model), calib=str(e.calib), recipe="w8a8", target=target, out_dir=out,
                             max_samples=8, check_numerics=False, measure_latency=False,
                             target_options={"tune_trials": trials, "tune_db": str(db), "rpc": cluster.address,
                                             "key": cluster.key})
        wall = time.perf_counter() - t0
        per_server = [len(MEASURED.findall(cluster.server_log(i).read_text(errors="replace")))
                      for i in range(servers)]
    meta = json.loads((out / target / "meta.json").read_text())
    lsb = art.report["lsb_vs_reference"][target]
    return {"servers": servers, "tune_s": meta["tune_s"], "compile_s": wall, "records": tune.records(db),
            "per_server": per_server, "exact": lsb.get("integer_ops_exact")}


def table(target: str, model: str, trials: int, rows: list[dict], cmd: str) -> str:
    base = rows[0]["tune_s"]
    start, end = markers(target)
    where = ("" if target == "tvm-x86" else " The servers are AArch64 processes emulated by qemu-aarch64 (TVM's "
             "aarch64 wheels); candidates are cross-compiled with aarch64-linux-gnu-gcc.")
    title = "" if target == "tvm-x86" else f" ({target}, emulated devices)"
    lines = [start, f"## Tuning on remote devices: 1 vs N loopback RPC servers{title}", "",
             f"`{cmd}` on {time.strftime('%Y-%m-%d')}: {model}, {trials} trials, a fresh database per row.{where} "
             "Candidates built here, measured by MetaSchedule's RPCRunner on the servers the tracker hands out. "
             "On loopback the servers share this 2-core machine with the builder.", "",
             "| servers | tuning s (x 1 server) | compile s | records | candidates measured per server | "
             "tuned build bit-exact |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['servers']} | {r['tune_s']:.1f} ({r['tune_s'] / base:.2f}x) | {r['compile_s']:.1f} | "
                     f"{r['records']} | {' / '.join(map(str, r['per_server']))} | {r['exact']} |")
    lines.append(end)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default="tvm-x86", choices=sorted(ARCH))
    ap.add_argument("--model", default="mobilenetv2-digits")
    ap.add_argument("--trials", type=int, default=128)
    ap.add_argument("--servers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--out", default="BENCHMARKS.md")
    a = ap.parse_args(argv)
    cmd = "python tools/rpc_bench.py " + " ".join(argv if argv is not None else sys.argv[1:])
    with tempfile.TemporaryDirectory(prefix="qc-rpc-bench-") as tmp:
        rows = [one(a.target, a.model, a.trials, n, Path(tmp)) for n in a.servers]
    text = table(a.target, a.model, a.trials, rows, cmd.strip())
    print(text)
    replace_section(Path(a.out), *markers(a.target), text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
