"""Static C executor: TVM kernels + generated C, run under qemu-aarch64, checked against the Relax VM."""
from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")
from tvm import relax  # noqa: E402
from tvm.relax import op as R  # noqa: E402

from qcompile.errors import TargetError  # noqa: E402
from qcompile.targets.tvm.executors import static_c as sc  # noqa: E402

A64 = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon", "+dotprod"]}
A64_CC = ["aarch64-linux-gnu-gcc", "-O2", "-static"]
M4 = {"kind": "llvm", "mtriple": "thumbv7em-none-eabi", "mcpu": "cortex-m4", "mfloat-abi": "hard"}
M4_CC = ["arm-none-eabi-gcc", "-mcpu=cortex-m4", "-mthumb", "-mfloat-abi=hard", "-mfpu=fpv4-sp-d16",
         "-O2", "--specs=nosys.specs"]


def _needs(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        pytest.skip(f"missing tools: {missing}")


def float_model():
    rng = np.random.default_rng(0)
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 3, 8, 8), "float32"))
    w = relax.const(rng.standard_normal((4, 3, 3, 3)).astype("float32"))
    w2 = relax.const((0.1 * rng.standard_normal((4 * 8 * 8, 10))).astype("float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            c = bb.emit(R.nn.conv2d(x, w, padding=1))
            r = bb.emit(R.nn.relu(c))
            f = bb.emit(R.reshape(r, (1, 4 * 8 * 8)))  # becomes an alias (no kernel)
            m = bb.emit(R.matmul(f, w2))
            o = bb.emit_output(R.nn.softmax(m))
        bb.emit_func_output(o)
    return bb.get()


def int_model(multiplier: int = 1234567):
    rng = np.random.default_rng(0)
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 3, 8, 8), "uint8"))
    w = relax.const(rng.integers(-127, 128, (4, 3, 3, 3)).astype("int8"))
    with bb.function("main", [x]):
        with bb.dataflow():
            a = bb.emit(R.subtract(R.astype(x, "int32"), relax.const(128, "int32")))
            c = bb.emit(R.nn.conv2d(a, R.astype(w, "int32"), padding=1, out_dtype="int32"))
            m = bb.emit(R.multiply(R.astype(c, "int64"), relax.const(multiplier, "int64")))
            s = bb.emit(R.right_shift(m, relax.const(31, "int64")))
            q = bb.emit(R.astype(R.clip(s, -128, 127), "int8"))
            p = bb.emit(R.nn.max_pool2d(q, pool_size=(2, 2), strides=(2, 2)))
            o = bb.emit_output(R.reshape(p, (1, 64)))  # output reshape stays a copy kernel
        bb.emit_func_output(o)
    return bb.get()


