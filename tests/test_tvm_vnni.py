"""VNNI (vpdpbusd) int8 kernels for the TVM x86 target: bit-exactness, rewrite coverage, asm."""
from __future__ import annotations

import re

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")
from tvm import relax  # noqa: E402

from qcompile.targets.tvm.kernels import x86_vnni as vnni  # noqa: E402


def _host_has_vnni() -> bool:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            return "avx512_vnni" in fh.read()
    except OSError:
        return False


def needs_vnni(fn):
    """Hardware-gated: the only skip tests/conftest.py allows under CI=true."""
    return pytest.mark.hardware("avx512_vnni")(
        pytest.mark.skipif(not _host_has_vnni(), reason="host CPU lacks avx512_vnni")(fn))
RNG = np.random.default_rng(0)


@pytest.fixture(scope="module")
def target() -> tvm.target.Target:
    return tvm.target.Target({"kind": "llvm", "mcpu": vnni.host_mcpu()})


def _u8(shape) -> np.ndarray:
    return RNG.integers(0, 256, shape).astype(np.uint8)


def _i8(shape) -> np.ndarray:
    return RNG.integers(-128, 128, shape).astype(np.int8)


def _conv_ref(x, w, strides, padding, dilation) -> np.ndarray:
    """int64 NCHW/OIHW conv with zero padding (top, left, bottom, right)."""
    pt, pl, pb, pr = padding
    xp = np.pad(x.astype(np.int64), ((0, 0), (0, 0), (pt, pb), (pl, pr)))
    o, c, kh, kw = w.shape
    (sh, sw), (dh, dw) = strides, dilation
    oh, ow = vnni.conv2d_out_hw(x.shape[2:], (kh, kw), strides, padding, dilation)
    out = np.zeros((x.shape[0], o, oh, ow), np.int64)
    for i in range(kh):
        for j in range(kw):
            patch = xp[:, :, i * dh: i * dh + (oh - 1) * sh + 1: sh, j * dw: j * dw + (ow - 1) * sw + 1: sw]
            out += np.einsum("nchw,oc->nohw", patch, w[:, :, i, j].astype(np.int64))
    return out


def _module(x_shapes, build_body) -> tvm.IRModule:
    bb = relax.BlockBuilder()
    params = [relax.Var(f"x{i}", relax.TensorType(s, d)) for i, (s, d) in enumerate(x_shapes)]
    with bb.function("main", params):
        with bb.dataflow():
            out = bb.emit_output(bb.emit(build_body(*params)))
        bb.emit_func_output(out)
    return bb.get()


def _run(mod, target, *inputs) -> np.ndarray:
    vm = relax.VirtualMachine(tvm.compile(mod, target), tvm.cpu())
    return vm["main"](*(tvm.runtime.tensor(a) for a in inputs)).numpy()


def _call_tir_count(mod: tvm.IRModule) -> int:
    return mod["main"].script().count("R.call_tir(qc_vnni")


def test_host_mcpu_and_feature(target) -> None:
    assert vnni.host_mcpu()
    assert vnni.target_has_vnni(target) == _host_has_vnni()
    assert not vnni.target_has_vnni(tvm.target.Target({"kind": "llvm", "mcpu": "haswell"}))


