"""Float ``Let`` bindings as local buffers before LLVM code generation
(:mod:`qcompile.targets.tvm.kernels.let_buffers`).

TVM's LLVM code generator binds every ``Let`` in its arithmetic analyzer, which expands a chain of bindings as a
tree: Conv -> Mish -> Softplus -> Conv sat in tvm-x86's code generation for more than 400 s. The pass must leave no
float ``Let`` for it, compute the same bits, and leave a binding under ``if_then_else`` (a guarded load) in place."""
from __future__ import annotations

import importlib
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

tvm = pytest.importorskip("tvm")
tvm_ffi = pytest.importorskip("tvm_ffi")
from tvm import te, tirx

from qcompile.targets.tvm.kernels import floatspec as fs
from qcompile.targets.tvm.kernels.let_buffers import let_buffers_pass

TARGET = tvm.target.Target({"kind": "llvm"})
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))


def _float_lets(mod) -> int:
    found = []
    tvm_ffi.structural_walk(mod, (tirx.Let, lambda n: found.append(n) if str(n.var.ty.dtype).startswith("float")
                                  else None))
    return len(found)


def _lower(func):
    """TVM's TIR pipeline and host finalization for the CPU: the module the code generator gets."""
    from tvm.tirx.build import split_host_device_mods

    mod = tvm.tirx.transform.BindTarget(TARGET.with_host(TARGET))(tvm.IRModule({"main": func}))
    pipeline, finalize_host, _ = tvm.tirx.get_default_tir_pipeline(TARGET)
    host, _ = split_host_device_mods(pipeline(mod))
    return finalize_host()(host)


def _run(host, *arrays: np.ndarray) -> np.ndarray:
    from tvm.tirx.build import codegen_build

    lib = codegen_build(host, TARGET)
    args = [tvm.runtime.tensor(a) for a in arrays]
    lib["main"](*args)
    return args[-1].numpy()


def _mish(v):
    """``v · tanh(softplus(v))`` with the specified exp and tanh, ``v`` bound once (as a fused kernel reads it)."""
    x = tirx.Var("x_m", "float32")
    return tirx.Let(x, v, x * fs.tanh(tirx.log(tirx.const(1.0, "float32") + fs.exp(x))))


def _elementwise(fn, n: int = 64):
    x = te.placeholder((n,), "float32", name="x")
    return te.create_prim_func([x, te.compute((n,), lambda i: fn(x[i]), name="y")])


def test_nested_bindings_become_buffers_with_the_same_bits():
    """One Mish: compiled with and without the pass (fast enough without it at this depth), bit for bit equal."""
    host = _lower(_elementwise(_mish))
    assert _float_lets(host) >= 10
    rewritten = let_buffers_pass()(host)
    assert _float_lets(rewritten) == 0
    x = np.concatenate([np.linspace(-100, 100, 48), [0.0, -0.0, 1e-30, np.inf, -np.inf, np.nan, 88.7, -86.1],
                        np.random.default_rng(0).standard_normal(8) * 5]).astype(np.float32)
    want = _run(host, x, np.zeros_like(x))
    got = _run(rewritten, x, np.zeros_like(x))
    assert np.array_equal(got.view(np.int32), want.view(np.int32))


def test_integer_bindings_that_float_ones_use_move_with_them():
    """The specified log binds its exponent bits as integers, which its float bindings use: all of them move (an
    integer binding left in the expression would be out of scope for the float stores before it)."""
    host = _lower(_elementwise(lambda v: fs.exp(fs.log(v))))
    rewritten = let_buffers_pass()(host)
    assert _float_lets(host) > 0 and _float_lets(rewritten) == 0
    left = []
    tvm_ffi.structural_walk(rewritten, (tirx.Let, lambda n: left.append(n)))
    assert not left
    x = np.concatenate([np.linspace(1e-3, 50, 60), [0.0, 1.0, np.inf, np.nan]]).astype(np.float32)
    assert np.array_equal(_run(rewritten, x, np.zeros_like(x)).view(np.int32),
                          _run(host, x, np.zeros_like(x)).view(np.int32))


def test_chained_bindings_compile_and_match_numpy():
    """Mish then Mish: the chain that made the code generator expand bindings without end; with the pass it
    compiles, and agrees with numpy within float32 rounding of log/tanh."""
    host = let_buffers_pass()(_lower(_elementwise(lambda v: _mish(_mish(v)))))
    assert _float_lets(host) == 0
    x = np.linspace(-8, 8, 64).astype(np.float32)

    def mish(v):
        return v * np.tanh(np.log1p(np.exp(v)))
    np.testing.assert_allclose(_run(host, x, np.zeros_like(x)), mish(mish(x.astype(np.float64))), rtol=1e-5,
                               atol=1e-6)


