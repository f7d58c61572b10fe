"""The row-loop softmax kernel (qcompile.targets.tvm.kernels.softmax): exactly the reference's softmax
(qcompile.floatspec) where LLVM cannot fuse multiply-adds, and within 2 ulp of TVM's default lowering of TOPI's
softmax (libm's expf) on this host."""
from __future__ import annotations

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")
from tvm import te, topi

from qcompile import floatspec
from qcompile.targets.tvm.kernels import softmax
from qcompile.targets.tvm.x86 import host_target


def legalized(shape):
    x = te.placeholder(shape, "float32", name="x")
    return te.create_prim_func([x, topi.nn.softmax(x, axis=-1)])


def run(func, x: np.ndarray, target=None) -> np.ndarray:
    mod = tvm.IRModule({"main": func.with_attr("global_symbol", "main")})
    lib = tvm.compile(mod, target=target or host_target())
    a, out = tvm.runtime.tensor(x), tvm.runtime.tensor(np.zeros_like(x))
    lib["main"](a, out)
    return out.numpy()


@pytest.mark.parametrize("shape", [(1, 12, 32, 32), (3, 37), (2, 5, 200)])
def test_row_softmax_equals_default_lowering(shape):
    func = legalized(shape)
    if func.attrs is None or "global_symbol" not in func.attrs:
        func = func.with_attr("global_symbol", "main")
    rows = softmax.rebuild(func, parallel=True)
    assert rows is not None
    x = (np.random.default_rng(1).standard_normal(shape) * 4).astype(np.float32)
    # x86-64 without FMA: every float32 operation rounded on its own, as the reference computes them
    np.testing.assert_array_equal(run(rows, x, {"kind": "llvm", "mcpu": "x86-64"}), floatspec.softmax(x, -1))
    ref = run(func, x)
    got = run(rows, x)
    # libm's expf is within 0.502 ulp of exp, the specified one within 2: where they differ, an output and the row
    # sum move by an ulp or two
    assert np.mean(got == ref) > 0.9
    np.testing.assert_array_max_ulp(got, ref, maxulp=4)


def test_other_kernels_are_left_alone():
    x = te.placeholder((4, 8), "float32", name="x")
    assert softmax.rebuild(te.create_prim_func([x, topi.exp(x)]), parallel=False) is None
    assert softmax.rebuild(te.create_prim_func([x, topi.nn.softmax(x, axis=0)]), parallel=False) is None
