"""tvm-x86: QDQ -> integer ONNX -> Relax -> LLVM for the host; bit-exact with the integer reference."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest

import helpers
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
    if name != "minilm":  # CNNs and the ViT: every integer tensor equal end to end
        assert lsb["max_lsb"] == 0, [t for t in lsb["tensors"] if t["max_lsb"]][:3]
    else:  # MiniLM's float regions compute the reference's operations (qcompile.floatspec), but TVM's LLVM back end
        # fuses multiply-adds on this FMA host, which can move a value across a QuantizeLinear tie
        assert lsb["equal"] > 0.99, {k: v for k, v in lsb.items() if k != "tensors"}
    helpers.assert_main_build_equal(lsb)
    e = zoo.build(name)
    with np.load(e.test) as t:
        test = {k: t[k] for k in t.files}
    fp32 = helpers.zoo_fp32(e, test)
    m_tvm = zoo.evaluate(name, art.run(test), fp32, e, test)
    m_ort = zoo.evaluate(name, art.run(test, target="onnxruntime"), fp32, e, test)
    assert abs(m_tvm - m_ort) <= 0.002, (m_tvm, m_ort)  # 0.2 points top-1 / 0.002 cosine


def test_no_float_arithmetic_inside_quantized_region(built):
    """Walk the Relax module of the all-integer CNN: every op whose inputs are all integer tensors must produce an
    integer tensor (the only int->float op is DequantizeLinear's astype at the output border), and no conv2d /
    matmul computes in float."""
    from tvm import relax

    from qcompile.targets.tvm.frontend.program import lower_to_relax

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
            "from qcompile.targets.tvm.executors.static_c import SharedModel\n"
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
    from qcompile.targets.tvm import x86
    from qcompile.targets.tvm.executors import static_c

    art = built("digits-cnn")
    e = zoo.build("digits-cnn")
    with np.load(e.test) as t:
        sample = {"input": t["input"][:1]}
    rows = static_c.profile_shared(art.out_dir / "tvm-x86" / "main", x86.HOST_CC, sample, runs=3)
    info = json.loads((art.out_dir / "tvm-x86" / "main" / "program.json").read_text())
    assert sum(n for _, _, n in rows) == len(info["step_symbols"])
    # fused_qc_vnni_conv2d_...: a VNNI conv with its epilogue
    assert all(ms > 0 for _, ms, _ in rows) and any("qc_vnni_conv2d" in k for k, _, _ in rows)


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


def _compile_requant(cases, build) -> list[np.ndarray]:
    """Compile one Relax function with an output per case (``build(bb, case, var) -> expr``) through the host
    pipeline tvm-x86 uses (fusion, the epilogue schedule, vectorized LLVM) and run it on each case's input."""
    from tvm import relax

    from qcompile.targets.tvm.pipeline import host_pipeline

    bb = relax.BlockBuilder()
    xs = [relax.Var(f"x{i}", relax.TensorType(list(c["x"].shape), str(c["x"].dtype))) for i, c in enumerate(cases)]
    with bb.function("main", xs):
        with bb.dataflow():
            outs = [bb.emit(build(bb, c, v)) for c, v in zip(cases, xs)]
            out = bb.emit_output(relax.Tuple(outs))
        bb.emit_func_output(out)
    target = tvm.target.Target("llvm")
    ex = tvm.compile(bb.get(), target, relax_pipeline=host_pipeline(target, parallel=False))
    res = relax.VirtualMachine(ex, tvm.cpu())["main"](*[tvm.runtime.tensor(c["x"]) for c in cases])
    return [r.numpy() for r in res]


def _valid_inputs(rng, m0: np.ndarray, sh: np.ndarray, rows: int, pre: int = 0) -> np.ndarray:
    """Per-channel int32 inputs the reference accepts (``x·2^(pre+left)`` in int32): the extremes of that range,
    0, ±1, small values (dense rounding ties), and random values over the whole range."""
    cols = []
    for m, s in zip(m0.reshape(-1), sh.reshape(-1)):
        k = pre + (max(int(s), 0) if m else 0)
        lo, hi = -(1 << 31) >> k, ((1 << 31) - 1) >> k
        col = np.concatenate([[lo, hi, lo + 1, hi - 1, 0, -1, 1], np.arange(-40, 40),
                              rng.integers(-(1 << 12), 1 << 12, 60), rng.integers(lo, hi, rows, endpoint=True)])
        cols.append(np.clip(col, lo, hi))
    return np.stack(cols, axis=1).astype(np.int64)


def test_relax_requantization_equals_reference_mbqm():
    """relax_import.mbqm (closed forms, int32 after one 32x32->64 product) against reference.mbqm_q31
    (gemmlowp's literal forms) on every form: per-channel right shifts 1..31 ("right"), M >= 0.5 with left
    shifts up to 30 ("left"), M = 0.5 after a pre-shift ("exact" is covered below), both kinds in one tensor
    and left shifts of 31 ("mixed"), M0 = 0 channels; int32 extremes, dense ties and random values per channel."""
    from qcompile.lowering import quantize_multiplier
    from qcompile.reference import mbqm_q31
    from qcompile.targets.tvm.frontend.requant import mbqm, mbqm_form

    rng = np.random.default_rng(7)
    groups = {
        "right": np.concatenate([2.0 ** -np.arange(2, 33), [1e-10, 0.4999999, 0.3, 0.25, 2.0 ** -33],
                                 rng.uniform(1e-9, 0.49, 24)]),
        "left": np.concatenate([[0.5, 0.75, 0.9999999, 1.0, 3.7, 2.0 ** 29 * 1.9, 1e6, 2.0 ** -40],
                                rng.uniform(0.5, 300.0, 8)]),
        "mixed": np.concatenate([[0.5, 0.25, 2.0 ** -31, 7.5, 0.0, 2.0 ** 30, 2.0 ** 31 * 0.999],
                                 rng.uniform(1e-6, 2.0, 9)]),
    }
    cases = []
    for want, mult in groups.items():
        m0, sh = quantize_multiplier(mult)
        assert mbqm_form(m0, sh) == want, (want, mbqm_form(m0, sh))
        for leaf in (True, False):  # M0 as an int32 constant widened in the kernel, or an int64 constant
            cases.append({"x": _valid_inputs(rng, m0, sh, 400).astype(np.int32), "m0": m0, "sh": sh, "leaf": leaf})
    got = _compile_requant(cases, lambda bb, c, v: mbqm(v, c["m0"].reshape(1, -1), c["sh"].reshape(1, -1),
                                                         leaf=c["leaf"]))
    for c, g in zip(cases, got):
        assert g.dtype == np.int32
        np.testing.assert_array_equal(g, mbqm_q31(c["x"], c["m0"].reshape(1, -1), c["sh"].reshape(1, -1)))


def test_relax_requantize_op_equals_reference():
    """The whole Requantize translation (relax_import._requantize) against the reference's Requantize: 8-bit
    inputs with zero points and the 2^20 pre-shift of Add ("exact" for M = 0.5, "right" otherwise), a QLinear's
    ``acc + bias`` (bias folded into the rounding constant), zero points folded or not (large right shifts),
    Relu / Relu6 / full clamps, uint8 / int8 / int32 outputs, int32 extremes."""
    from onnx.reference import ReferenceEvaluator
    from tvm import relax

    from qcompile.lowering import DOMAIN, quantize_multiplier
    from qcompile.reference import Requantize
    from qcompile.targets.tvm.frontend.relax_import import _requantize, mbqm_form

    rng = np.random.default_rng(11)
    T = onnx.TensorProto
    u8, i8, i32 = (0, 255, T.UINT8), (-128, 127, T.INT8), (-(1 << 31), (1 << 31) - 1, T.INT32)
    cases = []

    def case(x, mult, *, bias=None, x_zp=0, pre=0, y_zp=0, clamp=u8, lo=None, want=None, x_bound=None):
        m0, sh = quantize_multiplier(np.asarray(mult, np.float64))
        assert want is None or mbqm_form(m0, sh, pre, x_bound) == want, (want, mbqm_form(m0, sh, pre, x_bound))
        attrs = dict(axis=1, x_zp=x_zp, pre_shift=pre, y_zp=y_zp, lo=clamp[0] if lo is None else lo, hi=clamp[1],
                     to=clamp[2])
        if x_bound is not None:
            attrs["x_bound"] = x_bound
        cases.append({"x": x, "m0": m0.astype(np.int32), "sh": sh.astype(np.int32), "bias": bias, "attrs": attrs})

    c = 16
    u8x = rng.integers(0, 256, (3, c, 5, 7)).astype(np.uint8)
    i8x = rng.integers(-128, 128, (3, c, 5, 7)).astype(np.int8)
    case(u8x, 0.5, x_zp=131, pre=20, clamp=i32, want="exact")  # Add: the larger-scale input
    case(u8x, 0.3719, x_zp=131, pre=20, clamp=i32, want="right")  # Add: the other input
    case(i8x, np.full(c, 0.5), x_zp=-3, pre=20, clamp=i32, want="exact")
    # Add as one rounding (lowering.add_multipliers): the sum of two int32 products, requantized by 2^-S
    for ra, rb, za, zb, y_zp, clamp in ((0.93, 0.41, 131, 7, 120, u8), (1.0, 1.0, 0, 0, 0, u8),
                                        (3e-7, 1e-6, -3, 12, -5, i8), (700.0, 0.02, 128, 0, 3, i32)):
        from qcompile.lowering import add_multipliers
        (ma, mb), shift, bound = add_multipliers([ra, rb], [255, 255])
        xa = rng.integers(0, 256, (3, c, 5, 7)) - za
        xb = rng.integers(0, 256, (3, c, 5, 7)) - zb
        xa[0, 0, 0, :4] = [255 - za, -za, 255 - za, -za]  # the extremes of the sum, and dense ties below
        xb[0, 0, 0, :4] = [255 - zb, -zb, -zb, 255 - zb]
        xa[1, :, :, 0], xb[1, :, :, 0] = np.arange(-c, 0)[:, None], 0
        for zp in (y_zp, 0):
            case((xa * ma + xb * mb).astype(np.int32), 2.0 ** -shift, y_zp=zp, clamp=clamp, want="pot", x_bound=bound)
    tie = np.arange(-300, 300, dtype=np.int32).reshape(1, 1, 1, -1)  # every residue of small shifts, both signs
    for n in (0, 1, 2, 5):
        case(np.broadcast_to(tie, (1, c, 1, 600)).copy(), 2.0 ** -(n + 1), clamp=i32, want="pot", x_bound=300)
    case(tie.repeat(c, 1), 2.0 ** -2, clamp=i32, want="right")  # without the promise: the int64 form
    case(u8x, 0.8, x_zp=7, y_zp=9, want="left")  # Concat / same-parameter requantization
    case(i8x, 0.03, x_zp=-5, y_zp=-4, clamp=i8, want="right")
    # QLinear accumulators + per-channel bias: every acc + bias in int32, the extremes included
    acc = rng.integers(-(1 << 31), 1 << 31, (4, c, 6, 6), dtype=np.int64)
    acc[0, :, 0, :2] = [-(1 << 31), (1 << 31) - 1]
    bias = rng.integers(-(1 << 20), 1 << 20, c).astype(np.int64)
    bias[:2] = [-(1 << 31), (1 << 31) - 1]
    b4 = bias.reshape(1, -1, 1, 1)
    acc = np.clip(acc, np.maximum(-(1 << 31), -(1 << 31) - b4), np.minimum((1 << 31) - 1, (1 << 31) - 1 - b4))
    small = rng.integers(-3000, 3000, acc.shape)  # dense rounding ties, with biases of at most 2^30
    for x, bb_ in ((acc, bias), (small, np.clip(bias, -(1 << 30), 1 << 30))):
        b = bb_.astype(np.int32).reshape(1, -1, 1, 1)
        total = x + b
        assert total.min() >= -(1 << 31) and total.max() < 1 << 31  # inputs the reference accepts
        x = x.astype(np.int32)
        case(x, rng.uniform(1e-5, 0.3, c), bias=b, y_zp=128, want="right")  # zero point in the rounding constant
        case(x, 2.0 ** -rng.integers(22, 31, c) * 1.37, bias=b, y_zp=200, want="right")  # too big to fold
        case(x, rng.uniform(1e-4, 0.02, c), bias=b, y_zp=0, lo=0, clamp=u8, want="right")  # Relu
        case(x, rng.uniform(1e-4, 0.02, c), bias=b, y_zp=-7, lo=-7, clamp=(-128, 90, T.INT8), want="right")  # Relu6
        case(x, np.concatenate([[0.0], rng.uniform(1e-4, 0.02, c - 1)]), bias=b, y_zp=3, want="right")  # M0 = 0
        case(x, rng.uniform(0.5, 0.99, c), bias=b, y_zp=5, want="left")
        case(x, np.concatenate([[0.6], rng.uniform(1e-4, 0.02, c - 1)]), bias=b, y_zp=5, want="mixed")
        case(x, 0.01, bias=b, clamp=i32, want="right")
    bias_cases = sum(cc["bias"] is not None for cc in cases)

    def build(bb, cc, v):
        x = relax.op.add(v, relax.const(cc["bias"])) if cc["bias"] is not None else v
        ins = [bb.normalize(x), relax.const(cc["m0"]), relax.const(cc["sh"])]
        return _requantize(bb, ins, cc["attrs"])

    got = _compile_requant(cases, build)
    for cc, g in zip(cases, got):
        node = onnx.helper.make_node("Requantize", ["x", "m", "s"], ["y"], domain=DOMAIN, **cc["attrs"])
        ref = ReferenceEvaluator(node, new_ops=[Requantize])
        x = cc["x"] if cc["bias"] is None else (cc["x"].astype(np.int64) + cc["bias"]).astype(np.int32)
        want = ref.run(None, {"x": x, "m": cc["m0"], "s": cc["sh"]})[0]
        assert g.dtype == want.dtype, (g.dtype, want.dtype)
        np.testing.assert_array_equal(g, want, err_msg=str(cc["attrs"]))
    assert bias_cases == 16


@pytest.mark.parametrize("explicit", [False, True])
def test_static_executor_declines_to_the_vm_unless_asked_for(explicit, tmp_path, capfd):
    """NonZero's output shape depends on the values: the static executor, which runs over statically planned
    memory, cannot run it. By default tvm-x86 then builds for the Relax VM and says why in meta.json;
    `--executor static` makes it one error line."""
    from helpers import conv_then, save_with_calib

    from qcompile import cli
    from qcompile.reference import run_reference

    path, calib = save_with_calib(tmp_path, conv_then("NonZero"))
    out = tmp_path / "out"
    argv = ["compile", str(path), "--calib", str(calib), "--target", "tvm-x86", "-o", str(out), "--no-latency"]
    rc = cli.main(argv + (["--executor", "static"] if explicit else []))
    err = capfd.readouterr().err
    if explicit:
        errors = [ln for ln in err.splitlines() if "error" in ln]
        assert rc == TargetError.exit_code and len(errors) == 1 and "static C" in errors[0], err
        assert not out.exists()
        return
    assert rc == 0, err
    meta = json.loads((out / "tvm-x86" / "meta.json").read_text())
    assert meta["executor"] == "vm" and "static C" in meta["executor_note"], meta
    assert (out / "tvm-x86" / "lib.so").is_file() and not (out / "tvm-x86" / "main").exists()
    x = {"x": np.random.default_rng(0).standard_normal((1, 1, 8, 8)).astype(np.float32)}
    ref = run_reference(onnx.load(str(out / "model.qdq.onnx")), x)["y"]
    np.testing.assert_array_equal(driver.run_artifact(out, x)["y"], ref)  # the reference's non-zero positions


def test_third_party_export_builds_static_and_bit_exact(tmp_path):
    """PP-OCR's direction classifier (Paddle2ONNX, input [-1, 3, ?, ?]): its Reshape targets are computed from
    Shape of the dynamic axes, and its decomposed HardSwish clips a float tensor with constant bounds. Before,
    TVM's importer refused the first and the build lost the Clip kernels of the second."""
    from qcompile_zoo import corpus

    e = corpus.build("ppocr-cls")
    art = driver.compile(str(e.model), calib=str(e.calib), recipe="w8a8", target="tvm-x86", out_dir=tmp_path,
                         check_numerics=False, measure_latency=False)
    meta = json.loads((tmp_path / "tvm-x86" / "meta.json").read_text())
    assert meta["executor"] == "static", meta.get("executor_note")
    lsb = art.report["lsb_vs_reference"]["tvm-x86"]
    assert "error" not in lsb and lsb["integer_ops_exact"] and lsb["max_lsb"] == 0, \
        {k: v for k, v in lsb.items() if k != "tensors"}
    test = corpus.test_samples(e)[:4]
    for sample in test:
        got, ref = art.run(sample), art.run(sample, target="onnxruntime")
        for k in ref:
            assert int(np.argmax(got[k])) == int(np.argmax(ref[k]))


def test_threads_are_bit_exact_with_one_thread(built, tmp_path):
    """``threads=2``: parallel outer loops on the generated runtime's pthread pool (depthwise convs through TVM's
    generic schedules, VNNI kernels); every output and every probed integer tensor equals the serial build's."""
    from qcompile import dataset
    from qcompile.targets import get_target

    art = built("mobilenetv2-digits")
    q = onnx.load(str(art.out_dir / "model.qdq.onnx"))
    e = zoo.build("mobilenetv2-digits")
    samples = dataset.split_samples(q, dict(np.load(e.test)), "test")[:6]
    tgt = get_target("tvm-x86", threads=2)
    tgt.build(q, tmp_path, samples[0])
    assert json.loads((tmp_path / "tvm-x86" / "meta.json").read_text())["threads"] == 2
    serial, threaded = get_target("tvm-x86").runner(art.out_dir), tgt.runner(tmp_path)
    for s in samples:
        for a, b in ((serial(s), threaded(s)), (serial.probe(s), threaded.probe(s))):
            assert a.keys() == b.keys()
            for k in a:
                np.testing.assert_array_equal(b[k], a[k], err_msg=k)


@pytest.mark.parametrize("opts", [{"threads": 0}, {"threads": True}, {"threads": 65}, {"threads": "2"},
                                  {"threads": 2, "executor": "vm"}])
def test_threads_option_is_validated(opts):
    from qcompile.errors import ConfigError
    from qcompile.targets import get_target

    with pytest.raises(ConfigError):
        get_target("tvm-x86", **opts)


def test_reexported_zoo_model_builds_static_and_bit_exact(tmp_path):
    """MobileNetV2-digits as the dynamo exporter writes it (opset 18, ReduceMean pooling, dynamic batch): the static
    executor, every integer op bit-exact, VNNI kernels for every dense conv, the generic path named for the rest."""
    from qcompile_zoo import reexport

    e = reexport.build("mobilenetv2-digits")
    art = driver.compile(str(e.model), calib=str(e.calib), recipe="w8a8", target="tvm-x86", out_dir=tmp_path,
                         max_samples=16, check_numerics=False, measure_latency=False)
    meta = json.loads((tmp_path / "tvm-x86" / "meta.json").read_text())
    assert meta["executor"] == "static", meta.get("executor_note")
    lsb = art.report["lsb_vs_reference"]["tvm-x86"]
    assert lsb["integer_ops_exact"] and lsb["max_lsb"] == 0, {k: v for k, v in lsb.items() if k != "tensors"}
    assert meta["vnni_kernels"] >= 15
    assert meta["generic_int8_kernels"] and all("groups=" in g for g in meta["generic_int8_kernels"])


def test_compiling_again_into_the_same_folder_replaces_the_build(tmp_path):
    """The second run of the same command: the target's folder (tvm-x86/) is replaced, not an OSError."""
    e = zoo.build("digits-cnn")
    for recipe in ("w8a8", "w8a8"):
        art = driver.compile(str(e.model), calib=str(e.calib), recipe=recipe, target="tvm-x86",
                             out_dir=tmp_path / "o", max_samples=4, check_numerics=False, measure_latency=False)
    assert art.report["lsb_vs_reference"]["tvm-x86"]["integer_ops_exact"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]


def _te_ops_model() -> onnx.ModelProto:
    """Conv -> Pad (constant) -> Conv -> Pad (reflect) -> Pad (edge) -> Tile -> Einsum: operators TVM's ONNX importer
    writes as kernels of its own module (``emit_te``), as TF-"same" padding (MobileNetV2, EfficientNet in
    transformers), Swin's window padding and MobileBERT export them."""
    from onnx import helper
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1"),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Pad", ["r1", "p1"], ["a"], name="pad_const", mode="constant"),
             helper.make_node("Conv", ["a", "w2"], ["c2"], name="conv2"),
             helper.make_node("Pad", ["c2", "p2"], ["b"], name="pad_reflect", mode="reflect"),
             helper.make_node("Pad", ["b", "p2"], ["d"], name="pad_edge", mode="edge"),
             helper.make_node("Tile", ["d", "reps"], ["t"], name="tile"),
             helper.make_node("Einsum", ["t", "we"], ["y"], name="einsum", equation="nchw,dc->ndhw")]
    inits = [helpers.init("w1", helpers.rand(8, 3, 3, 3, scale=0.3)),
             helpers.init("w2", helpers.rand(8, 8, 3, 3, scale=0.2)),
             helpers.init("p1", np.array([0, 0, 1, 2, 0, 0, 2, 1], np.int64)),
             helpers.init("p2", np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64)),
             helpers.init("reps", np.array([1, 1, 1, 2], np.int64)),
             helpers.init("we", helpers.rand(4, 8, scale=0.3))]
    return helpers.make(nodes, [helpers.vi("x", [1, 3, 10, 10])], [helpers.vi("y", [1, 4, 13, 26])], inits,
                        opset=17)


