#!/usr/bin/env python
"""A TVM RPC tracker and N servers on loopback, to try ``--rpc`` without devices (and for the tests).

    python tools/rpc_local.py --servers 2 --key qc-local
    # prints: tracker 127.0.0.1:PORT key qc-local, servers' logs in FOLDER; Ctrl-C stops them
    qcompile compile M.onnx --calib C.npz --target tvm-x86 --tune-trials 64 --rpc 127.0.0.1:PORT --key qc-local -o OUT
    qcompile run OUT --inputs X.npz -o Y.npz --rpc 127.0.0.1:PORT --key qc-local
    qcompile bench OUT --inputs X.npz --rpc 127.0.0.1:PORT --key qc-local

    python tools/rpc_local.py --servers 2 --arch aarch64   # AArch64 devices: TVM's rpc_server under qemu-aarch64
    qcompile compile M.onnx --calib C.npz --target tvm-aarch64 --tune-trials 64 --rpc 127.0.0.1:PORT --key qc-local \
        -o OUT

The same processes TVM documents (``python -m tvm.exec.rpc_tracker`` / ``rpc_server --tracker ... --key ...``),
started by :class:`qcompile.targets.tvm.rpc.LocalCluster`.
"""
from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qcompile.targets.tvm.rpc import LocalCluster  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--servers", type=int, default=2)
    ap.add_argument("--key", default="qc-local")
    ap.add_argument("--arch", default=None, choices=["aarch64"],
                    help="servers for another architecture, emulated (tools/setup's AArch64 Python + TVM)")
    ap.add_argument("--logs", default=None, help="folder for the tracker's and servers' logs (default: a temp one)")
    a = ap.parse_args(argv)
    with LocalCluster(a.servers, a.key, Path(a.logs) if a.logs else None, arch=a.arch) as cluster:
        print(f"tracker {cluster.address} key {cluster.key}, {a.servers} servers; logs in {cluster.log_dir}; "
              "Ctrl-C stops them", flush=True)
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        try:
            while all(p is None or p.poll() is None for p in [cluster.tracker, *cluster.servers]):
                time.sleep(1)
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