def test_weight_packing_layout() -> None:
    w = _i8((7, 19))  # K=7, N=19: both padded
    p = vnni.pack_matmul_weight(w)
    assert p.shape == (2, 2, 16, 4)
    k, n = 5, 17
    assert p[n // 16, k // 4, n % 16, k % 4] == w[k, n]
    assert p[1, 1, 3:, :].sum() == 0 and p[:, 1, :, 3].sum() == 0
    wc = _i8((18, 6, 3, 2))
    pc = vnni.pack_conv2d_weight(wc)
    assert pc.shape == (2, 2, 3, 2, 16, 4)
    assert pc[17 // 16, 5 // 4, 2, 1, 17 % 16, 5 % 4] == wc[17, 5, 2, 1]


@needs_vnni
@pytest.mark.parametrize("x_shape,n", [((5, 30), 40), ((2, 3, 64), 48), ((1, 16), 16), ((32, 64), 64)])
def test_matmul_bit_exact(target, x_shape, n) -> None:
    k = x_shape[-1]
    w = _i8((k, n))
    mod = _module([(x_shape, "uint8")],
                  lambda x: relax.op.matmul(x, relax.const(w), out_dtype="int32"))
    new = vnni.vnni_transform(mod, target)
    assert _call_tir_count(new) == 1
    x = _u8(x_shape)
    got = _run(new, target, x)
    np.testing.assert_array_equal(got, x.astype(np.int32) @ w.astype(np.int32))


CONV_CASES = [
    # x shape, w shape, strides, padding (t, l, b, r), dilation
    ((1, 8, 10, 10), (32, 8, 3, 3), (1, 1), (0, 0, 0, 0), (1, 1)),
    ((1, 3, 17, 19), (17, 3, 3, 3), (2, 1), (1, 2, 0, 1), (2, 2)),  # C%4, O%16, strided, dilated
    ((1, 32, 7, 7), (48, 32, 1, 1), (1, 1), (0, 0, 0, 0), (1, 1)),  # pointwise
    ((2, 10, 9, 9), (16, 10, 3, 3), (2, 2), (1, 1, 1, 1), (1, 1)),  # batch 2
    ((2, 5, 9, 7), (13, 5, 3, 3), (1, 1), (1, 1, 1, 1), (1, 1)),  # pixel-lane kernel, wrapped columns dropped
    ((1, 3, 10, 11), (20, 3, 3, 2), (1, 1), (0, 1, 2, 0), (1, 1)),  # pixel-lane, asymmetric padding
]

ROWS_CASES = [  # x shape, w shape, padding (t, l, b, r), strides: positions and channels that fill no tile exactly
    ((1, 16, 16, 16), (64, 16, 1, 1), (0, 0, 0, 0), (1, 1)),
    ((1, 7, 5, 3), (9, 7, 1, 1), (0, 0, 0, 0), (1, 1)),
    ((2, 5, 9, 7), (13, 5, 3, 3), (1, 1, 1, 1), (1, 1)),
    ((1, 3, 10, 11), (20, 3, 3, 2), (0, 1, 2, 0), (1, 1)),
    ((1, 3, 23, 21), (16, 3, 7, 7), (3, 3, 3, 3), (2, 2)),  # a ResNet stem: 4 phase planes
    ((1, 6, 9, 10), (8, 6, 1, 1), (0, 0, 0, 0), (2, 2)),  # strided 1x1 projection, odd height
    ((2, 4, 11, 9), (5, 4, 3, 2), (1, 0, 0, 1), (2, 3)),  # unequal strides and padding
]


@needs_vnni
@pytest.mark.parametrize("x_shape,w_shape,padding,strides", ROWS_CASES)
def test_pixel_lane_conv_kernel_bit_exact_with_its_pad_value(target, x_shape, w_shape, padding, strides) -> None:
    """The kernel with output positions on the lanes (strided: the input split into phase planes), padding with
    a zero point (7) as its packing pass writes it: it writes NCHW itself (wrapped columns dropped)."""
    x, w, pad_value = _u8(x_shape), _i8(w_shape), 7
    g = vnni.conv2d_rows_geometry(x_shape, w_shape, padding, strides)
    func = vnni.conv2d_vnni_rows_primfunc(x_shape, w_shape, padding, parallel=False, pad_value=pad_value,
                                          strides=strides)
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target)
    n, o = x_shape[0], w_shape[0]
    out = tvm.runtime.tensor(np.full((n, o, g.oh, g.ow), -1, np.int32))
    lib["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(vnni.pack_conv2d_rows_weight(w, g.o_pad)), out)
    xp = np.pad(x.astype(np.int64), ((0, 0), (0, 0), (padding[0], padding[2]), (padding[1], padding[3])),
                constant_values=pad_value)
    want = _conv_ref(xp, w, strides, (0, 0, 0, 0), (1, 1))
    assert want.shape[2:] == (g.oh, g.ow)
    np.testing.assert_array_equal(out.numpy(), want)


def test_pixel_lane_kernel_is_chosen_where_it_pays() -> None:
    """1x1 convs always (the channel-lane kernel scatters every value to its own output plane), dilated convs
    never, others by the work each kernel does, whatever the weights' size."""
    one = (1, 1)
    assert vnni.rows_kernel_pays((1, 16, 16, 16), (64, 16, 1, 1), one, (0, 0, 0, 0), one)
    assert vnni.rows_kernel_pays((1, 16, 16, 16), (64, 16, 1, 1), (2, 2), (0, 0, 0, 0), one)
    assert not vnni.rows_kernel_pays((1, 16, 16, 16), (64, 16, 3, 3), one, (2, 2, 2, 2), (2, 2))
    assert vnni.rows_kernel_pays((1, 3, 224, 224), (64, 3, 7, 7), (2, 2), (3, 3, 3, 3), one)  # stem
    assert vnni.rows_kernel_pays((1, 64, 56, 56), (64, 64, 3, 3), one, (1, 1, 1, 1), one)
    assert not vnni.rows_kernel_pays((1, 256, 14, 14), (256, 256, 3, 3), one, (1, 1, 1, 1), one)
    # 49 positions fill 4 blocks of 16 lanes; channel lanes compute exactly 49 x 512 (measured 0.53 vs 0.67 ms)
    assert not vnni.rows_kernel_pays((1, 512, 7, 7), (512, 512, 3, 3), one, (1, 1, 1, 1), one)


@needs_vnni
@pytest.mark.parametrize("x_shape,w_shape,strides,padding,dilation", CONV_CASES)
def test_conv2d_bit_exact(target, x_shape, w_shape, strides, padding, dilation) -> None:
    w = _i8(w_shape)
    mod = _module([(x_shape, "uint8")], lambda x: relax.op.nn.conv2d(
        x, relax.const(w), strides=strides, padding=padding, dilation=dilation,
        out_dtype="int32"))
    new = vnni.vnni_transform(mod, target)
    assert _call_tir_count(new) == 1
    x = _u8(x_shape)
    got = _run(new, target, x)
    np.testing.assert_array_equal(got, _conv_ref(x, w, strides, padding, dilation))


def test_unsupported_ops_left_alone(target) -> None:
    w_dw = _i8((8, 1, 3, 3))
    w_mm = _i8((12, 16))

    def body(x, y, z):
        dw = relax.op.nn.conv2d(x, relax.const(w_dw), groups=8, out_dtype="int32")
        dyn_w = relax.op.matmul(y, z, out_dtype="int32")  # weight not a constant
        return relax.Tuple([dw, dyn_w])

    mod = _module([((1, 8, 6, 6), "uint8"), ((4, 12), "uint8"), ((12, 16), "int8")], body)
    new = vnni.vnni_transform(mod, target)
    assert _call_tir_count(new) == 0
    assert "R.nn.conv2d" in new["main"].script() and "R.matmul" in new["main"].script()
    f32 = _module([((4, 12), "float32")],
                  lambda x: relax.op.matmul(x, relax.const(w_mm.astype(np.float32))))
    assert _call_tir_count(vnni.vnni_transform(f32, target)) == 0


def test_constant_inputs_left_to_constant_folding() -> None:
    """A matmul whose activation is computed from constants only (DETR's learned object queries, quantized) is left
    to the generic lowering, whose FoldConstant evaluates it on a plain host target at build time: as a VNNI kernel
    that evaluation made LLVM abort the process ("Do not know how to split the result of this operator")."""
    cascadelake = tvm.target.Target({"kind": "llvm", "mcpu": "cascadelake"})
    w = _i8((64, 64))
    queries = RNG.standard_normal((10, 64)).astype(np.float32)

    def body(x):
        q = relax.op.astype(relax.op.clip(relax.op.round(relax.op.add(relax.const(queries), relax.const(128.0))),
                                          0, 255), "uint8")
        return relax.Tuple([relax.op.matmul(x, relax.const(w), out_dtype="int32"),
                            relax.op.matmul(q, relax.const(w), out_dtype="int32")])

    stats: dict = {}
    new = vnni.vnni_transform(_module([((10, 64), "uint8")], body), cascadelake, stats=stats)
    assert _call_tir_count(new) == 1 and new["main"].script().count("R.matmul") == 1
    assert stats == {"rewritten": 1, "declined": []}  # folded, not declined
    tvm.compile(new, cascadelake)  # FoldConstant evaluates the constant matmul on the host target


def test_no_vnni_target_is_noop() -> None:
    w = _i8((16, 16))
    mod = _module([((4, 16), "uint8")],
                  lambda x: relax.op.matmul(x, relax.const(w), out_dtype="int32"))
    haswell = tvm.target.Target({"kind": "llvm", "mcpu": "haswell"})
    assert vnni.vnni_transform(mod, haswell).same_as(mod)


def test_vpdpbusd_in_assembly(target) -> None:
    """Compiles (needs no VNNI on the host, only LLVM) and greps the object's asm."""
    cascadelake = tvm.target.Target({"kind": "llvm", "mcpu": "cascadelake"})
    w = _i8((64, 32, 3, 3))
    wm = _i8((64, 48))

    def body(x, y):
        return relax.Tuple([
            relax.op.nn.conv2d(x, relax.const(w), padding=1, out_dtype="int32"),
            relax.op.matmul(y, relax.const(wm), out_dtype="int32"),
        ])

    mod = _module([((1, 32, 14, 14), "uint8"), ((8, 64), "uint8")], body)
    new = vnni.vnni_transform(mod, cascadelake)
    assert _call_tir_count(new) == 2
    ex = tvm.compile(new, cascadelake)
    asm = "".join(m.inspect_source("s") for m in ex.mod.imports if m.kind == "llvm")
    assert re.search(r"vpdpbusd\s+[^\n]*%zmm", asm)  # the 512-bit form from the intrinsic
