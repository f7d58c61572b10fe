"""mcu-cortex-m4: firmware project built with arm-none-eabi-gcc, run on QEMU mps2-an386, bit-exact with the integer
reference, same top-1 as the ORT QDQ model; memory report and RAM/flash budget."""
from __future__ import annotations

import re
import shutil
import subprocess

import numpy as np
import onnx
import pytest

import qcompile_zoo as zoo
from qcompile import driver
from qcompile.errors import TargetError
from qcompile.reference import Interpreter

tvm = pytest.importorskip("tvm", reason="the tvm extra is part of the CI install")
from qcompile.targets.tvm import mcu  # noqa: E402

ZOO = ["digits-cnn", "mobilenetv2-digits"]
N_REF = 16      # held-out images compared bit for bit with the (slow, numpy) integer reference
N_TOP1 = 200    # held-out images for the top-1 comparison with ORT


def _needs_tools() -> None:
    missing = [t for t in mcu.TOOLS if shutil.which(t) is None]
    if missing:
        pytest.skip(f"missing tools (run tools/setup): {missing}")


def _compile(name: str, out, target: str = "mcu-cortex-m4") -> driver.Artifacts:
    e = zoo.build(name)
    return driver.compile(str(e.model), calib=str(e.calib), recipe="w8a8", target=target, out_dir=out,
                          max_samples=16, check_numerics=False, measure_latency=False)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    _needs_tools()
    cache: dict[str, driver.Artifacts] = {}

    def get(name: str) -> driver.Artifacts:
        if name not in cache:
            cache[name] = _compile(name, tmp_path_factory.mktemp(name) / "out")
        return cache[name]
    return get


def _test_set(name: str, n: int) -> dict[str, np.ndarray]:
    with np.load(zoo.build(name).test) as t:
        return {k: t[k][:n] for k in t.files}


@pytest.mark.parametrize("name", ZOO)
def test_firmware_bit_exact_and_same_top1_as_ort(name, built):
    art = built(name)
    lsb = art.report["lsb_vs_reference"]["mcu-cortex-m4"]
    assert "error" not in lsb, lsb
    assert lsb["integer_ops_exact"] and lsb["max_lsb"] == 0, lsb
    test = _test_set(name, N_TOP1)
    got = art.run(test)  # the whole batch in one QEMU start
    interp = Interpreter(onnx.load(str(art.out_dir / "model.qdq.onnx")))
    for i in range(N_REF):
        ref = interp.run({k: v[i:i + 1] for k, v in test.items()})[0]
        for k, v in ref.items():
            np.testing.assert_array_equal(got[k][i:i + 1], v, err_msg=f"{k} of held-out image {i}")
    ort = art.run(test, target="onnxruntime")
    e = zoo.build(name)
    labels = np.load(e.labels)[:N_TOP1]
    out = next(iter(got))
    top1 = lambda o: np.argmax(o[out].reshape(len(o[out]), -1), axis=1)  # noqa: E731
    agree = float(np.mean(top1(got) == top1(ort)))
    assert agree >= 0.99, f"top-1 agrees with ORT on {agree:.1%} of images"
    acc = lambda o: float(np.mean(top1(o) == labels))  # noqa: E731
    assert abs(acc(got) - acc(ort)) <= 0.005, (acc(got), acc(ort))


@pytest.mark.parametrize("name", ZOO)
def test_memory_report(name, built):
    art = built(name)
    meta = mcu.common.read_meta(art.out_dir / mcu.SUBDIR)
    mem = meta["memory"]
    assert mem["arena_bytes"] <= 1.05 * mem["arena_lower_bound"], mem
    assert mem["weights_bytes"] < mem["flash_bytes"] and mem["arena_bytes"] < mem["ram_bytes"]
    assert 0 < mem["stack_used"] < mem["stack_reserved"]
    assert mem["instructions_per_inference"] > 0
    assert {"smlad", "sxtb16", "smlabb"} <= set(meta["dsp"])


def test_make_run_and_dsp_instructions(built):
    art = built("digits-cnn")
    fw = art.out_dir / "firmware"
    assert {"Makefile", "include", "mps2_an386.ld", "src"} <= {p.name for p in fw.iterdir()}
    subprocess.run(["make", "-C", str(fw), "clean"], check=True, capture_output=True)
    res = subprocess.run(["make", "-C", str(fw), "run"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    console = res.stdout + res.stderr  # QEMU writes the semihosting console to stderr
    assert "argmax = " in console and "qc: samples=1 status=0" in console, console
    counts = mcu.dsp_counts(fw / "src" / "kernels.o")
    assert counts["smlabb"] > 0, counts  # LLVM uses the DSP 16x16+32 MAC; SMLAD/SXTB16 not (see report)
    # soft-float helpers by their RTABI names (base AAPCS, as libgcc implements them), never the GNU names that
    # LLVM calls with the VFP convention for an unnormalized "thumbv7em-none-eabi" (int64 -> float read s0: zeros)
    nm = subprocess.run(["arm-none-eabi-nm", "-u", str(fw / "src" / "kernels.o")], capture_output=True, text=True)
    undefined = {line.split()[-1] for line in nm.stdout.splitlines() if line.strip()}
    gnu = {s for s in undefined if re.fullmatch(r"__(\w+[sd]f[23]?|fix\w+)", s)}
    assert "__aeabi_l2f" in undefined and not gnu, undefined


def test_budget_too_small_is_one_error_and_leaves_nothing(tmp_path, monkeypatch):
    _needs_tools()
    monkeypatch.setattr(driver, "get_target", lambda name: mcu.McuCortexM4Target(ram_kb=16))
    out = tmp_path / "out"
    with pytest.raises(TargetError, match=r"does not fit: RAM .* > budget 16 KB.*largest tensors: activation"):
        _compile("digits-cnn", out)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_check_budget_names_largest_tensors():
    mem = {"ram_bytes": 200 * 1024, "flash_bytes": 100 * 1024, "arena_bytes": 150 * 1024, "stack_reserved": 16384,
           "io_bytes": 64, "weights_bytes": 60 * 1024,
           "largest_tensors": [{"name": "lv1", "bytes": 90000, "memory": "ram", "kind": "activation", "kernel": "conv"},
                               {"name": "c3", "bytes": 50000, "memory": "flash", "kind": "constant", "kernel": "fc"}]}
    mcu.check_budget(mem, ram_kb=256, flash_kb=128)
    with pytest.raises(TargetError, match=r"flash 100.0 KB > budget 64 KB.*constant c3 \(fc\)"):
        mcu.check_budget(mem, flash_kb=64)
    with pytest.raises(TargetError, match=r"RAM 200.0 KB > budget 128 KB.*activation lv1 \(conv\)"):
        mcu.check_budget(mem, ram_kb=128)
