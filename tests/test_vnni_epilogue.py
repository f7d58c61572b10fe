"""The requantize epilogue of a VNNI conv2d / matmul fused into the kernel's tile loop (vnni_epilogue.py)."""
from __future__ import annotations

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")
from tvm import relax, tirx  # noqa: E402

from qcompile.targets.tvm.kernels import x86_vnni as vnni  # noqa: E402
from qcompile.targets.tvm.schedules import tune  # noqa: E402
from qcompile.targets.tvm.pipeline import host_pipeline  # noqa: E402
from qcompile.targets.tvm.kernels.x86_epilogue import fuse_epilogue  # noqa: E402
from tests.test_tvm_vnni import _conv_ref, _i8, _module, _u8, needs_vnni  # noqa: E402

RNG = np.random.default_rng(3)


def _requant(acc: relax.Expr, mult: np.ndarray, shift: int, zp: int) -> relax.Expr:
    """int32 -> int64 fixed-point multiply, rounding shift, zero point, clamp, uint8: the lowering's shape."""
    op = relax.op
    wide = op.multiply(op.astype(acc, "int64"), relax.const(mult.astype(np.int64), "int64"))
    half, bits = relax.const(np.int64(1 << (shift - 1)), "int64"), relax.const(np.int64(shift), "int64")
    rounded = op.right_shift(op.add(wide, half), bits)
    return op.astype(op.clip(op.add(rounded, relax.const(np.int64(zp), "int64")), 0, 255), "uint8")


def _requant_ref(acc: np.ndarray, mult: np.ndarray, shift: int, zp: int) -> np.ndarray:
    wide = acc.astype(np.int64) * mult.astype(np.int64)
    return np.clip(((wide + (1 << (shift - 1))) >> shift) + zp, 0, 255).astype(np.uint8)


def _fused_kernels(mod, target) -> list[tirx.PrimFunc]:
    fm = tune.fused_module(mod, target)
    return [f for _, f in fm.functions_items() if isinstance(f, tirx.PrimFunc)]


def _int64_buffers(func: tirx.PrimFunc) -> list[str]:
    """Names of the int64 intermediates the function still allocates (none once the epilogue is inlined)."""
    return [line.split("=")[0].strip() for line in func.script().splitlines()
            if "alloc_buffer" in line and '"int64"' in line]


@pytest.fixture(scope="module")
def target() -> tvm.target.Target:
    return tvm.target.Target({"kind": "llvm", "mcpu": vnni.host_mcpu()})


@needs_vnni
@pytest.mark.parametrize("parallel", [False, True])
@pytest.mark.parametrize("x_shape,w_shape,padding,strides", [
    ((1, 8, 9, 11), (12, 8, 3, 3), (1, 1, 1, 1), (1, 1)),  # pixel lanes, wrapped columns
    ((1, 12, 7, 7), (40, 12, 3, 3), (1, 1, 1, 1), (1, 1)),  # channel lanes, O not a multiple of 16
    ((2, 6, 8, 8), (10, 6, 1, 1), (0, 0, 0, 0), (2, 2)),  # strided 1x1, batch 2
])
def test_conv_with_residual_epilogue_is_fused_and_bit_exact(target, parallel, x_shape, w_shape, padding,
                                                            strides) -> None:
    w = _i8(w_shape)
    o = w_shape[0]
    mult = RNG.integers(1 << 10, 1 << 14, (1, o, 1, 1))
    shift = 17
    oh, ow = vnni.conv2d_out_hw(x_shape[2:], w_shape[2:], strides, padding, (1, 1))
    res_shape = (x_shape[0], o, oh, ow)

    def body(x, r):
        acc = relax.op.nn.conv2d(x, relax.const(w), strides=strides, padding=padding, out_dtype="int32")
        q = _requant(acc, mult, shift, 3)
        return relax.op.astype(relax.op.maximum(relax.op.astype(q, "int32"), relax.op.astype(r, "int32")),
                               "uint8")  # a second input in the chain (the residual branch)

    mod = vnni.vnni_transform(_module([(x_shape, "uint8"), (res_shape, "uint8")], body), target, parallel=parallel)
    kernels = _fused_kernels(mod, target)
    assert len(kernels) == 1, [f.attrs for f in kernels]
    assert kernels[0].attrs.get("tirx.is_scheduled") and not _int64_buffers(kernels[0])
    x, r = _u8(x_shape), _u8(res_shape)
    ex = tvm.compile(mod, target, relax_pipeline=host_pipeline(target, parallel=parallel))
    got = relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(r)).numpy()
    want = np.maximum(_requant_ref(_conv_ref(x, w, strides, padding, (1, 1)), mult, shift, 3), r)
    np.testing.assert_array_equal(got, want)