def test_importer_kernels_of_main_and_probe_both_kept(tmp_path):
    """Both imports (``main`` and ``probe``) come with their own ``pad``/``tile``/``einsum`` kernels; the module
    built from them keeps every one. Before, it kept the two Relax functions only and TVM failed every such model
    ("There is no definition of I.GlobalVar("pad")")."""
    model = _te_ops_model()
    we = onnx.numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "we"))
    art, lsb = helpers.compile_exact(tmp_path, model, "tvm-x86")
    meta = json.loads((tmp_path / "o" / "tvm-x86" / "meta.json").read_text())
    assert meta["executor"] == "static", meta.get("executor_note")
    lsb = art.report["lsb_vs_reference"]["tvm-x86"]
    assert "error" not in lsb and lsb["integer_ops_exact"] and lsb["max_lsb"] == 0, \
        {k: v for k, v in lsb.items() if k != "tensors"}
    x = {"x": helpers.rand(1, 3, 10, 10)}
    got, ref = art.run(x)["y"], art.run(x, target="onnxruntime")["y"]
    assert got.shape == (1, 4, 13, 26)
    np.testing.assert_allclose(got, ref, rtol=0, atol=helpers.one_step_through(tmp_path / "o", "c2", we, 1))


def test_one_dimensional_convs_lowered_bit_exact(tmp_path):
    """Speech and audio models (wav2vec2, HuBERT, Whisper's encoder) start with 1-D convs: strided, padded, grouped
    and dilated ones run as unit-height 2-D convs, every integer tensor equal to the reference. Before, the build
    declined the whole model ("QLinear Conv with 1 spatial dims is not lowered")."""
    from onnx import helper
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", strides=[2], auto_pad="SAME_UPPER"),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["y"], name="conv2", group=2, dilations=[2],
                              pads=[1, 3])]
    w2 = helpers.rand(6, 4, 3, scale=0.3)
    inits = [helpers.init("w1", helpers.rand(8, 4, 5, scale=0.3)), helpers.init("w2", w2),
             helpers.init("b2", helpers.rand(6, scale=0.1))]
    model = helpers.make(nodes, [helpers.vi("x", [1, 4, 40])], [helpers.vi("y", [1, 6, 20])], inits, opset=17)
    art, lsb = helpers.compile_exact(tmp_path, model, "tvm-x86")
    assert lsb["equal"] == 1.0
    x = {"x": helpers.rand(1, 4, 40)}
    got, ref = art.run(x)["y"], art.run(x, target="onnxruntime")["y"]
    np.testing.assert_allclose(got, ref, rtol=0, atol=helpers.one_step_through(tmp_path / "o", "r1", w2, (1, 2)))


