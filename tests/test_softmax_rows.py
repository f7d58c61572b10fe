"""The row-loop softmax kernel (qcompile.targets.tvm.kernels.softmax): its exp against the correctly rounded one, and
the kernel against TVM's default lowering of the same legalized softmax (same sums, same order)."""
from __future__ import annotations

import math

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")
from tvm import te, topi

from qcompile.targets.tvm.kernels import softmax
from qcompile.targets.tvm.x86 import host_target


def test_exp_is_correctly_rounded_on_a_dense_grid():
    x = np.concatenate([np.linspace(-110.0, 0.0, 1 << 20, dtype=np.float32), np.float32([0.0, -1e-30, -104.5])])
    ref = np.array([math.exp(v) for v in x.astype(np.float64)]).astype(np.float32)
    got = softmax.exp_numpy(x)
    assert int((got != ref).sum()) == 0


def legalized(shape):
    x = te.placeholder(shape, "float32", name="x")
    return te.create_prim_func([x, topi.nn.softmax(x, axis=-1)])


def run(func, x: np.ndarray, schedule: bool) -> np.ndarray:
    mod = tvm.IRModule({"main": func.with_attr("global_symbol", "main")})
    lib = tvm.compile(mod, target=host_target())
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
    ref = run(func, x, False)
    got = run(rows, x, True)
    np.testing.assert_array_equal(got, numpy_model(x))  # exactly the documented arithmetic
    # libm's expf is within 0.502 ulp of exp, ours correctly rounded: equal nearly everywhere; where an exp
    # differs by 1 ulp, its output and the row sum each move by at most an ulp
    assert np.mean(got == ref) > 0.99
    np.testing.assert_array_max_ulp(got, ref, maxulp=2)


def numpy_model(x: np.ndarray) -> np.ndarray:
    """Row max, exp_numpy, sequential float32 sum, float32 division."""
    rows = x.reshape(-1, x.shape[-1])
    out = np.empty_like(rows)
    for i, row in enumerate(rows):
        e = softmax.exp_numpy(row - row.max())
        total = np.float32(0.0)
        for v in e:
            total = np.float32(total + v)
        out[i] = e / total
    return out.reshape(x.shape)


def test_other_kernels_are_left_alone():
    x = te.placeholder((4, 8), "float32", name="x")
    assert softmax.rebuild(te.create_prim_func([x, topi.exp(x)]), parallel=False) is None
    assert softmax.rebuild(te.create_prim_func([x, topi.nn.softmax(x, axis=0)]), parallel=False) is None
