"""tvm-hexagon (Hexagon v66, HVX 128-byte vectors) under qemu-hexagon: every integer tensor equal to the integer
reference on the digits CNN, MobileNetV2-style CNN and the small ViT, vrmpy in the int8 kernels, top-1 equal to ORT
QDQ's; the freestanding runtime's float helpers (no libm on that target) equal to IEEE arithmetic (numpy)."""
import shutil
import subprocess

import numpy as np
import onnx
import pytest

import helpers
import qcompile
import qcompile_zoo as zoo
from qcompile.reference import Interpreter

tvm = pytest.importorskip("tvm", reason="the tvm extra is part of the CI install")
from qcompile.targets.tvm import hexagon  # noqa: E402
from qcompile.targets.tvm.executors.static_c import RUNTIME_DIR  # noqa: E402

ZOO = ["digits-cnn", "mobilenetv2-digits", "vit-digits"]
N_REF = 4      # held-out images compared bit for bit with the (slow, numpy) integer reference
N_TOP1 = 200   # held-out images for the top-1 comparison with ORT
HERE = __import__("pathlib").Path(__file__).parent


def _needs_tools() -> None:
    missing = [t for t in (*hexagon.TOOLS, "llvm-objdump") if shutil.which(t) is None]
    if missing:
        pytest.fail(f"missing tools (tools/setup installs them): {missing}")


@pytest.fixture(scope="module")
def built(zoo_compiled):
    _needs_tools()
    return lambda name: zoo_compiled(name, "tvm-hexagon", 16)


@pytest.mark.parametrize("name", ZOO)
def test_bit_exact_vrmpy_and_same_top1_as_ort(name, built):
    art = built(name)
    lsb = art.report["lsb_vs_reference"]["tvm-hexagon"]
    assert "error" not in lsb, lsb
    assert lsb["integer_ops_exact"] and lsb["max_lsb"] == 0 and lsb["equal"] == 1.0, lsb
    helpers.assert_main_build_equal(lsb)
    meta = hexagon.frontend.read_meta(art.out_dir / hexagon.SUBDIR)
    # every int8 conv / matmul on vrmpy but depthwise convs (each channel reduces its own 9 taps: LLVM's HVX code)
    assert meta["vrmpy_kernels"] > 0 and all("groups=" in k for k in meta["generic_int8_kernels"]), meta
    asm = subprocess.run(["llvm-objdump", "-d", "--mcpu=hexagonv66", "--mattr=+hvxv66,+hvx-length128b",
                          str(art.out_dir / hexagon.SUBDIR / "main" / "kernels.o")],
                         capture_output=True, text=True, check=True).stdout
    assert "vrmpy(" in asm
    e = zoo.build(name)
    with np.load(e.test) as t:
        test = {k: t[k][:N_TOP1] for k in t.files}
    got = art.run(test)  # the whole batch in one qemu-hexagon start
    if name != "vit-digits":  # all-integer up to the logits' DequantizeLinear: identical outputs on unseen images
        interp = Interpreter(onnx.load(str(art.out_dir / "model.qdq.onnx")))
        for i in range(N_REF):
            for k, v in interp.run({k: v[i:i + 1] for k, v in test.items()})[0].items():
                np.testing.assert_array_equal(got[k][i:i + 1], v, err_msg=f"{k} of held-out image {i}")
    # the ViT's float regions (LayerNorm, GELU, Softmax) run on Hexagon's float arithmetic (no divide instruction:
    # LLVM's reciprocal sequence): on an unseen image a float->int border may land on the other side of a tie, as on
    # AArch64's libm; its integer ops stay bit-exact (integer_ops_exact above, every tensor of the report's samples)
    ort = art.run(test, target="onnxruntime")
    out = next(iter(got))
    labels = np.load(e.labels)[:N_TOP1]
    top1 = lambda o: np.argmax(o[out].reshape(len(o[out]), -1), axis=1)  # noqa: E731
    acc = lambda o: float(np.mean(top1(o) == labels))  # noqa: E731
    assert abs(acc(got) - acc(ort)) <= 0.002, (acc(got), acc(ort))