def test_keras_conv1d_with_global_max_pooling_as_tf2onnx_writes_it(tmp_path):
    """Keras' Conv1D + GlobalMaxPooling1D through tf2onnx: [N, T, C] is unsqueezed and transposed into a unit-height
    2-D conv, squeezed back to [N, C, T] and max-pooled by a 3-D GlobalMaxPool. The integer reference ran onnx's own
    GlobalMaxPool, which maxes over the last two axes (the channels too), so the report had no comparison at all
    ("axis 2 is out of bounds" in the Squeeze after it); every integer tensor is now compared, and equal."""
    from onnx import helper
    nodes = [helper.make_node("Unsqueeze", ["x", "ax1"], ["u"], name="expand_dims"),
             helper.make_node("Transpose", ["u"], ["t"], name="to_nchw", perm=[0, 3, 1, 2]),
             helper.make_node("Conv", ["t", "w1", "b1"], ["c"], name="conv1d", strides=[1, 2], pads=[0, 2, 0, 2]),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("Squeeze", ["r", "ax2"], ["s"], name="squeeze"),
             helper.make_node("GlobalMaxPool", ["s"], ["p"], name="global_max_pooling1d"),
             helper.make_node("Squeeze", ["p", "ax2"], ["f"], name="flatten"),
             helper.make_node("MatMul", ["f", "wd"], ["y"], name="dense")]
    wd = helpers.rand(16, 10, scale=0.3)
    inits = [helpers.init("ax1", np.array([1], np.int64)), helpers.init("ax2", np.array([2], np.int64)),
             helpers.init("w1", helpers.rand(16, 12, 1, 5, scale=0.3)), helpers.init("b1", helpers.rand(16, scale=0.1)),
             helpers.init("wd", wd)]
    model = helpers.make(nodes, [helpers.vi("x", [1, 40, 12])], [helpers.vi("y", [1, 10])], inits, opset=15)
    art, lsb = helpers.compile_exact(tmp_path, model, "tvm-x86")
    assert lsb["equal"] == 1.0 and lsb["tensors"], lsb
    x = {"x": helpers.rand(1, 40, 12)}
    got, ref = art.run(x)["y"], art.run(x, target="onnxruntime")["y"]
    np.testing.assert_allclose(got, ref, rtol=0, atol=helpers.one_step_through(tmp_path / "o", "f", wd, 0))


