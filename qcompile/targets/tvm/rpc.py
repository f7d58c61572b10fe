"""Remote devices behind TVM's RPC tracker: run and time a built artifact there, start a loopback cluster.

The engine is TVM's own (``python -m tvm.exec.rpc_tracker`` / ``rpc_server --tracker HOST:PORT --key K``): a
session is requested from the tracker under a key, which hands out a free server with that key. Nothing here
schedules devices itself.

A static-executor build (``tvm-x86``, ``tvm-aarch64``) is plain C with no TVM runtime. For a remote run its model.c
is linked once more (by the device's compiler: the host's, or ``aarch64-linux-gnu-gcc``) with
``runtime/rpc_entry.c``, which exposes the model as a TVM FFI library function (``qc_run(inputs...,
outputs...)``), so the server's ``load_module`` loads it like any TVM library; inputs and outputs are tensors
allocated on the remote device, and timing is the server's ``time_evaluator`` (the median of repeated runs
measured on the device, not over the network). A device that drops the session mid-run: the
sample is run again on another device with the same key (the tracker hands out whichever is free); where none
is left the error is one line.

Devices of another architecture without a board: :class:`LocalCluster` ``arch="aarch64"`` runs each server as an
AArch64 process under ``qemu-aarch64`` (:func:`emulated_python`: Debian's arm64 Python and TVM's aarch64 wheels,
unpacked by ``tools/setup``), so the whole flow (cross-compiled candidates, uploads, a build run there) is tested.
"""
from __future__ import annotations

import logging
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from qcompile.errors import ConfigError, TargetError
from qcompile.targets.base import BatchRunner, check_inputs

logger = logging.getLogger(__name__)

RPC_ENTRY = "rpc_entry.c"
RPC_FUNC = "qc_run"
REQUEST_TIMEOUT_S = 600.0  # waiting for a device with the key to become free
AARCH64_PYTHON = "/opt/qcompile/aarch64-python"  # tools/setup's AArch64 Python + TVM (emulated servers)
EMULATED_START_S = 300.0  # an emulated server imports TVM under QEMU: ~15 s alone, minutes on a busy machine


def parse_address(address: str) -> tuple[str, int]:
    """``HOST:PORT`` of a tracker, or a ConfigError."""
    host, sep, port = str(address).rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"--rpc wants HOST:PORT of a TVM RPC tracker, not {address!r}")
    return host, int(port)


def tuning_options(tune_trials: int, rpc: str | None, key: str | None,
                   need_rpc: str = "") -> tuple[int, tuple[str, str] | None]:
    """A target's ``tune_trials`` / ``rpc`` / ``key`` options checked: (trials, (tracker, key) or None).
    ``need_rpc``: why this target's tuning must measure on remote devices (empty: it may measure here)."""
    if int(tune_trials) < 0:
        raise ConfigError(f"tune_trials must be >= 0, not {tune_trials}")
    if (rpc is None) != (key is None):
        raise ConfigError("--rpc and --key go together (the tracker HOST:PORT and the device key)")
    if rpc is not None:
        parse_address(rpc)
        if not int(tune_trials):
            raise ConfigError("--rpc measures tuning candidates on remote devices: give --tune-trials N too")
    elif int(tune_trials) and need_rpc:
        raise ConfigError(f"{need_rpc}: give --rpc HOST:PORT --key K (a TVM RPC tracker with such devices)")
    return int(tune_trials), ((rpc, key) if rpc is not None else None)


