"""Integer max pooling as two passes per plane (targets/tvm/kernels/pool.py), through the x86 rewrite."""
from __future__ import annotations

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")
from tvm import relax  # noqa: E402

from qcompile.targets.tvm.kernels import x86_vnni as vnni  # noqa: E402
from qcompile.targets.tvm.pipeline import host_pipeline  # noqa: E402
from tests.test_tvm_vnni import _module, needs_vnni  # noqa: E402

RNG = np.random.default_rng(5)


def _pool_ref(x: np.ndarray, size, strides, padding) -> np.ndarray:
    lowest = np.iinfo(x.dtype).min
    pt, pl, pb, pr = padding
    xp = np.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr)), constant_values=lowest)
    (kh, kw), (sh, sw) = size, strides
    oh, ow = (xp.shape[2] - kh) // sh + 1, (xp.shape[3] - kw) // sw + 1
    out = np.full((*x.shape[:2], oh, ow), lowest, x.dtype)
    for i in range(kh):
        for j in range(kw):
            out = np.maximum(out, xp[:, :, i: i + sh * (oh - 1) + 1: sh, j: j + sw * (ow - 1) + 1: sw])
    return out


@needs_vnni
@pytest.mark.parametrize("parallel", [False, True])
@pytest.mark.parametrize("shape,dtype,size,strides,padding", [
    ((1, 6, 20, 20), "uint8", (3, 3), (2, 2), (1, 1, 1, 1)),  # ResNet's stem pool, small
    ((2, 3, 9, 11), "int8", (3, 2), (2, 3), (1, 0, 0, 1)),  # int8: padding is -128, never 0
    ((1, 4, 7, 7), "uint8", (2, 2), (1, 1), (0, 0, 1, 1)),
])
def test_max_pool_is_rewritten_and_bit_exact(parallel, shape, dtype, size, strides, padding) -> None:
    target = tvm.target.Target({"kind": "llvm", "mcpu": vnni.host_mcpu()})
    mod = _module([(shape, dtype)], lambda x: relax.op.nn.max_pool2d(
        x, pool_size=size, strides=strides, padding=padding))
    new = vnni.vnni_transform(mod, target, parallel=parallel)
    assert "R.call_tir(qc_max_pool2d" in new["main"].script()
    info = np.iinfo(dtype)
    x = RNG.integers(info.min, info.max + 1, shape).astype(dtype)
    if dtype == "int8":
        x[:, :, 0, :] = -100  # a padded border value 0 would win here; the dtype's minimum must not
    ex = tvm.compile(new, target, relax_pipeline=host_pipeline(target, parallel=parallel))
    got = relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()
    np.testing.assert_array_equal(got, _pool_ref(x, size, strides, padding))


def test_other_pools_are_left_alone() -> None:
    target = tvm.target.Target({"kind": "llvm", "mcpu": vnni.host_mcpu()})
    cases = [((1, 4, 8, 8), "float32", {}), ((1, 4, 9, 9), "uint8", {"ceil_mode": True}),
             ((1, 4, 9, 9), "uint8", {"dilation": 2})]
    for shape, dtype, extra in cases:
        mod = _module([(shape, dtype)], lambda x, e=extra: relax.op.nn.max_pool2d(x, pool_size=2, strides=2, **e))
        if not vnni.target_has_vnni(target):
            pytest.skip("the rewrite runs where VNNI kernels do")
        assert "qc_max_pool2d" not in vnni.vnni_transform(mod, target)["main"].script()