def test_float_multiply_add_rounded_as_the_reference(tmp_path):
    """A BatchNorm that tf2onnx writes as Mul and Add after a Concat (Keras' DenseNet) is a float region. LLVM fused
    its multiply and add into one FMA, which rounds once where the reference rounds twice: about a fifth of the
    outputs were one bit off, and in DenseNet the QuantizeLinear after them flipped at ties (85 % of its integer
    tensors equal). Every float product is now rounded on its own: the float outputs equal the reference's."""
    from onnx import helper
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
             helper.make_node("Concat", ["r1", "c2"], ["cat"], name="concat", axis=1),
             helper.make_node("Mul", ["cat", "s"], ["m"], name="bn_mul"),
             helper.make_node("Add", ["m", "b"], ["y"], name="bn_add")]
    rng = np.random.default_rng(0)
    inits = [helpers.init("w1", helpers.rand(8, 3, 3, 3, scale=0.3)),
             helpers.init("w2", helpers.rand(8, 8, 3, 3, scale=0.2)),
             helpers.init("s", rng.uniform(0.5, 3, (1, 16, 1, 1)).astype(np.float32)),
             helpers.init("b", rng.normal(0, 0.3, (1, 16, 1, 1)).astype(np.float32))]
    model = helpers.make(nodes, [helpers.vi("x", [1, 3, 16, 16])], [helpers.vi("y", [1, 16, 16, 16])], inits,
                         opset=15)
    art, lsb = helpers.compile_exact(tmp_path, model, "tvm-x86")
    assert lsb["float_outputs"] == [{"output": "y", "equal": 1.0, "max_rel": 0.0}], lsb["float_outputs"]
    # the build `qcompile run` runs (compiled apart from the probe the comparison above reads) is checked as well
    assert lsb["main_outputs"] == [{"output": "y", "equal": 1.0, "max_rel": 0.0}], lsb["main_outputs"]


