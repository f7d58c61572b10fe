"""Remote devices through TVM's RPC tracker, on loopback (a tracker and two servers, real processes):
run / bench on a device equal a local run, tuning measured on the devices spreads over both, survives losing
one, and the tuned build stays bit-exact with the integer reference. tvm-aarch64: the same with AArch64 servers
(TVM's aarch64 wheels under qemu-aarch64, from tools/setup)."""
from __future__ import annotations

import json
import re
import threading
import time

import numpy as np
import pytest

import qcompile_zoo as zoo
from qcompile import driver
from qcompile.cli import main as cli

tvm = pytest.importorskip("tvm", reason="the tvm extra is part of the CI install")
pytest.importorskip("tornado", reason="the tvm extra installs tornado (TVM's RPC tracker)")

from qcompile.targets.tvm.rpc import LocalCluster  # noqa: E402

TUNED = "mobilenetv2-digits"  # depthwise convs off the VNNI path: kernels with a search space worth 48 trials
MEASURED = re.compile(r"load_module .*tvm_tmp_mod\.so")  # a server loading a tuning candidate to time it


def _compile(out, model: str = "digits-cnn", target: str = "tvm-x86", **opts) -> driver.Artifacts:
    e = zoo.build(model)
    return driver.compile(str(e.model), calib=str(e.calib), recipe="w8a8", target=target, out_dir=out,
                          max_samples=8, check_numerics=False, measure_latency=False, target_options=opts)


def _measured(cluster: LocalCluster, i: int) -> int:
    return len(MEASURED.findall(cluster.server_log(i).read_text(errors="replace")))


def test_run_and_bench_on_a_remote_device_equal_a_local_run(tmp_path, capsys):
    out = tmp_path / "out"
    _compile(out)
    e = zoo.build("digits-cnn")
    x = {k: v[:6] for k, v in np.load(e.test).items()}
    np.savez(tmp_path / "x.npz", **x)
    local = driver.run_artifact(out, x)
    with LocalCluster(2, log_dir=tmp_path / "logs") as cluster:
        flags = ["--rpc", cluster.address, "--key", cluster.key]
        assert cli(["run", str(out), "--inputs", str(tmp_path / "x.npz"), "-o", str(tmp_path / "y.npz"), *flags]) == 0
        remote = dict(np.load(tmp_path / "y.npz"))
        assert remote.keys() == local.keys()
        for k in local:
            np.testing.assert_array_equal(remote[k], local[k])
        capsys.readouterr()
        assert cli(["bench", str(out), "--inputs", str(tmp_path / "x.npz"), "--runs", "20", *flags]) == 0
        line = capsys.readouterr().out
        assert f"tvm-x86 on {cluster.key} via {cluster.address}: median" in line, line
        assert "integer ops bit-exact with the reference: True" in line and "equal end to end: 100.00%" in line, line
        logs = [cluster.server_log(i).read_text(errors="replace") for i in range(2)]
        assert sum("main_rpc.so" in t for t in logs) >= 1 and sum("probe_rpc.so" in t for t in logs) >= 1
        # the device of a runner's session goes away between two runs: the next run goes to the other one
        from qcompile.targets.tvm.x86 import TvmX86Target

        runner = TvmX86Target().runner(out, rpc=cluster.address, key=cluster.key)
        samples = [{k: v[i:i + 1] for k, v in x.items()} for i in range(2)]
        def loads() -> list[int]:
            return [cluster.server_log(i).read_text(errors="replace").count("main_rpc.so") for i in range(2)]
        start = loads()
        first = runner.run(samples)
        before = loads()
        grew = [i for i in range(2) if before[i] > start[i]]
        assert len(grew) == 1, (start, before)
        served = grew[0]
        cluster.stop_server(served)
        again = runner.run(samples)
        for a, b in zip(first, again):
            for k in a:
                np.testing.assert_array_equal(a[k], b[k])
        other = 1 - served
        assert cluster.server_log(other).read_text(errors="replace").count("main_rpc.so") == before[other] + 1
        assert len(runner.devices) == 2  # a second session, on the device that is left
        # a key nobody serves, and a tracker that is not there: one line each, non-zero exit
        capsys.readouterr()
        assert cli(["run", str(out), "--inputs", str(tmp_path / "x.npz"), "-o", str(tmp_path / "z.npz"),
                    "--rpc", cluster.address, "--key", "nobody"]) != 0
        err = capsys.readouterr().err
        assert "gave no device with key 'nobody'" in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "z.npz").exists()
    assert cli(["run", str(out), "--inputs", str(tmp_path / "x.npz"), "-o", str(tmp_path / "z.npz"),
                "--rpc", "127.0.0.1", "--key", "k"]) != 0
    assert "HOST:PORT" in capsys.readouterr().err