def test_scalar_build_is_bit_exact_and_counted(built, tmp_path):
    """``hvx=False``: no HVX instruction anywhere in the kernels, the same integer results, and (the packet
    counter) many more packets per inference than the HVX build."""
    art = built("digits-cnn")
    e = zoo.build("digits-cnn")
    q = onnx.load(str(art.out_dir / "model.qdq.onnx"))
    with np.load(e.calib) as c:
        example = {k: c[k][:1] for k in c.files}
    tgt = hexagon.TvmHexagonTarget(hvx=False)
    tgt.build(q, tmp_path, example)
    asm = subprocess.run(["llvm-objdump", "-d", "--mcpu=hexagonv66", str(tmp_path / hexagon.SUBDIR / "main" /
                                                                       "kernels.o")],
                         capture_output=True, text=True, check=True).stdout
    assert "vrmpy" not in asm and " v0" not in asm
    with np.load(e.test) as t:
        test = {k: t[k][:8] for k in t.files}
    samples = [{k: v[i:i + 1] for k, v in test.items()} for i in range(8)]
    scalar, vector = tgt.runner(tmp_path).run(samples), hexagon.TvmHexagonTarget().runner(art.out_dir).run(samples)
    for a, b in zip(scalar, vector):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    hvx_packets = hexagon.packets_per_inference(art.out_dir, samples[0])
    scalar_packets = hexagon.packets_per_inference(tmp_path, samples[0])
    assert 0 < hvx_packets * 4 < scalar_packets, (hvx_packets, scalar_packets)


def test_float_helpers_match_ieee(tmp_path):
    """The runtime's soft double multiply, floor, sqrtf, nearbyintf and floorf against numpy, bit for bit, on random
    values across the ranges and the edge cases (zeros, subnormals, infinities, NaN, ties)."""
    _needs_tools()
    rt = RUNTIME_DIR / "hexagon"
    exe = tmp_path / "hexmath_check"
    subprocess.run([*hexagon.CC, f"-I{rt}", str(HERE / "c" / "hexmath_check.c"), str(rt / "hexrt.c"),
                    str(rt / "hexmath.c"), "-o", str(exe)], check=True)
    rng = np.random.default_rng(0)
    n = 600
    d = np.concatenate([rng.standard_normal(n) * 10.0 ** rng.integers(-300, 300, n),
                        [0.0, -0.0, 5e-324, -5e-324, 2.2250738585072014e-308, np.inf, -np.inf, np.nan, 1.5, -1.5,
                         0.5, -0.5, 1e308, -2.5, 4503599627370496.5]])
    d2 = np.concatenate([rng.standard_normal(n) * 10.0 ** rng.integers(-300, 300, n),
                         [3.0, 2.0, 1e-10, 1e300, 0.0, np.inf, 0.0, 1.0, 7.0, -3.0, 2.0, 1e-300, 1e10, 2.0, 1.0]])
    f = np.concatenate([np.abs(rng.standard_normal(n) * np.float32(10.0) ** rng.integers(-38, 38, n)),
                        [0.0, -0.0, 1e-45, 1.17549435e-38, np.inf, 2.0, 3.0, 0.25, 1e38, -1.0, np.nan, 4.0, 5.5e-41,
                         9.0, 1e-40]]).astype(np.float32)
    fr = np.concatenate([rng.uniform(-100, 100, n), [0.5, 1.5, 2.5, -0.5, -2.5, 8388607.5, -0.0, 0.49999997,
                                                      1e9, np.inf, -np.inf, np.nan, 3.5, -3.5, 0.0]]).astype(np.float32)
    edge = np.float32([-1e-30, 1e-30, -0.99999994, 8388607.5, -8388607.5, 2.0 ** 23, -1.0])
    ff = np.concatenate([fr[:len(d) - len(edge)], edge])
    recs = np.zeros(5 * len(d), dtype=[("op", "<u4"), ("pad", "<u4"), ("a", "<u8"), ("b", "<u8")])
    for i, (a, b) in enumerate([(d, d2), (d, d2), (f, f), (fr, fr), (ff, ff)]):
        block = recs[i * len(d):(i + 1) * len(d)]
        block["op"] = i
        if a.dtype == np.float64:
            block["a"], block["b"] = a.view(np.uint64), b.view(np.uint64)
        else:
            block["a"] = a.view(np.uint32)
    res = subprocess.run(["qemu-hexagon", str(exe)], input=recs.tobytes(), capture_output=True, check=True).stdout
    got = np.frombuffer(res, "<u8").reshape(5, len(d))
    with np.errstate(all="ignore"):
        np.testing.assert_array_equal(got[0].view(np.float64), d * d2)
        np.testing.assert_array_equal(got[1].view(np.float64), np.floor(d))
        np.testing.assert_array_equal(got[2].astype(np.uint32).view(np.float32), np.sqrt(f))
        np.testing.assert_array_equal(got[3].astype(np.uint32).view(np.float32), np.rint(fr))
        np.testing.assert_array_equal(got[4].astype(np.uint32).view(np.float32), np.floor(ff))