def test_one_by_one_max_pool_with_an_epilogue_stays_a_pool(tmp_path):
    """Keras' ResNetV2 shortcut: a 1x1 max pool with stride 2 on the float residual, then the block's add and the
    next BatchNorm (Mul, Add), ReLU, QuantizeLinear, all fused into one kernel. A reduction over one element looks
    spatial to dlight, and its inlining moved that epilogue into the pool's init and update, which then read its own
    uint8 output as the running max: a third of that tensor wrong by up to 122 steps, though every integer op was
    exact. Extent-1 reductions are now plain elementwise blocks: every integer tensor equal."""
    from onnx import helper
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
             helper.make_node("Add", ["c1", "c2"], ["a1"], name="residual1"),
             helper.make_node("MaxPool", ["a1"], ["p"], name="shortcut_pool", kernel_shape=[1, 1], strides=[2, 2]),
             helper.make_node("Conv", ["r1", "w3"], ["c3"], name="conv3", pads=[1, 1, 1, 1], strides=[2, 2]),
             helper.make_node("Add", ["p", "c3"], ["a2"], name="residual2"),
             helper.make_node("Mul", ["a2", "s"], ["m"], name="bn_mul"),
             helper.make_node("Add", ["m", "b"], ["n"], name="bn_add"),
             helper.make_node("Relu", ["n"], ["r2"], name="relu2"),
             helper.make_node("Conv", ["r2", "w4"], ["y"], name="conv4")]
    rng = np.random.default_rng(1)
    inits = [helpers.init("w1", helpers.rand(8, 3, 3, 3, scale=0.3)),
             helpers.init("w2", helpers.rand(8, 8, 3, 3, scale=0.2)),
             helpers.init("w3", helpers.rand(8, 8, 3, 3, scale=0.2)),
             helpers.init("s", rng.uniform(0.5, 1.5, (1, 8, 1, 1)).astype(np.float32)),
             helpers.init("b", rng.normal(0, 0.1, (1, 8, 1, 1)).astype(np.float32)),
             helpers.init("w4", helpers.rand(4, 8, 1, 1, scale=0.3))]
    model = helpers.make(nodes, [helpers.vi("x", [1, 3, 23, 23])], [helpers.vi("y", [1, 4, 12, 12])], inits, opset=15)
    art, lsb = helpers.compile_exact(tmp_path, model, "tvm-x86")
    assert lsb["equal"] == 1.0 and lsb["float_outputs"][0]["max_rel"] == 0.0, lsb["float_outputs"]