def _listening(host: str, port: int, timeout_s: float = 10.0) -> str:
    """Empty when something accepts connections at ``host:port``, else why not (TVM's own connect retries a
    refused connection for 60 s)."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return ""
    except OSError as exc:
        return f"{type(exc).__name__}: {exc}"


def _tracker(address: str):
    from tvm import rpc

    host, port = parse_address(address)
    why = _listening(host, port)
    if why:
        raise TargetError(f"cannot reach the RPC tracker at {address}: {why}")
    try:
        return rpc.connect_tracker(host, port)
    except Exception as exc:  # noqa: BLE001 - TVM raises its own error types
        raise TargetError(f"cannot reach the RPC tracker at {address}: {first_line(exc)}") from None


def devices(address: str, key: str) -> tuple[int, int]:
    """(free, total) devices with ``key`` at the tracker (total: the free ones plus those in a session)."""
    try:
        summary = _tracker(address).summary()
    except TargetError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise TargetError(f"the RPC tracker at {address} did not answer: {first_line(exc)}") from None
    free = int(summary.get("queue_info", {}).get(key, {}).get("free", 0))
    total = sum(1 for s in summary.get("server_info", []) if str(s.get("key", "")).split(":", 1)[-1] == key)
    return free, max(total, free)


def request_session(address: str, key: str, wait_s: float = REQUEST_TIMEOUT_S):
    """A session on a free device with ``key`` behind the tracker at ``address``: the tracker queues the request
    until one is free (at most ``wait_s``); a key no server has registered fails at once."""
    if not key:
        raise ConfigError("--rpc needs --key (the device key the servers registered with)")
    if devices(address, key)[1] == 0:
        raise TargetError(f"the RPC tracker at {address} gave no device with key {key!r}: none is registered")
    tracker = _tracker(address)
    try:
        tracker._sock.settimeout(wait_s)  # TVM waits for a free device without a limit
        return tracker.request(key, priority=1, session_timeout=0, max_retry=1)
    except Exception as exc:  # noqa: BLE001
        raise TargetError(f"the RPC tracker at {address} gave no device with key {key!r}: "
                          f"{first_line(exc)}") from None


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[-1][:300] if text else ''}"


def rpc_library(build_dir: Path, cc: list[str], dest: Path, threads: int = 1) -> Path:
    """``build_dir``'s model (a static-executor build: model.c, qc_runtime.c, kernels.o) linked with
    ``rpc_entry.c`` into ``dest`` (a shared library TVM's ``load_module`` loads)."""
    import tvm_ffi

    from qcompile.targets.tvm.executors.static_c.emit_c import _link
    from qcompile.targets.tvm.executors.static_c.program import RUNTIME_DIR

    flags = (f"-I{tvm_ffi.libinfo.find_include_path()}", f"-I{tvm_ffi.libinfo.find_dlpack_include_path()}",
             f"-DQC_RPC_THREADS={int(threads)}")
    _link(cc, Path(build_dir), [str(Path(RUNTIME_DIR) / RPC_ENTRY)], str(dest), flags=flags)
    return dest


class _Remote:
    """One build (``main`` or ``probe``) loaded on a device: the session, the module and tensors made once."""

    def __init__(self, session, lib: Path, info: dict) -> None:
        import tvm

        self.session = session
        session.upload(str(lib))
        self.module = session.load_module(lib.name)
        self.dev = session.cpu(0)
        self.inputs, self.outputs = info["inputs"], info["outputs"]
        self.in_t = [tvm.runtime.empty(m["shape"], m["dtype"], self.dev) for m in self.inputs]
        self.out_t = [tvm.runtime.empty(m["shape"], m["dtype"], self.dev) for m in self.outputs]
        self.fn = self.module[RPC_FUNC]

    def feed(self, sample: dict[str, np.ndarray]) -> None:
        for m, t in zip(self.inputs, self.in_t):
            t.copyfrom(np.ascontiguousarray(sample[m["name"]], dtype=m["dtype"]))

    def __call__(self, sample: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.feed(sample)
        _check_rc(int(self.fn(*self.in_t, *self.out_t)))
        return {m["name"]: t.numpy() for m, t in zip(self.outputs, self.out_t)}

    def time(self, sample: dict[str, np.ndarray], repeat: int, number: int) -> list[float]:
        self.feed(sample)
        _check_rc(int(self.fn(*self.in_t, *self.out_t)))  # warm up, and a failing model fails here
        ev = self.module.time_evaluator(RPC_FUNC, self.dev, number=number, repeat=repeat)
        return [float(s) for s in ev(*self.in_t, *self.out_t).results]


def _check_rc(rc: int) -> None:
    if rc == -1:
        raise TargetError("remote run: the inputs / outputs do not match the build (sizes or alignment)")
    if rc == -2:
        raise TargetError("remote run: the library cannot run on the requested threads")
    if rc:
        raise TargetError(f"remote run: step {rc - 1} of the model failed")


class RemoteStaticRunner(BatchRunner):
    """A static-executor build run on a device behind a tracker: the same results a local run gives."""

    def __init__(self, sub: Path, meta: dict, address: str, key: str, cc: list[str]) -> None:
        super().__init__(meta)
        parse_address(address)
        if meta.get("executor", "static") != "static":
            raise TargetError("--rpc runs static-executor builds; this folder was built for the Relax VM")
        self.sub, self.address, self.key, self.cc = Path(sub), address, key, list(cc)
        self._tmp = tempfile.TemporaryDirectory(prefix="qc-rpc-")
        self._remote: dict[str, _Remote] = {}
        self.devices: list[str] = []  # one entry per session opened (a retry after a lost device adds one)

    def _open(self, which: str) -> _Remote:
        import json

        build = self.sub / which
        try:
            info = json.loads((build / "program.json").read_text())
        except (OSError, ValueError) as exc:
            raise TargetError(f"static C: no readable program.json in {build}: {exc}") from None
        lib = Path(self._tmp.name) / f"{which}_rpc.so"
        if not lib.exists():
            rpc_library(build, self.cc, lib, int(self.meta.get("threads") or 1))
        remote = _Remote(request_session(self.address, self.key), lib, info)
        self.devices.append(f"{self.key}@{self.address}")
        return remote

    def _with_device(self, which: str, fn):
        """``fn(remote)`` on the device of ``which``; a lost device: once more on a fresh session."""
        for attempt in range(2):
            if which not in self._remote:
                self._remote[which] = self._open(which)
            try:
                return fn(self._remote[which])
            except TargetError:
                raise
            except Exception as exc:  # noqa: BLE001 - a dropped session raises TVM's own errors
                self._remote.pop(which, None)
                if attempt:
                    raise TargetError(f"remote run on {self.key!r} via {self.address} failed: "
                                      f"{first_line(exc)}") from None
                logger.warning("rpc: the device dropped (%s); asking the tracker for another", first_line(exc))

    def _run(self, samples: list[dict[str, np.ndarray]], which: str) -> list[dict[str, np.ndarray]]:
        return [self._with_device(which, lambda r, s=s: r(s)) for s in samples]

    def time(self, sample: dict[str, np.ndarray], runs: int = 50, number: int = 1) -> list[float]:
        """``runs`` timings (seconds per call, each the mean of ``number`` calls) measured on the device."""
        check_inputs(self.meta, sample)
        return self._with_device("main", lambda r: r.time(sample, runs, number))


def local_time(runner: BatchRunner, sample: dict[str, np.ndarray], runs: int = 50) -> list[float]:
    """The same timing in this process (a local build): ``runs`` single calls after one warm-up."""
    runner(sample)
    out = []
    for _ in range(runs):
        t = time.perf_counter()
        runner(sample)
        out.append(time.perf_counter() - t)
    return out


def summarize(times: list[float]) -> dict:
    ms = sorted(t * 1e3 for t in times)
    return {"runs": len(ms), "median_ms": statistics.median(ms), "p90_ms": ms[min(len(ms) - 1, int(0.9 * len(ms)))],
            "min_ms": ms[0]}


# ------------------------------------------------------------------------------------------- loopback cluster
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalCluster:
    """A tracker and ``n`` servers on loopback (``tools/rpc_local.py``, the tests): each server a process of its own
    with its log in ``log_dir/server-<i>.log``. ``stop_server(i)`` kills one (a device lost mid-run)."""

    def __init__(self, n: int, key: str = "qc-local", log_dir: Path | None = None, timeout_s: float = 60.0,
                 arch: str | None = None) -> None:
        """``arch`` ("aarch64"): the servers are AArch64 processes run by ``qemu-aarch64`` (:func:`emulated_python`),
        the devices of ``--target tvm-aarch64 --rpc``; default: this machine's Python."""
        if n < 1:
            raise ConfigError("a loopback cluster needs at least one server")
        self.server_cmd, self.server_env = emulated_python(arch) if arch else ([sys.executable], None)
        self.n, self.key, self.arch = n, key, arch
        self.timeout_s = timeout_s if not arch else max(timeout_s, EMULATED_START_S)
        self._tmp = None if log_dir else tempfile.TemporaryDirectory(prefix="qc-rpc-logs-")
        self.log_dir = Path(log_dir or self._tmp.name)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.tracker: subprocess.Popen | None = None
        self.servers: list[subprocess.Popen | None] = []

    def _spawn(self, args: list[str], log: Path, server: bool = False) -> subprocess.Popen:
        cmd, env = (self.server_cmd, self.server_env) if server else ([sys.executable], None)
        with open(log, "w") as fh:
            return subprocess.Popen([*cmd, "-m", *args], stdout=fh, stderr=subprocess.STDOUT, env=env,
                                    preexec_fn=_own_group_dies_with_parent)

    def start(self) -> "LocalCluster":
        self.tracker = self._spawn(["tvm.exec.rpc_tracker", "--host", "127.0.0.1", "--port", str(self.port),
                                    "--port-end", str(self.port + 1)], self.log_dir / "tracker.log")
        self.wait_free(0)  # the tracker answers: servers started earlier would retry only every 5 s
        for i in range(self.n):
            self.servers.append(self._spawn(
                ["tvm.exec.rpc_server", "--tracker", self.address, "--key", self.key, "--host", "127.0.0.1",
                 "--port", str(free_port()), "--port-end", str(65535)], self.server_log(i), server=True))
        self.wait_free(self.n)
        return self

    def server_log(self, i: int) -> Path:
        return self.log_dir / f"server-{i}.log"

    def free(self) -> int:
        """Servers with this key the tracker lists as free (-1 when the tracker cannot be asked)."""
        from tvm import rpc

        if _listening("127.0.0.1", self.port, 1.0):
            return -1
        try:
            summary = rpc.connect_tracker("127.0.0.1", self.port).summary()
        except Exception:  # noqa: BLE001 - not up yet
            return -1
        return int(summary.get("queue_info", {}).get(self.key, {}).get("free", 0))

    def wait_free(self, n: int) -> None:
        """Until the tracker lists ``n`` free servers with this key (``n = 0``: until it answers)."""
        t0 = time.monotonic()
        while self.free() < n:
            dead = [p for p in [self.tracker, *self.servers] if p is not None and p.poll() is not None]
            if dead or time.monotonic() - t0 > self.timeout_s:
                logs = "; ".join(f"{p.name}: {p.read_text(errors='replace')[-300:]}"
                                 for p in sorted(self.log_dir.glob("*.log")))
                self.stop()
                raise TargetError(f"the loopback RPC cluster did not come up ({n} free servers wanted): {logs}")
            time.sleep(0.2)

    def stop_server(self, i: int) -> None:
        p = self.servers[i]
        if p is not None:
            _kill(p)
            self.servers[i] = None

    def stop(self) -> None:
        for i in range(len(self.servers)):
            self.stop_server(i)
        if self.tracker is not None:
            _kill(self.tracker)
            self.tracker = None

    def __enter__(self) -> "LocalCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()


def emulated_python(arch: str) -> tuple[list[str], dict[str, str]]:
    """(command, environment) of a Python for ``arch`` run by QEMU user mode, with TVM's wheels for that
    architecture: the AArch64 Python ``tools/setup`` unpacks into ``$QC_AARCH64_PYTHON`` (default
    :data:`AARCH64_PYTHON`; its ``python`` script runs it under qemu-aarch64). Its TVM runtime runs the kernels;
    ``TVM_NUM_THREADS=1``: a candidate is timed on one thread, as the static executor runs it."""
    import os

    from qcompile.targets.base import require_tools

    if arch != "aarch64":
        raise ConfigError(f"emulated RPC servers exist for aarch64 only, not {arch!r}")
    root = Path(os.environ.get("QC_AARCH64_PYTHON", AARCH64_PYTHON))
    if not os.access(root / "python", os.X_OK) or not (root / "site" / "tvm").is_dir():
        raise TargetError(f"no AArch64 Python with TVM in {root} for emulated RPC servers: run tools/setup (as root)")
    require_tools(["qemu-aarch64"], "emulated aarch64 RPC server")
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/tmp"),
           "TVM_NUM_THREADS": "1"}
    return [str(root / "python")], env


def _own_group_dies_with_parent() -> None:
    """In the child: a process group of its own (killed as one: a server forks per session), and SIGKILL when
    the process that started it dies (Linux ``PR_SET_PDEATHSIG``), so a killed test leaves no server behind."""
    import ctypes
    import os
    import signal

    os.setsid()
    try:
        ctypes.CDLL(None).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _kill(p: subprocess.Popen) -> None:
    import os
    import signal

    try:
        os.killpg(p.pid, signal.SIGKILL)  # the server forks a child per session: the whole group
    except ProcessLookupError:
        pass
    p.wait(timeout=10)