def tuple_model():
    """Two outputs: a kernel result and the model input itself (needs a copy step)."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((2, 5), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(R.nn.relu(x))
            o = bb.emit_output(relax.Tuple([bb.emit(R.add(y, relax.const(1.0, "float32"))), x]))
        bb.emit_func_output(o)
    return bb.get()


def _reference(mod, samples):
    """The same module on x86 through tvm.compile + the Relax VM; one list of outputs per sample."""
    vm = relax.VirtualMachine(tvm.compile(mod, "llvm"), tvm.cpu())
    outs = []
    for s in samples:
        res = vm["main"](*[tvm.runtime.tensor(v) for v in s.values()])
        outs.append([res.numpy()] if hasattr(res, "numpy") else [r.numpy() for r in res])
    return outs


def _build_and_run(mod, tmp_path, samples):
    prog = sc.lower_static(mod, A64)
    info = sc.emit(prog, tmp_path, A64, cc=A64_CC)
    got = sc.run_static(tmp_path, samples)
    return prog, info, got


def _check_arena(info):
    assert info["arena_lower_bound"] <= info["arena_bytes"] <= 1.05 * info["arena_lower_bound"]


def test_float_model_matches_vm(tmp_path):
    _needs("aarch64-linux-gnu-gcc", "qemu-aarch64")
    rng = np.random.default_rng(1)
    samples = [{"x": rng.standard_normal((1, 3, 8, 8)).astype("float32")} for _ in range(4)]
    mod = float_model()
    prog, info, got = _build_and_run(mod, tmp_path, samples)
    assert sum(s.kind == "kernel" for s in prog.steps) == 3  # reshape aliased, not copied
    _check_arena(info)
    for g, ref in zip(got, _reference(mod, samples)):
        np.testing.assert_allclose(g["output"], ref[0], rtol=1e-5, atol=1e-5)


def test_int_model_bit_exact(tmp_path):
    _needs("aarch64-linux-gnu-gcc", "qemu-aarch64")
    rng = np.random.default_rng(2)
    samples = [{"x": rng.integers(0, 256, (1, 3, 8, 8)).astype("uint8")} for _ in range(4)]
    mod = int_model()
    _, info, got = _build_and_run(mod, tmp_path, samples)
    _check_arena(info)
    assert info["workspace_bytes"] == 0  # the epilogue schedule inlines the pad and the requantization chain
    for g, ref in zip(got, _reference(mod, samples)):
        assert g["output"].dtype == np.int8 and len(np.unique(g["output"])) > 8
        np.testing.assert_array_equal(g["output"], ref[0])


def test_a_second_build_links_the_kernels_it_shares_and_compiles_the_others(tmp_path):
    """build_entries' probe after main: kernels equal to the first build's (but for their names) are linked from a
    copy of its object; a different kernel under a taken name is compiled renamed; both builds stay bit-exact."""
    _needs("aarch64-linux-gnu-gcc", "qemu-aarch64")
    rng = np.random.default_rng(2)
    samples = [{"x": rng.integers(0, 256, (1, 3, 8, 8)).astype("uint8")} for _ in range(3)]
    first = sc.lower_static(int_model(), A64)
    info = sc.emit(first, tmp_path / "first", A64, cc=A64_CC)
    built = sc.BuiltKernels(first.tir_mod, tmp_path / "first" / "kernels.o", info)
    kernels = {s.symbol for s in first.steps if s.kind == "kernel"}
    for name, mod in [("same", int_model()), ("other", int_model(7654321))]:
        prog = sc.lower_static(mod, A64)
        before = {s.symbol for s in prog.steps if s.kind == "kernel"}
        assert before == kernels  # the same names: TVM names kernels by their ops
        sc.emit(prog, tmp_path / name, A64, cc=A64_CC, reuse=built)
        got = sc.run_static(tmp_path / name, samples)
        meta = json.loads((tmp_path / name / "program.json").read_text())
        own = {gv.name_hint for gv in prog.tir_mod.functions}
        if name == "same":
            assert not own and meta["kernel_objects"] == ["kernels_shared.o"]
        else:  # the conv with another multiplier is compiled under a new name, the pool is linked
            assert len(own) == 1 and not own & kernels and meta["kernel_objects"] == ["kernels_shared.o", "kernels.o"]
            assert {s.symbol for s in prog.steps if s.kind == "kernel"} - own < kernels
        for g, ref in zip(got, _reference(mod, samples)):
            np.testing.assert_array_equal(g["output"], ref[0])


def test_tuple_output_with_input_passthrough(tmp_path):
    _needs("aarch64-linux-gnu-gcc", "qemu-aarch64")
    samples = [{"x": np.linspace(-1, 1, 10, dtype="float32").reshape(2, 5)}]
    mod = tuple_model()
    prog, _, got = _build_and_run(mod, tmp_path, samples)
    assert [s.kind for s in prog.steps][-1] == "copy"
    ref = _reference(mod, samples)[0]
    np.testing.assert_allclose(got[0]["output0"], ref[0], rtol=1e-6)
    np.testing.assert_array_equal(got[0]["output1"], samples[0]["x"])


def test_cortex_m4_object_links(tmp_path):
    _needs("arm-none-eabi-gcc")
    for name, mk in (("float", float_model), ("int", int_model)):
        prog = sc.lower_static(mk(), M4)
        info = sc.emit(prog, tmp_path / name, M4, cc=M4_CC, entry="bare")
        assert (tmp_path / name / "model.elf").stat().st_size > 0
        _check_arena(info)


def test_planner_reuses_dead_buffers():
    sizes = {"a": 100, "b": 100, "c": 100}
    spans = {"a": (0, 1), "b": (1, 2), "c": (2, 3)}
    plan = sc.plan_arena(sizes, spans, align=16)
    assert plan.offsets["a"] == plan.offsets["c"] and plan.offsets["a"] != plan.offsets["b"]
    assert plan.arena_bytes == plan.lower_bound == 224


def test_declines_dynamic_shapes():
    n = tvm.tirx.Var("n", "int64")
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((n, 4), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            o = bb.emit_output(R.nn.relu(x))
        bb.emit_func_output(o)
    with pytest.raises(TargetError, match="dynamic shape"):
        sc.lower_static(bb.get(), A64)


def test_declines_packed_calls():
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((4,), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            o = bb.emit_output(relax.call_dps_packed("my_ext_func", [x], relax.TensorType((4,), "float32")))
        bb.emit_func_output(o)
    with pytest.raises(TargetError, match="call_dps_packed"):
        sc.lower_static(bb.get(), A64)


def test_missing_runner_is_a_target_error(tmp_path):
    with pytest.raises(TargetError, match="program.json"):
        sc.run_static(tmp_path, [])


@pytest.mark.parametrize("cc", [["gcc", "-O2"], ["clang", "-O2"],
                                ["arm-none-eabi-gcc", "-O2", "-mcpu=cortex-m4", "-mthumb"]])
def test_constants_as_string_literals_compile_to_their_bytes(tmp_path, cc):
    """model.c's constants are string literals (sc.byte_array): every byte value, digits right after an escape, a
    length that is no multiple of a line and the exact-length rule (no NUL stored) give back the same bytes."""
    _needs(cc[0])
    data = bytes(range(256)) + b"0123456789" * 7 + b"\0"
    src = tmp_path / "bytes.c"
    src.write_text('#include <stdint.h>\n#include <stddef.h>\n' + sc.byte_array("qc_data", data) + "\n"
                   "const uint8_t *get(size_t *n) { *n = sizeof(qc_data); return qc_data; }\n")
    obj = tmp_path / "bytes.o"
    subprocess.run([*cc, "-Wall", "-Werror", "-c", str(src), "-o", str(obj)], check=True)
    rodata = tmp_path / "rodata.bin"
    objcopy = "arm-none-eabi-objcopy" if cc[0].startswith("arm") else "objcopy"
    subprocess.run([objcopy, "-O", "binary", "--only-section=.rodata*", str(obj), str(rodata)], check=True)
    assert rodata.read_bytes() == data
