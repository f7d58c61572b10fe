"""tvm-x86: QDQ -> integer ONNX -> Relax -> LLVM for the host; bit-exact with the integer reference."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest

import qcompile_zoo as zoo
from qcompile import driver
from qcompile.errors import TargetError

tvm = pytest.importorskip("tvm", reason="the tvm extra is part of the CI install")

ZOO = ["digits-cnn", "mobilenetv2-digits", "resnet-digits", "vit-digits", "minilm"]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    cache: dict[str, driver.Artifacts] = {}

    def get(name: str) -> driver.Artifacts:
        if name not in cache:
            e = zoo.build(name)
            out = tmp_path_factory.mktemp(name) / "out"
            cache[name] = driver.compile(str(e.model), calib=str(e.calib), recipe="w8a8", target="tvm-x86",
                                         out_dir=out, max_samples=16, check_numerics=False,
                                         measure_latency=False)
        return cache[name]
    return get


@pytest.mark.parametrize("name", ZOO)
def test_zoo_bit_exact_and_same_metric_as_ort(name, built):
    art = built(name)
    lsb = art.report["lsb_vs_reference"]["tvm-x86"]
    assert "error" not in lsb, lsb
    assert lsb["integer_ops_exact"], "integer ops differ from the reference given the same border values"
    # every integer tensor equal end to end, MiniLM's too (its GELU erf is the reference's: mathfns.py)
    assert lsb["max_lsb"] == 0, [t for t in lsb["tensors"] if t["max_lsb"]][:3]
    e = zoo.build(name)
    with np.load(e.test) as t:
        test = {k: t[k] for k in t.files}
    fp32 = _fp32(e, test)
    m_tvm = zoo.evaluate(name, art.run(test), fp32, e, test)
    m_ort = zoo.evaluate(name, art.run(test, target="onnxruntime"), fp32, e, test)
    assert abs(m_tvm - m_ort) <= 0.002, (m_tvm, m_ort)  # 0.2 points top-1 / 0.002 cosine


def _fp32(e, test: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    from qcompile import dataset, numerics
    model = onnx.load(str(e.model))
    sess = numerics.session(str(e.model), optimize=True)
    outs = [numerics.run(sess, s) for s in dataset.split_samples(model, test, "test")]
    return {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}


def test_no_float_arithmetic_inside_quantized_region(built):
    """Walk the Relax module of the all-integer CNN: every op whose inputs are all integer tensors must produce an
    integer tensor (the only int->float op is DequantizeLinear's astype at the output border), and no conv2d /
    matmul computes in float."""
    from tvm import relax

    from qcompile.targets.tvm.common import lower_to_relax

    art = built("digits-cnn")
    q = onnx.load(str(art.out_dir / "model.qdq.onnx"))
    e = zoo.build("digits-cnn")
    with np.load(e.calib) as c:
        example = {k: c[k][:1] for k in c.files}
    mod = lower_to_relax(q, example, probe=False).mod
    dtypes: dict = {}
    bad, float_linear, to_float = [], [], 0
    for p in mod["main"].params:
        dtypes[p] = str(p.ty.dtype)
    for block in mod["main"].body.blocks:
        for b in block.bindings:
            ty = b.var.ty
            out_dt = str(ty.dtype) if hasattr(ty, "dtype") else None
            dtypes[b.var] = out_dt
            v = b.value
            if not isinstance(v, relax.Call) or not hasattr(v.op, "name"):
                continue
            ins = [dtypes.get(a) for a in v.args if isinstance(a, relax.Var)]
            ins += [str(a.ty.dtype) for a in v.args if isinstance(a, tvm.ir.GenericConst)]
            name = v.op.name
            if name in ("relax.nn.conv2d", "relax.matmul") and out_dt and out_dt.startswith("float"):
                float_linear.append(name)
            if ins and all(d and d.startswith(("int", "uint")) for d in ins) and out_dt and out_dt.startswith("float"):
                if name == "relax.astype":
                    to_float += 1
                else:
                    bad.append(name)
    assert not bad, f"float arithmetic on integer inputs: {bad}"
    assert not float_linear, f"float conv/matmul in the integer CNN: {float_linear}"
    assert to_float == 1, to_float  # the logits' DequantizeLinear only


def test_static_shape_mismatch_is_a_clear_error(built):
    from qcompile.targets import get_target

    art = built("digits-cnn")
    with pytest.raises(TargetError, match="built for"):
        get_target("tvm-x86").run(art.out_dir, [{"input": np.zeros((1, 1, 9, 9), np.float32)}])


def test_run_defaults_to_the_compiled_target_and_is_deterministic(built):
    art = built("digits-cnn")
    e = zoo.build("digits-cnn")
    with np.load(e.test) as t:
        x = {"input": t["input"][:20]}
    a = driver.run_artifact(art.out_dir, x)  # no target: the folder's (tvm-x86)
    b = art.run(x, target="tvm-x86")
    np.testing.assert_array_equal(a["logits"], b["logits"])


def test_static_library_runs_without_tvm(built):
    """The default executor is a plain shared library over one planned arena: a process that cannot import TVM
    loads tvm-x86/main/model.so with ctypes and gets the same logits as `qcompile run`."""
    art = built("digits-cnn")
    e = zoo.build("digits-cnn")
    with np.load(e.test) as t:
        x = t["input"][:3]
    np.save(art.out_dir.parent / "x.npy", x)
    code = ("import sys, numpy as np; sys.modules['tvm'] = None; sys.modules['tvm_ffi'] = None\n"
            "from qcompile.targets.tvm.static_c import SharedModel\n"
            f"m = SharedModel({str(art.out_dir / 'tvm-x86' / 'main')!r})\n"
            f"x = np.load({str(art.out_dir.parent / 'x.npy')!r})\n"
            "out = np.concatenate([m({'input': x[i:i + 1]})['logits'] for i in range(len(x))])\n"
            f"np.save({str(art.out_dir.parent / 'y.npy')!r}, out)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    meta = json.loads((art.out_dir / "tvm-x86" / "meta.json").read_text())
    assert meta["executor"] == "static" and meta["arena_bytes"] >= meta["arena_lower_bound"] > 0
    np.testing.assert_array_equal(np.load(art.out_dir.parent / "y.npy"), art.run({"input": x})["logits"])


def test_vm_executor_is_bit_exact_too(tmp_path):
    e = zoo.build("digits-cnn")
    art = driver.compile(str(e.model), calib=str(e.calib), recipe="w8a8", target="tvm-x86", out_dir=tmp_path / "o",
                         max_samples=8, check_numerics=False, measure_latency=False,
                         target_options={"executor": "vm"})
    assert (art.out_dir / "tvm-x86" / "lib.so").is_file()
    lsb = art.report["lsb_vs_reference"]["tvm-x86"]
    assert lsb["integer_ops_exact"] and lsb["max_lsb"] == 0, {k: v for k, v in lsb.items() if k != "tensors"}


def test_profile_names_every_kernel(built):
    from qcompile.targets.tvm import static_c, x86

    art = built("digits-cnn")
    e = zoo.build("digits-cnn")
    with np.load(e.test) as t:
        sample = {"input": t["input"][:1]}
    rows = static_c.profile_shared(art.out_dir / "tvm-x86" / "main", x86.HOST_CC, sample, runs=3)
    info = json.loads((art.out_dir / "tvm-x86" / "main" / "program.json").read_text())
    assert sum(n for _, _, n in rows) == len(info["step_symbols"])
    assert all(ms > 0 for _, ms, _ in rows) and any(k.startswith("qc_vnni_conv2d") for k, _, _ in rows)


def test_missing_tvm_is_one_clear_line(tmp_path):
    e = zoo.build("digits-cnn")
    out = tmp_path / "out"
    code = ("import sys; sys.modules['tvm'] = None; from qcompile.cli import main; "
            f"sys.exit(main(['compile', {str(e.model)!r}, '--calib', {str(e.calib)!r}, '--target', 'tvm-x86', "
            f"'-o', {str(out)!r}]))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == TargetError.exit_code, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "pip install -e '.[tvm]'" in lines[0], r.stderr
    assert not out.exists() or not any(out.iterdir())


def test_relax_requantization_equals_reference_mbqm():
    """relax_import.mbqm (closed forms) against reference.mbqm_q31 (gemmlowp's literal forms): int32 extremes,
    random values, per-channel multipliers with left shifts, no shift and right shifts up to 31."""
    from tvm import relax

    from qcompile.lowering import quantize_multiplier
    from qcompile.reference import mbqm_q31
    from qcompile.targets.tvm.relax_import import mbqm

    rng = np.random.default_rng(7)
    mult = np.concatenate([[1.0, 0.5, 2.0 ** -31, 3.7, 0.999999], rng.uniform(1e-9, 1.0, 59)])
    m0, sh = quantize_multiplier(mult)
    x = np.concatenate([rng.integers(-2 ** 24, 2 ** 24, (200, 64)),
                        np.tile(np.array([-2 ** 26, 2 ** 26 - 1, 0, -1, 1])[:, None], (1, 64))]).astype(np.int64)
    x[:, 3] = rng.integers(-2 ** 31 // 8, 2 ** 31 // 8, x.shape[0])  # channel 3 shifts left by 2 (3.7 = 0.925*4)
    bb = relax.BlockBuilder()
    xv = relax.Var("x", relax.TensorType(list(x.shape), "int64"))
    with bb.function("main", [xv]):
        with bb.dataflow():
            out = bb.emit_output(mbqm(bb, xv, m0.reshape(1, -1), sh.reshape(1, -1)))
        bb.emit_func_output(out)
    ex = tvm.compile(bb.get(), "llvm")
    got = relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()
    np.testing.assert_array_equal(got, mbqm_q31(x, m0.reshape(1, -1), sh.reshape(1, -1)))
