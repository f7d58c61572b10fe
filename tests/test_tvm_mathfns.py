"""mathfns.erf_f64: float32 erf equal to the reference's float32(math.erf(x)), vectorizable (no libm call)."""
from __future__ import annotations

import math

import numpy as np
import pytest

tvm = pytest.importorskip("tvm", reason="the tvm extra is part of the CI install")
from tvm import relax, te  # noqa: E402

from qcompile.targets.tvm.kernels.mathfns import erf_f64, erf_numpy, erf_pass, has_double_fpu  # noqa: E402

EDGES = [0.0, -0.0, np.inf, -np.inf, np.nan, 1e-30, -1e-38, 1e-45, 0.99999994, 1.0, 1.0000001, 3.9999998, 4.0,
         -4.0, 1e30, -2.5, 0.5]


def _inputs() -> np.ndarray:
    rng = np.random.default_rng(0)
    # dense around the piece boundaries and where GELU lives, plus every float32 in a narrow band (ties)
    band = np.arange(np.float32(0.9999).view(np.int32), np.float32(1.0001).view(np.int32), dtype=np.int32)
    xs = [np.linspace(-5, 5, 400_001), rng.standard_normal(200_000) * 2, band.view(np.float32), EDGES]
    return np.concatenate([np.asarray(x, np.float32) for x in xs])


def _want(xs: np.ndarray) -> np.ndarray:
    return np.array([math.erf(float(v)) for v in xs], np.float64).astype(np.float32)


def _same(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a.view(np.int32) == b.view(np.int32)) | (np.isnan(a) & np.isnan(b))


def test_formula_equals_math_erf_rounded_to_float32():
    xs = _inputs()
    bad = ~_same(erf_numpy(xs), _want(xs))
    assert not bad.any(), xs[bad][:10]


def test_tvm_kernel_equals_math_erf_and_calls_no_libm():
    xs = _inputs()
    x = te.placeholder((len(xs),), "float32", name="x")
    target = tvm.target.Target({"kind": "llvm"})
    lib = tvm.tirx.build(te.create_prim_func([x, erf_f64(x)]), target=target)
    a, b = tvm.runtime.tensor(xs), tvm.runtime.tensor(np.zeros_like(xs))
    lib(a, b)
    bad = ~_same(b.numpy(), _want(xs))
    assert not bad.any(), xs[bad][:10]
    assert "erf" not in lib.inspect_source("ll").replace("erf_f64", "")  # no erff/llvm erf call left


def test_pass_rewrites_float32_erf_only_on_cores_with_a_double_fpu():
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((4, 8), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit_output(relax.op.erf(x))
        bb.emit_func_output(out)
    mod = erf_pass()(bb.get())
    assert "relax.erf" not in mod.script() and "erf_f64" in mod.script()
    assert has_double_fpu(tvm.target.Target({"kind": "llvm", "mtriple": "aarch64-linux-gnu"}))
    assert not has_double_fpu(tvm.target.Target({"kind": "llvm", "mtriple": "thumbv7em-none-eabi",
                                                 "mcpu": "cortex-m4"}))
    xs = np.random.default_rng(1).standard_normal((4, 8)).astype(np.float32)
    ex = tvm.compile(mod, tvm.target.Target({"kind": "llvm"}))
    got = relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(xs)).numpy()
    np.testing.assert_array_equal(got, _want(xs.ravel()).reshape(4, 8))