@pytest.mark.parametrize("pads", [(0, 0, 1, 1), (1, 1, 1, 1)], ids=["keras_same_stride2", "symmetric"])
def test_padding_after_a_conv_epilogue_keeps_its_border(pads, tmp_path):
    """A conv's zero padding, where its input's zero point is not 0 (after a swish), is an explicit pad with the
    zero point, and FuseOps puts it at the end of the previous conv's kernel. The epilogue rule moved the whole
    epilogue, pad included, under that conv's output loops (48 x 48), and the pad's extra rows and columns (49 x 49
    for Keras' "same" padding of a stride-2 conv: bottom and right only) were never written. The probe build keeps
    the conv's output, so there the pad is a kernel of its own: it was exact while the main build's output was wrong
    (Keras EfficientNetV2-B0: none of its outputs equal to the reference's). An epilogue with more elements than
    the reduction has outputs is now a loop nest of its own."""
    from onnx import helper
    c = 8
    top, left, bottom, right = pads
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Sigmoid", ["c1"], ["g1"], name="gate"),
             helper.make_node("Mul", ["c1", "g1"], ["s1"], name="swish"),
             helper.make_node("Conv", ["s1", "w2"], ["c2"], name="dw", group=c, strides=[2, 2],
                              pads=[top, left, bottom, right]),
             helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
             helper.make_node("Conv", ["r2", "w3"], ["y"], name="project")]
    inits = [helpers.init("w1", helpers.rand(c, 3, 3, 3, scale=0.3)),
             helpers.init("w2", helpers.rand(c, 1, 3, 3, scale=0.3)),
             helpers.init("w3", w3 := helpers.rand(4, c, 1, 1, scale=0.3))]
    side = (16 + top + bottom - 3) // 2 + 1
    model = helpers.make(nodes, [helpers.vi("x", [1, 3, 16, 16])], [helpers.vi("y", [1, 4, side, side])], inits,
                         opset=15)
    art, lsb = helpers.compile_exact(tmp_path, model, "tvm-x86")
    assert lsb["equal"] == 1.0 and lsb["float_outputs"][0]["max_rel"] == 0.0, lsb["float_outputs"]
    assert lsb["main_outputs"] == [{"output": "y", "equal": 1.0, "max_rel": 0.0}], lsb["main_outputs"]
    x = {"x": helpers.rand(1, 3, 16, 16)}
    np.testing.assert_allclose(art.run(x)["y"], art.run(x, target="onnxruntime")["y"], rtol=0,
                               atol=helpers.one_step_through(tmp_path / "o", "r2", w3, (1, 2, 3)))