def _exact_on_hvx(nodes, weights: dict, shape: list[int], out_shape: list[int], tmp_path) -> dict:
    """The model of ``nodes`` (float weights by name) compiled w8a8 for tvm-hexagon: its report's comparison, asserted
    bit-exact (every integer tensor, the main build's outputs)."""
    _needs_tools()
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array((rng.standard_normal(s) * 0.3).astype(np.float32), n) for n, s in weights.items()]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)], inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    calib = {"x": rng.standard_normal((4, *shape[1:])).astype(np.float32)}
    art = qcompile.compile(model, calib=calib, recipe="w8a8", target="tvm-hexagon", out_dir=tmp_path, max_samples=2,
                           measure_latency=False)
    lsb = art.report["lsb_vs_reference"]["tvm-hexagon"]
    assert lsb["integer_ops_exact"] and lsb["equal"] == 1.0, [t for t in lsb["tensors"] if t["max_lsb"]]
    helpers.assert_main_build_equal(lsb)
    return lsb


def test_concat_requantized_at_shift_zero_is_exact_on_hvx(tmp_path):
    """Two convs concatenated at 48x48: the Concat requantizes each input to its scale with ``M >= 0.5`` (the
    "left" form, an int64 shift by 31) in 48-lane vectors, which LLVM's HVX code computed wrongly (every lane of the
    first input gave the zero point: a Keras U-Net's skip concat); vector loops now have legal widths
    (hexagon_hvx.legal_vector_loops_pass) while the convs keep vrmpy."""
    from onnx import helper

    nodes = [helper.make_node("Conv", ["x", "w0"], ["a"], pads=[1, 1, 1, 1], name="c0"),
             helper.make_node("Conv", ["x", "w1"], ["b0"], pads=[1, 1, 1, 1], name="c1"),
             helper.make_node("Relu", ["b0"], ["b"], name="r1"),
             helper.make_node("Concat", ["a", "b"], ["cat"], axis=1, name="cat"),
             helper.make_node("Conv", ["cat", "w2"], ["y"], name="c2")]
    _exact_on_hvx(nodes, {"w0": (1, 3, 3, 3), "w1": (1, 3, 3, 3), "w2": (4, 2, 1, 1)}, [1, 3, 48, 48],
                  [1, 4, 48, 48], tmp_path)
    assert hexagon.frontend.read_meta(tmp_path / hexagon.SUBDIR)["vrmpy_kernels"] > 0