@needs_vnni
@pytest.mark.parametrize("parallel", [False, True])
@pytest.mark.parametrize("pads", [(0, 0, 1, 1), (1, 1, 1, 1)])
def test_conv_epilogue_ending_in_a_pad_writes_the_border(target, parallel, pads) -> None:
    """The next conv's zero-point padding at the end of the chain (Keras' "same" padding of a stride-2 conv: bottom
    and right only). Moved under the tile loop, the pad ran only where it reads a conv output and its border was
    never written; it now runs after the kernel, every point written."""
    x_shape, w = (1, 8, 10, 10), _i8((16, 8, 3, 3))
    mult = RNG.integers(1 << 10, 1 << 14, (1, 16, 1, 1))
    top, left, bottom, right = pads
    mod = vnni.vnni_transform(_module([(x_shape, "uint8")], lambda x: relax.op.nn.pad(
        _requant(relax.op.nn.conv2d(x, relax.const(w), out_dtype="int32"), mult, 17, 5),
        [0, 0, 0, 0, top, bottom, left, right], pad_value=5.0)), target, parallel=parallel)
    kernels = _fused_kernels(mod, target)
    assert kernels[0].attrs.get("tirx.is_scheduled"), [f.attrs for f in kernels]
    if pads == (0, 0, 1, 1):  # (FuseOps gives a symmetric pad a kernel of its own)
        assert len(kernels) == 1, [f.attrs for f in kernels]
    x = _u8(x_shape)
    ex = tvm.compile(mod, target, relax_pipeline=host_pipeline(target, parallel=parallel))
    got = relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()
    want = np.pad(_requant_ref(_conv_ref(x, w, (1, 1), (0, 0, 0, 0), (1, 1)), mult, 17, 5),
                  [(0, 0), (0, 0), (top, bottom), (left, right)], constant_values=5)
    np.testing.assert_array_equal(got, want)


@needs_vnni
@pytest.mark.parametrize("x_shape", [(1, 20, 64), (20, 64)])
def test_batched_matmul_epilogue_is_fused_and_bit_exact(target, x_shape) -> None:
    """A [1, S, K] activation: the kernel writes [1, S, N] itself, so no reshape separates it from the chain."""
    n = 48
    w = _i8((x_shape[-1], n))
    mult = RNG.integers(1 << 10, 1 << 14, (n,))
    mod = vnni.vnni_transform(_module([(x_shape, "uint8")], lambda x: _requant(
        relax.op.matmul(x, relax.const(w), out_dtype="int32"), mult, 15, 0)), target)
    kernels = [f for f in _fused_kernels(mod, target) if f.attrs.get("tirx.is_scheduled")]
    assert len(kernels) == 1 and not _int64_buffers(kernels[0])
    x = _u8(x_shape)
    got = relax.VirtualMachine(tvm.compile(mod, target, relax_pipeline=host_pipeline(target)), tvm.cpu())["main"](
        tvm.runtime.tensor(x)).numpy()
    np.testing.assert_array_equal(got, _requant_ref(x.astype(np.int64) @ w.astype(np.int64), mult, 15, 0))


def test_other_kernels_are_declined(target) -> None:
    """A kernel that is not a VNNI kernel + epilogue (a plain elementwise chain) is left to the default rule."""
    mod = _module([((4, 16), "int32")], lambda x: _requant(x, np.full((16,), 3), 4, 0))
    for func in _fused_kernels(mod, target):
        assert fuse_epilogue(func) is None


@needs_vnni
def test_erf_epilogue_stays_a_kernel_of_its_own(target) -> None:
    """A chain with an erf (GELU between two quantizers) is not fused into the VNNI kernel: it
    stays a kernel of its own, where the certified-erf rebuild and the vector rule apply."""
    w = _i8((32, 16))
    op = relax.op

    def body(x):
        acc = op.matmul(x, relax.const(w), out_dtype="int32")
        y = op.multiply(op.astype(acc, "float32"), relax.const(np.float32(0.01)))
        return op.astype(op.clip(op.round(op.multiply(y, op.erf(y))), 0, 255), "uint8")

    mod = vnni.vnni_transform(_module([((1, 8, 32), "uint8")], body), target)
    kernels = _fused_kernels(mod, target)
    vnni_kernels = [f for f in kernels if f.attrs.get("op_pattern") == 8]
    assert len(vnni_kernels) == 1 and len(kernels) >= 2
    x = _u8((1, 8, 32))
    got = relax.VirtualMachine(tvm.compile(mod, target, relax_pipeline=host_pipeline(target)), tvm.cpu())["main"](
        tvm.runtime.tensor(x)).numpy()
    y = (x.astype(np.int32) @ w.astype(np.int32)).astype(np.float32) * np.float32(0.01)
    from math import erf
    want = np.clip(np.round(y * np.vectorize(erf)(y.astype(np.float64)).astype(np.float32)), 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(got, want)


@needs_vnni
def test_only_chains_with_an_erf_are_kept_apart(target) -> None:
    """The walk follows elementwise ops only: a conv whose u8 output feeds a second conv (whose chain has the erf)
    stays fusable, and so does a chain that dequantizes to float without an erf."""
    w1, w2 = _i8((8, 8, 3, 3)), _i8((8, 8, 3, 3))
    mult = RNG.integers(1 << 10, 1 << 14, (1, 8, 1, 1))
    op = relax.op

    def body(x):
        a = _requant(op.nn.conv2d(x, relax.const(w1), padding=1, out_dtype="int32"), mult, 16, 0)
        deq = op.multiply(op.astype(a, "float32"), relax.const(np.float32(0.5)))  # float, no erf
        b = op.astype(op.nn.conv2d(a, relax.const(w2), padding=1, out_dtype="int32"), "float32")
        return relax.Tuple([deq, op.erf(b)])

    mod = vnni.vnni_transform(_module([((1, 8, 6, 6), "uint8")], body), target)
    patterns = sorted(int(f.attrs["op_pattern"]) for gv, f in mod.functions_items() if "qc_vnni" in gv.name_hint)
    assert patterns == [4, 8]
