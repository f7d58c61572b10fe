"""Running a static build: the hosted runner as one process over a batch (under QEMU user mode for another
architecture), or the shared library in this process (ctypes), with a per-kernel profile."""
from __future__ import annotations

import json
import logging
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np
from qcompile.errors import TargetError

logger = logging.getLogger(__name__)
from qcompile.targets.base import require_tools
from qcompile.targets.tvm.executors.static_c.emit_c import ENTRIES, _link
from qcompile.targets.tvm.executors.static_c.program import ALIGN, KERNEL_PREFIX


def _launcher(triple: str) -> list[str]:
    arch = triple.split("-")[0]
    host = platform.machine().lower()
    if arch == host or (arch, host) in {("x86_64", "amd64"), ("aarch64", "arm64")}:
        return []
    if arch in ("aarch64", "hexagon"):
        require_tools([f"qemu-{arch}"], "static C")
        return [shutil.which(f"qemu-{arch}")]
    raise TargetError(
        f"static C: cannot run a {triple!r} build here; only hosted aarch64 and hexagon (QEMU user mode) are "
        "supported (Cortex-M needs firmware for qemu-system-arm)"
    )


def pack_inputs(inputs: list[dict], samples, who: str) -> bytes:
    """Every sample's inputs (``inputs``: name, shape, dtype) as little-endian bytes, sample after sample."""
    chunks = []
    for k, sample in enumerate(samples):
        for meta in inputs:
            arr = _checked_input(meta, sample, f"{who}: sample {k}")
            chunks.append(np.ascontiguousarray(arr, dtype=np.dtype(meta["dtype"]).newbyteorder("<")).tobytes())
    return b"".join(chunks)


def _checked_input(meta: dict, sample: dict[str, np.ndarray], who: str) -> np.ndarray:
    """``sample``'s value for the input ``meta`` (name, shape), or one clear error."""
    if meta["name"] not in sample:
        raise TargetError(f"{who} lacks input {meta['name']!r}")
    arr = np.asarray(sample[meta["name"]])
    if list(arr.shape) != list(meta["shape"]):
        raise TargetError(f"{who} input {meta['name']!r} has shape {arr.shape}, built for {tuple(meta['shape'])}")
    return arr


def unpack_outputs(raw: bytes, outputs: list[dict], n: int, who: str) -> list[dict[str, np.ndarray]]:
    """The inverse for ``n`` samples of outputs (name, shape, dtype, nbytes)."""
    per_sample = sum(m["nbytes"] for m in outputs)
    if len(raw) != per_sample * n:
        raise TargetError(f"{who} wrote {len(raw)} bytes, expected {per_sample * n}")
    results, pos = [], 0
    for _ in range(n):
        outs = {}
        for meta in outputs:
            dtype = np.dtype(meta["dtype"]).newbyteorder("<")
            outs[meta["name"]] = np.frombuffer(raw[pos:pos + meta["nbytes"]], dtype=dtype).reshape(meta["shape"]).copy()
            pos += meta["nbytes"]
        results.append(outs)
    return results


