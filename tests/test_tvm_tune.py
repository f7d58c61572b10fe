"""tvm-x86 with MetaSchedule tuning: the database is written, reused without new trials, applied
deterministically, and the tuned library stays bit-exact with the integer reference."""
from __future__ import annotations

import json

import pytest

import qcompile_zoo as zoo
from qcompile import driver

tvm = pytest.importorskip("tvm", reason="the tvm extra is part of the CI install")


def _compile(out, **opts) -> driver.Artifacts:
    e = zoo.build("digits-cnn")
    return driver.compile(str(e.model), calib=str(e.calib), recipe="w8a8", target="tvm-x86", out_dir=out,
                          max_samples=8, check_numerics=False, measure_latency=False, target_options=opts)


def test_tune_db_written_reused_and_bit_exact(tmp_path):
    from qcompile.targets.tvm.schedules import tune

    db = tmp_path / "db"
    art = _compile(tmp_path / "a", tune_trials=8, tune_db=db)
    n = tune.records(db)
    assert n > 0 and (db / tune.WORKLOADS).is_file()
    meta = json.loads((tmp_path / "a" / "tvm-x86" / "meta.json").read_text())
    assert meta["tune_trials"] == 8 and meta["tune_new_records"] == n and meta["tune_db"] == str(db)
    lsb = art.report["lsb_vs_reference"]["tvm-x86"]
    assert "error" not in lsb, lsb
    assert lsb["integer_ops_exact"] and lsb["max_lsb"] == 0, {k: v for k, v in lsb.items() if k != "tensors"}

    # a rebuild with the same database tunes nothing and gives the same library
    _compile(tmp_path / "b", tune_trials=8, tune_db=db)
    assert tune.records(db) == n
    meta_b = json.loads((tmp_path / "b" / "tvm-x86" / "meta.json").read_text())
    assert meta_b["tune_new_records"] == 0
    lib = "tvm-x86/main/model.so"  # the static executor's library (kernels.o linked with the generated model.c)
    assert (tmp_path / "a" / lib).read_bytes() == (tmp_path / "b" / lib).read_bytes()


def test_tune_zero_trials_is_a_no_op(tmp_path):
    from qcompile.targets.tvm.schedules import tune

    m = tvm.IRModule()
    assert tune.tune(m, tvm.target.Target("llvm"), 0, tmp_path / "db") == tmp_path / "db"
    assert tune.records(tmp_path / "db") == 0


def test_seed_measurement_lost_once_is_measured_again(tmp_path):
    """A device lost while it measures a kernel's seed schedule: the next try commits the record (without it the
    kernel would have no cost, get no trials, and be tuned again by the next build with the same database)."""
    from tvm import te
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.runner import PyRunner
    from tvm.s_tir.meta_schedule.runner.local_runner import LocalRunnerFuture

    from qcompile.targets.tvm.schedules import tune

    @derived_object
    class LosesFirst(PyRunner):
        def __init__(self) -> None:
            super().__init__()
            self.calls, self.inner = 0, tune.InProcessRunner()

        def run(self, runner_inputs):
            self.calls += 1
            if self.calls == 1:
                return [LocalRunnerFuture(error_message="RPCRunner: connection reset (device lost)")]
            return self.inner.run(runner_inputs)

    a = te.placeholder((64, 64), "int32", name="a")
    b = te.compute((64, 64), lambda i, j: a[i, j] * 3 + 1, name="b")
    func = te.create_prim_func([a, b]).with_attr("global_symbol", "main")
    target = tune.tuning_target(tvm.target.Target({"kind": "llvm"}), 1)
    runner = LosesFirst()
    db = tune.open_database(tmp_path / "db")
    secs = tune._seed_with_rule(db, func, target, tune.InProcessBuilder(), runner)
    assert runner.calls == 2 and secs > 0
    db = None
    assert tune.records(tmp_path / "db") == 1

    once = LosesFirst()  # one try only: the loss leaves the kernel unmeasured and unrecorded
    db2 = tune.open_database(tmp_path / "db2")
    assert tune._seed_with_rule(db2, func, target, tune.InProcessBuilder(), once, attempts=1) == 0.0
    assert once.calls == 1 and tune.records(tmp_path / "db2") == 0
