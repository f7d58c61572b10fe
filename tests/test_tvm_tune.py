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
