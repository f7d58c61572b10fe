"""tvm-aarch64: the integer Relax module cross-compiled for AArch64 Linux (NEON + dotprod), no TVM runtime.

TVM's LLVM back end writes the kernels as an AArch64 object; ``static_c`` adds the generated call sequence with one
planned arena and a batch runner, linked statically by Debian's ``aarch64-linux-gnu-gcc``. ``run`` executes it
under ``qemu-aarch64`` (or natively on an AArch64 host). Two builds: ``tvm-aarch64/main`` (the model) and
``tvm-aarch64/probe`` (the same graph also returning every integer tensor, for the report's LSB comparison).

Remote AArch64 devices behind a TVM RPC tracker (``rpc`` / ``key``): ``tune_trials`` N MetaSchedule trials, each
candidate cross-compiled here into a shared library and timed on a device the tracker hands out (the database in
``tvm-aarch64/tuning/`` or ``tune_db``; kernels without a record keep the rule's schedule); ``runner(out, rpc,
key)`` links a build's model.c and kernels.o once more as a shared library the device's TVM runtime loads
(:class:`~.rpc.RemoteStaticRunner`). Without a board, :class:`~.rpc.LocalCluster` (``arch="aarch64"``) serves
AArch64 Pythons with TVM's aarch64 wheels under qemu-aarch64.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx

from qcompile.targets.base import BatchRunner, CompiledTarget, require_tools
from qcompile.targets.tvm.executors import static_c
from qcompile.targets.tvm.frontend import program as frontend
from qcompile.targets.tvm.pipeline import generic_phases

logger = logging.getLogger(__name__)

SUBDIR = "tvm-aarch64"
TUNING = "tuning"
TARGET = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon", "+dotprod"]}
CC = ["aarch64-linux-gnu-gcc", "-O2", "-static"]
SHARED_CC = ["aarch64-linux-gnu-gcc", "-O2", "-shared", "-fPIC"]  # a build as a library a device's TVM loads
TOOLS = ("aarch64-linux-gnu-gcc", "qemu-aarch64")


class TvmAarch64Target(CompiledTarget):
    name = "tvm-aarch64"
    target = TARGET

    def __init__(self, tune_trials: int = 0, tune_db: Path | str | None = None, rpc: str | None = None,
                 key: str | None = None) -> None:
        """`tune_trials` > 0 with `rpc` (tracker ``HOST:PORT``) and `key`: MetaSchedule-tune the fused kernels,
        measured on the AArch64 devices with that key, into `tune_db` (default ``OUT/tvm-aarch64/tuning/``); a
        database that exists is applied even with `tune_trials` = 0."""
        from qcompile.targets.tvm.rpc import tuning_options

        self.tune_trials, self.rpc = tuning_options(
            tune_trials, rpc, key, need_rpc="tuning tvm-aarch64 times candidates on AArch64 devices")
        self.tune_db = Path(tune_db) if tune_db is not None else None

    def pipeline(self, spec: dict | None = None) -> list:
        """The rule, after a tuning database's kernels where ``spec`` = ``{"database": folder}``."""
        return generic_phases((spec or {}).get("database"))

    def build(self, model: onnx.ModelProto, out_dir: Path, example: dict[str, np.ndarray] | None = None
              ) -> dict[str, str]:
        import tvm

        require_tools(TOOLS, self.name)
        prog = frontend.lower_to_relax(model, example)
        sub = Path(out_dir) / SUBDIR
        db, tune_meta = self._tune(prog.mod, sub / TUNING)
        facts = static_c.build_entries(prog, sub, self.target, cc=CC, entry="runner",
                                       schedule=self.pipeline({"database": db}))
        frontend.write_meta(sub, prog, {"target": self.target, "tvm": tvm.__version__,
                                        **static_c.memory_facts(facts["main"]), **tune_meta})
        return {"tvm_runner": f"{SUBDIR}/main/runner", "tvm_meta": f"{SUBDIR}/{frontend.META_FILE}"}

    def _tune(self, mod, default_db: Path) -> tuple[Path | None, dict]:
        import tvm
        from tvm.support import cc

        from qcompile.targets.tvm.schedules import tune

        return tune.tune_for_build(mod, tvm.target.Target(self.target), self.tune_trials,
                                   self.tune_db or default_db, rpc=self.rpc,
                                   fcompile=cc.cross_compiler(SHARED_CC[0]), num_cores=1)

    def runner(self, out_dir: Path, rpc: str | None = None, key: str | None = None) -> BatchRunner:
        """Under qemu-aarch64 here, or (``rpc`` = tracker ``HOST:PORT``, ``key``) on an AArch64 device behind a
        TVM RPC tracker."""
        sub = Path(out_dir) / SUBDIR
        meta = frontend.read_meta(sub)
        if rpc is not None:
            from qcompile.targets.tvm.rpc import RemoteStaticRunner

            require_tools([SHARED_CC[0]], self.name)
            return RemoteStaticRunner(sub, meta, rpc, key or "", SHARED_CC)
        require_tools(TOOLS, self.name)
        return static_c.ProcessRunner(sub, meta)