def run_static(
    out_dir: Path, samples: list[dict[str, np.ndarray]], *, timeout: float = 300.0, emulator_args: Sequence[str] = ()
) -> list[dict[str, np.ndarray]]:
    """Run the built runner once over all ``samples``; returns one dict of outputs per sample. ``emulator_args`` go
    to QEMU (user mode) where the build runs under it, e.g. a TCG plugin that counts instructions."""
    out_dir = Path(out_dir)
    try:
        info = json.loads((out_dir / "program.json").read_text())
    except (OSError, ValueError) as exc:
        raise TargetError(f"static C: no readable program.json in {out_dir}: {exc}") from exc
    if info.get("binary") != "runner":
        raise TargetError(f"static C: {out_dir} has no hosted runner (emit with cc=... and entry='runner')")
    data = pack_inputs(info["inputs"], samples, "static C")
    launcher = _launcher(info["triple"])
    cmd = [*launcher, *(emulator_args if launcher else ()), str(out_dir / "runner"), "-", "-"]
    try:
        res = subprocess.run(cmd, input=data, capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise TargetError(f"static C: runner timed out after {timeout}s") from exc
    if res.returncode != 0:
        err = res.stderr.decode(errors="replace")
        # the runner's own message first (a device compiler's diagnostics, printed before it, start with "1 error
        # generated."), then the tail of everything
        lines = [ln for ln in err.splitlines() if ln.strip()]
        head = next((ln for ln in lines if ln.startswith("runner:")), lines[-1] if lines else "no output")
        raise TargetError(f"static C: runner failed ({res.returncode}): {head}\n{err[-2000:]}")
    logger.info("static C: %s", res.stderr.decode(errors="replace").strip())
    return unpack_outputs(res.stdout, info["outputs"], len(samples), "static C: runner")


def _aligned_bytes(nbytes: int) -> np.ndarray:
    """A zeroed uint8 array of ``nbytes`` whose data pointer is ALIGN-aligned (the kernels assume it)."""
    raw = np.zeros(nbytes + ALIGN, np.uint8)
    off = (-raw.ctypes.data) % ALIGN
    return raw[off:off + nbytes]


class SharedModel:
    """A ``model.so`` (``emit(..., entry="shared")``) loaded into this process: one C call per sample.

    No TVM runtime and no per-inference allocation: inputs are copied into ALIGN-aligned buffers made once,
    the model writes its outputs into buffers made once, every intermediate lives in the library's static
    arena. The arena makes a loaded model non-reentrant: calls are serialized by a lock.
    """

    def __init__(self, out_dir: Path, library: Path | None = None, threads: int = 1) -> None:
        import ctypes
        import threading

        out_dir = Path(out_dir)
        try:
            info = json.loads((out_dir / "program.json").read_text())
        except (OSError, ValueError) as exc:
            raise TargetError(f"static C: no readable program.json in {out_dir}: {exc}") from exc
        if info.get("binary") != ENTRIES["shared"][1]:
            raise TargetError(f"static C: {out_dir} has no shared library (emit with entry='shared')")
        path = Path(library) if library is not None else out_dir / info["binary"]
        try:
            self._lib = ctypes.CDLL(str(path.resolve()))
        except OSError as exc:
            raise TargetError(f"static C: cannot load {path}: {exc}") from exc
        set_threads = getattr(self._lib, "qc_set_num_threads", None)  # absent from builds before threads existed
        if (set_threads is None and threads != 1) or (set_threads is not None and set_threads(int(threads)) != 0):
            raise TargetError(f"static C: {path} cannot run on {threads} threads (built without QC_THREADS?)")
        self.step_symbols: list[str] = info.get("step_symbols", [])
        self._run = self._lib.qc_model_run
        self._run.restype = ctypes.c_int
        self._run.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
        self._err = self._lib.qc_model_last_error
        self._err.restype = ctypes.c_char_p
        self.inputs, self.outputs = info["inputs"], info["outputs"]
        self._in = [_aligned_bytes(m["nbytes"]) for m in self.inputs]
        self._out = [_aligned_bytes(m["nbytes"]) for m in self.outputs]
        ptrs = ctypes.c_void_p * max(len(self._in), 1)
        self._in_ptrs = ptrs(*[b.ctypes.data for b in self._in])
        self._out_ptrs = (ctypes.c_void_p * max(len(self._out), 1))(*[b.ctypes.data for b in self._out])
        self._lock = threading.Lock()

    def __call__(self, sample: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with self._lock:
            for meta, buf in zip(self.inputs, self._in):
                buf.view(meta["dtype"])[...] = _checked_input(meta, sample, "static C: sample").reshape(-1)
            rc = self._run(self._in_ptrs, self._out_ptrs)
            if rc != 0:
                raise TargetError(f"static C: step {rc - 1} failed: {self._err().decode(errors='replace')}")
            return {m["name"]: buf.view(m["dtype"]).reshape(m["shape"]).copy()
                    for m, buf in zip(self.outputs, self._out)}


def profile_shared(out_dir: Path, cc: list[str], sample: dict[str, np.ndarray], runs: int = 20, threads: int = 1
                   ) -> list[tuple[str, float, int]]:
    """Per-kernel time of a shared build: model.c recompiled with ``-DQC_PROFILE`` (every step timed with
    CLOCK_MONOTONIC) into a temporary library. Returns (kernel, ms per inference, calls per inference), slowest
    first; copies are listed as ``memcpy``."""
    import ctypes

    out_dir = Path(out_dir)
    with tempfile.TemporaryDirectory(prefix="qc-prof-") as tmp:
        lib = Path(tmp) / "model_profile.so"
        _link(cc, out_dir, [], str(lib), flags=("-DQC_PROFILE",))
        model = SharedModel(out_dir, library=lib, threads=threads)
        model(sample)  # warm up, then reset the counters
        n = int(ctypes.c_uint32.in_dll(model._lib, "qc_num_steps").value)
        fn = model._lib.qc_model_profile_ns
        fn.restype = ctypes.POINTER(ctypes.c_uint64)
        counters = fn()
        for i in range(n):
            counters[i] = 0
        for _ in range(runs):
            model(sample)
        per_step = [counters[i] for i in range(n)]
    totals: dict[str, list] = {}
    for symbol, ns in zip(model.step_symbols, per_step):
        name = symbol[len(KERNEL_PREFIX):] if symbol.startswith(KERNEL_PREFIX) else symbol
        t = totals.setdefault(name, [0.0, 0])
        t[0] += ns / runs / 1e6
        t[1] += 1
    return sorted(((k, v[0], v[1]) for k, v in totals.items()), key=lambda r: -r[1])
