"""The certified float32 erf epilogue (qcompile.targets.tvm.kernels.certified): its error bound, bit-exactness with the
float64 kernel it replaces (including values at QuantizeLinear rounding ties, where only the exact redo is
right), and the monotonicity check that decides whether the certificate applies."""
from __future__ import annotations

import math

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")
from tvm import te, tirx

from qcompile.targets.tvm.kernels import certified, mathfns
from qcompile.targets.tvm.x86 import host_target

N = 1 << 18


def test_erf32_within_its_bound():
    x = np.linspace(-4.5, 4.5, 1 << 21, dtype=np.float32)
    ref = np.vectorize(math.erf)(x.astype(np.float64)).astype(np.float32)
    err = np.abs(certified.erf32_numpy(x).astype(np.float64) - ref)
    assert err.max() <= certified.ERR
    assert err.max() > certified.ERR / 4  # the bound is tight enough to mean something


def gelu_kernel(n: int, scale_in: float, scale_out: float, zp: float, square: bool = False):
    """acc -> x = acc * scale_in -> GELU with the float64 erf -> QuantizeLinear (uint8), as legalization emits
    it (one block per op). ``square``: erf(x)^2 in the chain, which is not monotone in erf."""
    acc = te.placeholder((n,), "int32", name="acc")
    x = te.compute((n,), lambda i: acc[i].astype("float32") * tirx.const(scale_in, "float32"), name="x")
    t = te.compute((n,), lambda i: x[i] / tirx.const(math.sqrt(2.0), "float32"), name="t")
    e = mathfns.erf_f64(t)
    if square:
        e = te.compute((n,), lambda i: e[i] * e[i], name="sq")
    g = te.compute((n,), lambda i: x[i] * (e[i] + tirx.const(1.0, "float32")) * tirx.const(0.5, "float32"),
                   name="g")
    q = te.compute((n,), lambda i: tirx.Cast("uint8", tirx.min(tirx.max(
        tirx.nearbyint(g[i] / tirx.const(scale_out, "float32")) + tirx.const(zp, "float32"),
        tirx.const(0.0, "float32")), tirx.const(255.0, "float32"))), name="q")
    return te.create_prim_func([acc, q])


def run(func, acc: np.ndarray) -> np.ndarray:
    from qcompile.targets.tvm.schedules.rules import Epilogue

    mod = tvm.IRModule({"main": func.with_attr("global_symbol", "main")})
    if not (func.attrs is not None and func.attrs.get("tirx.is_scheduled", False)):
        with tvm.target.Target(host_target()):
            mod = tvm.s_tir.dlight.ApplyDefaultSchedule(Epilogue(False))(mod)
    lib = tvm.compile(mod, target=host_target())
    a, out = tvm.runtime.tensor(acc), tvm.runtime.tensor(np.zeros(acc.shape, np.uint8))
    lib["main"](a, out)
    return out.numpy()


def test_certified_kernel_equals_the_float64_one_at_rounding_ties(monkeypatch):
    # x from -3 to 3 in steps of 2.3e-5: hundreds of outputs lie within 1e-6 of a rounding tie
    acc = np.arange(-N // 2, N // 2, dtype=np.int32) - 7
    func = gelu_kernel(N, 3.0 / (N // 2), 0.0157, 3.0)
    exact = run(func, acc)
    cert = certified.certify(func, parallel=False)
    assert cert is not None
    np.testing.assert_array_equal(run(cert, acc), exact)
    # without the interval (DELTA = 0) the float32 erf alone gets some of those ties wrong: the redo is what
    # makes the kernel exact, and these inputs exercise it
    monkeypatch.setattr(certified, "DELTA", 0.0)
    fast_only = run(certified.certify(func, parallel=False), acc)
    assert 0 < int((fast_only != exact).sum()) < N // 1000


def test_certified_kernel_tail_and_parallel_rows():
    n = 3 * certified.CHUNK + 5  # full chunks and a tail chunk
    acc = np.random.default_rng(0).integers(-40000, 40000, n).astype(np.int32)
    func = gelu_kernel(n, 1e-4, 0.02, 10.0)
    cert = certified.certify(func, parallel=True)
    assert cert is not None
    np.testing.assert_array_equal(run(cert, acc), run(func, acc))


def test_not_monotone_in_erf_is_declined():
    assert certified.certify(gelu_kernel(64, 1e-3, 0.02, 0.0, square=True), parallel=False) is None


def test_schedule_pass_uses_the_hand_built_kernels():
    from tvm import topi

    from qcompile.targets.tvm.schedules.rules import schedule_pass

    x = te.placeholder((4, 40), "float32", name="x")
    mod = tvm.IRModule({"gelu": gelu_kernel(64, 1e-3, 0.02, 0.0).with_attr("global_symbol", "gelu"),
                        "softmax": te.create_prim_func([x, topi.nn.softmax(x)]).with_attr("global_symbol", "softmax")})
    with tvm.target.Target(host_target()):
        out = schedule_pass(parallel=False)(mod)
        plain = schedule_pass(parallel=False, vector_lanes=0)(mod)  # cores without vectors: the rule alone
    # the float32 erf's variables (certified.erf32) and the specified exp's (kernels.floatspec.exp) mark rebuilds
    assert "a_erf" in out["gelu"].script() and "a_erf" not in plain["gelu"].script()
    assert "xc_e" in out["softmax"].script() and "xc_e" not in plain["softmax"].script()