def test_subpixel_conv_transpose_interleave_is_exact_on_hvx(tmp_path):
    """A stride-2 ConvTranspose (Keras "same": pads 0, 0, 1, 1) to 48x48 as its sub-pixel Conv: the phases
    interleave through a gather, ``acc[c·4 + (y % 2)·2 + x % 2, y // 2, x // 2]``, which HVX vector code read wrongly
    in 48-lane vectors in the kernel that requantizes it (a Keras U-Net's upsampling: 11 % of its values equal);
    fixed by legal vector widths (hexagon_hvx.legal_vector_loops_pass)."""
    from onnx import helper

    nodes = [helper.make_node("Conv", ["x", "w0"], ["a"], pads=[1, 1, 1, 1], name="c0"),
             helper.make_node("Relu", ["a"], ["r"], name="r0"),
             helper.make_node("ConvTranspose", ["r", "w1"], ["t"], strides=[2, 2], pads=[0, 0, 1, 1], name="up"),
             helper.make_node("Relu", ["t"], ["u"], name="r1"),
             helper.make_node("Conv", ["u", "w2"], ["y"], name="c1")]
    lsb = _exact_on_hvx(nodes, {"w0": (16, 3, 3, 3), "w1": (16, 8, 3, 3), "w2": (4, 8, 1, 1)}, [1, 3, 24, 24],
                        [1, 4, 48, 48], tmp_path)
    assert lsb["borders"] == 1  # the ConvTranspose is integer


def test_depthwise_conv_requantized_in_48_lane_vectors_is_exact_on_hvx(tmp_path):
    """A depthwise 3x3 conv 48 outputs wide requantized for the next conv (Keras MobileNet V1's conv_dw_1 at 96x96
    input): its int64 requantization ran as one 48-lane vector, and lanes 32-47 came out wrong on every row
    (integer tensors 0.68 equal); vector loops now have legal widths (hexagon_hvx.legal_vector_loops_pass)."""
    from onnx import helper

    nodes = [helper.make_node("Conv", ["x", "w0"], ["a"], pads=[1, 1, 1, 1], name="c0"),
             helper.make_node("Relu", ["a"], ["r"], name="r0"),
             helper.make_node("Conv", ["r", "w1"], ["d"], pads=[1, 1, 1, 1], group=8, name="dw"),
             helper.make_node("Relu", ["d"], ["e"], name="r1"),
             helper.make_node("Conv", ["e", "w2"], ["y"], name="pw")]
    _exact_on_hvx(nodes, {"w0": (8, 3, 3, 3), "w1": (8, 1, 3, 3), "w2": (8, 8, 1, 1)}, [1, 3, 8, 48],
                  [1, 8, 8, 48], tmp_path)