def test_vector_bindings():
    """A binding of a vector value (a vectorized loop's lanes) goes to a buffer of its lanes."""
    x = te.placeholder((16,), "float32", name="x")

    def fn(e):
        v, w = tirx.Var("v", "float32"), tirx.Var("w", "float32")
        return tirx.Let(v, e * tirx.const(3.0, "float32"), tirx.Let(w, v * v, w - v))
    sch = tvm.s_tir.Schedule(te.create_prim_func([x, te.compute((16,), lambda i: fn(x[i]), name="y")]))
    _, inner = sch.split(sch.get_loops(sch.get_sblock("y"))[0], [None, 4])
    sch.vectorize(inner)
    host = _lower(sch.mod["main"])
    lets = []
    tvm_ffi.structural_walk(host, (tirx.Let, lambda n: lets.append(str(n.var.ty.dtype))))
    assert lets == ["float32x4", "float32x4"]
    rewritten = let_buffers_pass()(host)
    assert _float_lets(rewritten) == 0
    a = np.arange(16, dtype=np.float32) - 5.5
    want = (a * 3) * (a * 3) - a * 3
    assert np.array_equal(_run(rewritten, a, np.zeros_like(a)), want)
    assert np.array_equal(_run(host, a, np.zeros_like(a)), want)


def _global_loads(node) -> int:
    """Loads from the function's arguments (not from the pass's local buffers)."""
    found = []
    tvm_ffi.structural_walk(node, (tvm.ir.expr.TensorLoad, lambda n: found.append(n) if n.source.scope() != "local"
                                   else None))
    return len(found)


def _branch_statements(mod) -> list:
    """The if statements the pass made (the packed API's argument checks are if statements too)."""
    found = []
    tvm_ffi.structural_walk(mod, (tirx.IfThenElse, lambda s: found.append(s) if "branch_v" in s.script() else None))
    return found


def test_binding_under_if_then_else():
    """``if_then_else`` evaluates only the branch it takes: a padded read's load out of bounds stays behind its
    condition, and of the certified erf's two polynomials one is computed. A branch that binds becomes an ``if``
    statement; the bits are the same."""
    x = te.placeholder((8,), "float32", name="x")
    padded = te.compute((10,), lambda i: tirx.if_then_else(tirx.all(i >= 1, i <= 8), fs.exp(x[i - 1]),
                                                           tirx.const(0.0, "float32")), name="y")

    def branchy(i):
        e = fs.exp(x[i])
        return tirx.if_then_else(e > tirx.const(1.0, "float32"), fs.exp(e * tirx.const(0.5, "float32")), fs.tanh(e))

    a = np.linspace(-3, 3, 8).astype(np.float32)
    for compute, n in ((padded, 10), (te.compute((8,), branchy, name="y"), 8)):
        host = _lower(te.create_prim_func([x, compute]))
        assert _float_lets(host) > 0
        rewritten = let_buffers_pass()(host)
        assert _float_lets(rewritten) == 0
        branches = _branch_statements(rewritten)
        assert len(branches) == 1
        if compute is padded:  # every read of x sits in the branch that the bounds check guards
            assert _global_loads(branches[0].then_case) == _global_loads(rewritten) == 1
        assert np.array_equal(_run(rewritten, a, np.zeros(n, np.float32)).view(np.int32),
                              _run(host, a, np.zeros(n, np.float32)).view(np.int32))


def test_mish_then_softplus_on_tvm_x86(tmp_path, monkeypatch):
    """Conv -> Mish -> Softplus -> Conv, quantized, on tvm-x86: every kernel reaches the code generator without a
    float binding, and the integer tensors and outputs equal the reference's."""
    pytest.importorskip("torch")
    import qcompile

    build = importlib.import_module("tvm.tirx.build")
    seen = []
    real = build.codegen_build

    def spy(mod, target):
        seen.append(_float_lets(mod))
        return real(mod, target)
    monkeypatch.setattr(build, "codegen_build", spy)

    from let_buffers_bench import chain_model  # the benchmark's module: Conv(3->8) -> the chain -> Conv(8->4)

    path, calib, _ = chain_model("mish+softplus", tmp_path)
    assert {"Softplus", "Tanh"} <= {n.op_type for n in onnx.load(str(path)).graph.node}
    art = qcompile.compile(str(path), calib=str(calib), recipe="w8a8", target="tvm-x86",
                           out_dir=tmp_path / "out", measure_latency=False, check_numerics=False)
    lsb = art.report["lsb_vs_reference"]["tvm-x86"]
    assert lsb["equal"] == 1.0 and all(m["equal"] == 1.0 for m in lsb["main_outputs"])
    assert seen and not any(seen)