def test_unfused_batchnorm_with_momentum_is_inference(tmp_path):
    """Paddle2ONNX (and torch at opsets 9 to 13) write a ``momentum`` attribute on every BatchNormalization. Where
    one cannot fold into a conv (after a pool: Paddle's DenseNet) it stays a float op, and onnx's own reference op
    took the attribute to mean training mode: it normalized with the batch's statistics, so the integer reference
    disagreed with ONNX Runtime and every target (up to 3 steps, 12 % of the tensor). The reference now computes
    the inference form in TVM's order: every integer tensor and the float output equal."""
    from onnx import helper
    c = 8
    rng = np.random.default_rng(2)
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("MaxPool", ["r1"], ["p"], name="pool", kernel_shape=[3, 3], strides=[2, 2],
                              pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["p", "g", "b", "mean", "var"], ["n"], name="bn",
                              epsilon=1e-5, momentum=0.9),
             helper.make_node("Relu", ["n"], ["r2"], name="relu2"),
             helper.make_node("Conv", ["r2", "w2"], ["y"], name="conv2")]
    inits = [helpers.init("w1", helpers.rand(c, 3, 3, 3, scale=0.3)),
             helpers.init("g", rng.uniform(0.5, 1.5, c).astype(np.float32)),
             helpers.init("b", rng.normal(0, 0.1, c).astype(np.float32)),
             helpers.init("mean", rng.uniform(0.2, 0.6, c).astype(np.float32)),
             helpers.init("var", rng.uniform(0.2, 0.8, c).astype(np.float32)),
             helpers.init("w2", w2 := helpers.rand(4, c, 1, 1, scale=0.3))]
    model = helpers.make(nodes, [helpers.vi("x", [1, 3, 16, 16])], [helpers.vi("y", [1, 4, 8, 8])], inits, opset=13)
    art, lsb = helpers.compile_exact(tmp_path, model, "tvm-x86")
    assert lsb["equal"] == 1.0 and lsb["float_outputs"][0]["max_rel"] == 0.0, lsb["float_outputs"]
    x = {"x": helpers.rand(1, 3, 16, 16)}
    np.testing.assert_allclose(art.run(x)["y"], art.run(x, target="onnxruntime")["y"], rtol=0,
                               atol=helpers.one_step_through(tmp_path / "o", "r2", w2, (1, 2, 3)))