@pytest.mark.parametrize("width", [48, 80, 112, 50])
def test_int64_requantization_vector_loops_have_legal_widths_and_are_exact(width, tmp_path):
    """``int32((a·M0 + K) >> 32) >> 3`` over rows ``width`` wide, built alone by the static C executor for HVX:
    every vector loop a power of two or a multiple of 32 lanes (48 -> 3 x 16, 50 -> serial), the result equal to
    numpy's. 48, 80 and 112 lanes as whole vectors gave wrong lanes (16 past a whole vector)."""
    _needs_tools()
    import tvm_ffi
    from tvm import relax, tirx
    from tvm.script import relax as R

    from qcompile.targets.tvm.executors import static_c as sc
    from qcompile.targets.tvm.kernels.hexagon_hvx import legal_vector_extent

    m0, k = 1518500250, (1 << 30) + (1 << 33)
    bb = relax.BlockBuilder()
    x = relax.Var("x", R.Tensor((1, 8, 4, width), "int32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            op = relax.op
            q = op.add(op.multiply(op.astype(x, "int64"), relax.const(np.full((1, 8, 1, 1), m0), "int64")),
                       relax.const(k, "int64"))
            y = op.right_shift(op.astype(op.right_shift(q, relax.const(32, "int64")), "int32"),
                               relax.const(3, "int32"))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    t = hexagon.TvmHexagonTarget()
    prog = sc.lower_static(bb.get(), t.target, schedule=t.pipeline())
    widths = []
    for f in prog.tir_mod.functions.values():
        tvm_ffi.structural_walk(f, [(tirx.For, lambda lp: widths.append(int(lp.extent.value)) if int(lp.kind) == int(
            tirx.ForKind.VECTORIZED) else None)])
    assert all(legal_vector_extent(w) for w in widths), widths
    assert bool(widths) == (width != 50)  # 50 = 2 x 25: no vector of 4 lanes or more divides it
    sc.emit(prog, tmp_path, t.target, cc=hexagon.CC + hexagon.HVX_FLAGS, entry="hexagon")
    a = np.random.default_rng(0).integers(-5000, 5000, (1, 8, 4, width)).astype(np.int32)
    got, = sc.run_static(tmp_path, [{"x": a}])[0].values()
    want = ((a.astype(np.int64) * m0 + k) >> 32).astype(np.int32) >> 3
    np.testing.assert_array_equal(got, want)


def test_gelu_tanh_form_links_without_powf_and_is_exact_on_hvx(tmp_path):
    """GELU's tanh form as tf2onnx writes a Keras ``gelu(approximate=True)``: ``0.5·x·(1 + tanh(√(2/π)·(x +
    0.044715·x^3)))`` with ``Pow(x, 3)``. The freestanding target has no libm ``powf`` (a Keras text transformer
    failed to link); ``x^3`` is ``(x·x)·x`` on every target and in the reference (qcompile.floatspec)."""
    from onnx import helper

    c = {"three": 3.0, "k": 0.044715, "s": 0.7978845608, "one": 1.0, "half": 0.5}
    nodes = [helper.make_node("Constant", [], [n], value=helper.make_tensor(n, onnx.TensorProto.FLOAT, [], [v]))
             for n, v in c.items()]
    nodes += [helper.make_node("MatMul", ["x", "w0"], ["h"], name="fc0"),
              helper.make_node("Pow", ["h", "three"], ["h3"], name="pow"),
              helper.make_node("Mul", ["h3", "k"], ["t0"], name="m0"),
              helper.make_node("Add", ["h", "t0"], ["t1"], name="a0"),
              helper.make_node("Mul", ["t1", "s"], ["t2"], name="m1"),
              helper.make_node("Tanh", ["t2"], ["t3"], name="tanh"),
              helper.make_node("Add", ["t3", "one"], ["t4"], name="a1"),
              helper.make_node("Mul", ["h", "half"], ["t5"], name="m2"),
              helper.make_node("Mul", ["t5", "t4"], ["g"], name="m3"),
              helper.make_node("MatMul", ["g", "w1"], ["y"], name="fc1")]
    _exact_on_hvx(nodes, {"w0": (32, 64), "w1": (64, 16)}, [1, 8, 32], [1, 8, 16], tmp_path)


def test_softplus_and_mish_link_without_logf_and_are_exact_on_hvx(tmp_path):
    """Softplus (TVM's import: ``max(x, 0) + log(1 + exp(-|x|))``) and Mish, decomposed by an exporter into
    Softplus, Tanh and Mul: the freestanding target has no libm ``logf`` (these failed to link); the specified log
    (qcompile.floatspec) is the same on every target and in the reference."""
    from onnx import helper

    nodes = [helper.make_node("MatMul", ["x", "w0"], ["h"], name="fc0"),
             helper.make_node("Softplus", ["h"], ["sp"], name="softplus"),
             helper.make_node("Tanh", ["sp"], ["t"], name="tanh"),
             helper.make_node("Mul", ["h", "t"], ["mish"], name="mish"),
             helper.make_node("Softplus", ["mish"], ["s2"], name="softplus2"),
             helper.make_node("MatMul", ["s2", "w1"], ["y"], name="fc1")]
    _exact_on_hvx(nodes, {"w0": (16, 32), "w1": (32, 8)}, [1, 4, 16], [1, 4, 8], tmp_path)


def test_log_softmax_links_without_logf_and_is_exact_on_hvx(tmp_path):
    """A CTC head's LogSoftmax: TOPI's calls libm's ``expf`` and ``logf`` (no link on the freestanding target); the
    specified exp and log are the same on every target and in the reference."""
    from onnx import helper

    nodes = [helper.make_node("MatMul", ["x", "w0"], ["h"], name="fc0"),
             helper.make_node("LogSoftmax", ["h"], ["y"], name="log_softmax", axis=-1)]
    _exact_on_hvx(nodes, {"w0": (16, 12)}, [1, 6, 16], [1, 6, 12], tmp_path)


def test_sin_and_cos_link_without_libm_and_are_exact_on_hvx(tmp_path):
    """A diffusion model's timestep embedding (``sin`` and ``cos`` of a phase, then a Linear): TVM lowers them to
    libm's ``sinf`` / ``cosf`` (no link on the freestanding target); the specified ones are the same on every
    target and in the reference."""
    from onnx import helper

    nodes = [helper.make_node("MatMul", ["x", "w0"], ["h"], name="fc0"),
             helper.make_node("Sin", ["h"], ["s"], name="sin"),
             helper.make_node("Cos", ["h"], ["c"], name="cos"),
             helper.make_node("Concat", ["s", "c"], ["sc"], name="cat", axis=-1),
             helper.make_node("MatMul", ["sc", "w1"], ["y"], name="fc1")]
    _exact_on_hvx(nodes, {"w0": (16, 16), "w1": (32, 8)}, [1, 4, 16], [1, 4, 8], tmp_path)


def test_local_response_norms_quarter_power_links_and_is_exact_on_hvx(tmp_path):
    """LocalResponseNorm as TorchScript exports it: ``x / (k + α·avg(x²)) ** 0.75``: the β = 0.75 power was libm's
    ``powf`` (no link here); now ``sqrt(y)·sqrt(sqrt(y))`` on every target and in the reference."""
    from onnx import helper

    nodes = [helper.make_node("MatMul", ["x", "w0"], ["h"], name="fc0"),
             helper.make_node("Mul", ["h", "h"], ["sq"], name="sq"),
             helper.make_node("Add", ["sq", "k"], ["d"], name="add_k"),
             helper.make_node("Pow", ["d", "beta"], ["p"], name="pow"),
             helper.make_node("Div", ["h", "p"], ["n"], name="div"),
             helper.make_node("MatMul", ["n", "w1"], ["y"], name="fc1")]
    consts = [helper.make_node("Constant", [], [n], value=helper.make_tensor(n, onnx.TensorProto.FLOAT, [], [v]))
              for n, v in (("k", 2.0), ("beta", 0.75))]
    _exact_on_hvx(consts + nodes, {"w0": (16, 16), "w1": (16, 8)}, [1, 4, 16], [1, 4, 8], tmp_path)


def test_a_libm_call_that_cannot_link_is_named_first(tmp_path):
    """Atan lowers to libm's ``atanf``, which the freestanding target lacks: the build fails with the missing symbol
    on the error's first line (what a report or the CLI shows), not after the linker's long command line."""
    _needs_tools()
    from onnx import helper

    from qcompile.errors import TargetError

    nodes = [helper.make_node("MatMul", ["x", "w0"], ["h"], name="fc0"),
             helper.make_node("Atan", ["h"], ["s"], name="atan"),
             helper.make_node("MatMul", ["s", "w1"], ["y"], name="fc1")]
    rng = np.random.default_rng(0)
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4, 16])],
                          [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4, 8])],
                          [onnx.numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n)
                           for n, s in {"w0": (16, 16), "w1": (16, 8)}.items()])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    with pytest.raises(TargetError) as err:
        qcompile.compile(model, calib={"x": rng.standard_normal((4, 4, 16)).astype(np.float32)}, recipe="w8a8",
                         target="tvm-hexagon", out_dir=tmp_path, max_samples=2, measure_latency=False)
    assert str(err.value).splitlines()[0].startswith("static C: link: nothing defines atanf for this target"), err.value