def test_tuning_spreads_over_the_devices_and_survives_losing_one(tmp_path):
    from qcompile.targets.tvm.schedules import tune

    db = tmp_path / "db"
    with LocalCluster(2, log_dir=tmp_path / "logs") as cluster:
        result: dict = {}

        def work() -> None:
            try:
                result["art"] = _compile(tmp_path / "a", TUNED, tune_trials=48, tune_db=db, rpc=cluster.address,
                                         key=cluster.key)
            except BaseException as exc:  # noqa: BLE001 - re-raised in the test thread
                result["error"] = exc

        t = threading.Thread(target=work)
        t.start()
        deadline = time.monotonic() + 600
        while t.is_alive() and min(_measured(cluster, 0), _measured(cluster, 1)) < 2 and time.monotonic() < deadline:
            time.sleep(0.5)
        spread = [_measured(cluster, 0), _measured(cluster, 1)]
        assert min(spread) >= 2, f"measurements per server: {spread}"  # both devices measured candidates
        cluster.stop_server(1)  # a device lost mid-tuning
        after_kill = _measured(cluster, 0)
        t.join(timeout=900)
        assert not t.is_alive()
        if "error" in result:
            raise result["error"]
        assert _measured(cluster, 0) > after_kill  # the tuning went on, on the device that is left
    n = tune.records(db)
    assert n > 0
    lsb = result["art"].report["lsb_vs_reference"]["tvm-x86"]
    assert lsb["integer_ops_exact"] and lsb["max_lsb"] == 0, {k: v for k, v in lsb.items() if k != "tensors"}
    # the database kept every record: a rebuild with it, here, tunes nothing
    _compile(tmp_path / "b", TUNED, tune_trials=48, tune_db=db)
    assert tune.records(db) == n


def test_aarch64_tuned_and_run_on_emulated_aarch64_devices(tmp_path, capsys):
    """tvm-aarch64 through the tracker: candidates cross-compiled here and timed on AArch64 servers (TVM's aarch64
    runtime under qemu-aarch64), the tuned build bit-exact; a remote run equals the local (qemu) run."""
    e = zoo.build("digits-cnn")
    with LocalCluster(2, log_dir=tmp_path / "logs", arch="aarch64") as cluster:
        out = tmp_path / "out"
        art = _compile(out, target="tvm-aarch64", tune_trials=16, rpc=cluster.address, key=cluster.key)
        measured = [_measured(cluster, i) for i in range(2)]
        assert sum(measured) >= 16, measured  # the seeds and the trials were timed on the AArch64 servers
        meta = json.loads((out / "tvm-aarch64" / "meta.json").read_text())
        assert meta["tune_new_records"] > 0 and meta["tune_db"], meta
        lsb = art.report["lsb_vs_reference"]["tvm-aarch64"]
        assert lsb["integer_ops_exact"] and lsb["max_lsb"] == 0, {k: v for k, v in lsb.items() if k != "tensors"}
        x = {k: v[:4] for k, v in np.load(e.test).items()}
        np.savez(tmp_path / "x.npz", **x)
        assert cli(["run", str(out), "--inputs", str(tmp_path / "x.npz"), "-o", str(tmp_path / "remote.npz"),
                    "--rpc", cluster.address, "--key", cluster.key]) == 0
        loads = sum(cluster.server_log(i).read_text(errors="replace").count("main_rpc.so") for i in range(2))
        assert loads == 1  # the build ran on a device, as a library its TVM runtime loaded
        capsys.readouterr()
        assert cli(["bench", str(out), "--inputs", str(tmp_path / "x.npz"), "--runs", "5", "--rpc", cluster.address,
                    "--key", cluster.key]) == 0
        line = capsys.readouterr().out
        assert f"tvm-aarch64 on {cluster.key} via {cluster.address}: median" in line, line
        assert "integer ops bit-exact with the reference: True" in line, line
    assert cli(["run", str(out), "--inputs", str(tmp_path / "x.npz"), "-o", str(tmp_path / "local.npz")]) == 0
    remote, local = np.load(tmp_path / "remote.npz"), np.load(tmp_path / "local.npz")
    assert sorted(remote) == sorted(local)
    for k in local:
        np.testing.assert_array_equal(remote[k], local[k])
    # tuning for AArch64 without a device to time on: one line, non-zero exit, nothing written
    capsys.readouterr()
    assert cli(["compile", str(e.model), "--calib", str(e.calib), "--target", "tvm-aarch64", "--tune-trials", "4",
                "-o", str(tmp_path / "nodev")]) != 0
    err = capsys.readouterr().err
    assert "give --rpc" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "nodev").exists()