def test_rms_norm_and_square_root_powers_link_without_powf_and_are_exact_on_hvx(tmp_path):
    """The other exponents exporters write: an RMSNorm as ``x · (mean(x^2) + ε) ** -0.5`` (``x.pow(2)`` and
    ``** -0.5`` in PyTorch), ``x ** 0.5`` and ``x ** -1``. Each was libm's ``powf`` (no link on the freestanding
    target); now ``1 / sqrt``, ``sqrt`` and ``1 / x`` on every target and in the reference (qcompile.floatspec)."""
    from onnx import helper

    c = {"two": 2.0, "eps": 1e-5, "mhalf": -0.5, "half": 0.5, "mone": -1.0, "one": 1.0}
    nodes = [helper.make_node("Constant", [], [n], value=helper.make_tensor(n, onnx.TensorProto.FLOAT, [], [v]))
             for n, v in c.items()]
    nodes += [helper.make_node("MatMul", ["x", "w0"], ["h"], name="fc0"),
              helper.make_node("Pow", ["h", "two"], ["sq"], name="sq"),
              helper.make_node("ReduceMean", ["sq"], ["ms"], axes=[-1], name="mean"),
              helper.make_node("Add", ["ms", "eps"], ["mse"], name="add_eps"),
              helper.make_node("Pow", ["mse", "mhalf"], ["inv"], name="rsqrt"),
              helper.make_node("Mul", ["h", "inv"], ["n"], name="norm"),
              helper.make_node("Abs", ["n"], ["a"], name="abs"),
              helper.make_node("Add", ["a", "one"], ["a1"], name="add_one"),
              helper.make_node("Pow", ["a1", "half"], ["root"], name="sqrt"),
              helper.make_node("Pow", ["a1", "mone"], ["rec"], name="reciprocal"),
              helper.make_node("Mul", ["n", "root"], ["t"], name="m0"),
              helper.make_node("Mul", ["t", "rec"], ["g"], name="m1"),
              helper.make_node("MatMul", ["g", "w1"], ["y"], name="fc1")]
    _exact_on_hvx(nodes, {"w0": (32, 64), "w1": (64, 16)}, [1, 8, 32], [1, 8, 16], tmp_path)


def test_float_head_products_are_rounded_before_the_add_on_hvx(tmp_path):
    """A float head after the last integer tensor: a mean pool, then ``m·s + b`` per channel. LLVM fused the
    product and the add into ``sffma`` (one rounding, the reference has two): 11 of 16 outputs equal; the products
    are Hexagon's ``sfmpy`` now (hexagon_hvx.separate_float_products_pass) and every output equal."""
    from onnx import helper

    nodes = [helper.make_node("Conv", ["x", "w0"], ["a"], pads=[1, 1, 1, 1], name="c0"),
             helper.make_node("Relu", ["a"], ["r"], name="r0"),
             helper.make_node("ReduceMean", ["r"], ["m"], axes=[2, 3], keepdims=0, name="mean"),
             helper.make_node("Mul", ["m", "s"], ["ms"], name="mul"),
             helper.make_node("Add", ["ms", "b"], ["y"], name="add")]
    lsb = _exact_on_hvx(nodes, {"w0": (16, 3, 3, 3), "s": (16,), "b": (16,)}, [1, 3, 16, 16], [1, 16], tmp_path)
    assert lsb["float_outputs"][0]["equal"] == 1.0
