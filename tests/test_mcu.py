"""mcu-cortex-m4: firmware project built with arm-none-eabi-gcc, run on QEMU mps2-an386, bit-exact with the integer
reference, same top-1 as the ORT QDQ model; memory report and RAM/flash budget; the quantized-I/O C API (model.h
helpers bit-identical to the reference, checked with the host gcc); one clear error for an op the firmware cannot
run."""
from __future__ import annotations

import re
import shutil
import subprocess

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import qcompile_zoo as zoo
import helpers
from helpers import conv_then, init, make, rand, save_with_calib, vi
from qcompile import cli, driver
from qcompile.errors import TargetError
from qcompile.reference import Interpreter

tvm = pytest.importorskip("tvm", reason="the tvm extra is part of the CI install")
from qcompile.targets.tvm import mcu  # noqa: E402
from qcompile.targets.tvm.executors import static_c  # noqa: E402
from qcompile.targets.tvm.firmware import quantized_io  # noqa: E402
from qcompile.targets.tvm.frontend import io_cut, program  # noqa: E402

ZOO = ["digits-cnn", "mobilenetv2-digits"]
N_REF = 16      # held-out images compared bit for bit with the (slow, numpy) integer reference
N_TOP1 = 200    # held-out images for the top-1 comparison with ORT


def _needs_tools() -> None:
    missing = [t for t in mcu.TOOLS if shutil.which(t) is None]
    if missing:
        pytest.skip(f"missing tools (run tools/setup): {missing}")


def _compile(name: str, out, target: str = "mcu-cortex-m4") -> driver.Artifacts:
    e = zoo.build(name)
    return driver.compile(str(e.model), calib=str(e.calib), recipe="w8a8", target=target, out_dir=out,
                          max_samples=16, check_numerics=False, measure_latency=False)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    _needs_tools()
    cache: dict[str, driver.Artifacts] = {}

    def get(name: str) -> driver.Artifacts:
        if name not in cache:
            cache[name] = _compile(name, tmp_path_factory.mktemp(name) / "out")
        return cache[name]
    return get


def _test_set(name: str, n: int) -> dict[str, np.ndarray]:
    with np.load(zoo.build(name).test) as t:
        return {k: t[k][:n] for k in t.files}


@pytest.mark.parametrize("name", ZOO)
def test_firmware_bit_exact_and_same_top1_as_ort(name, built):
    art = built(name)
    lsb = art.report["lsb_vs_reference"]["mcu-cortex-m4"]
    assert "error" not in lsb, lsb
    assert lsb["integer_ops_exact"] and lsb["max_lsb"] == 0, lsb
    test = _test_set(name, N_TOP1)
    got = art.run(test)  # the whole batch in one QEMU start
    interp = Interpreter(onnx.load(str(art.out_dir / "model.qdq.onnx")))
    for i in range(N_REF):
        ref = interp.run({k: v[i:i + 1] for k, v in test.items()})[0]
        for k, v in ref.items():
            np.testing.assert_array_equal(got[k][i:i + 1], v, err_msg=f"{k} of held-out image {i}")
    ort = art.run(test, target="onnxruntime")
    e = zoo.build(name)
    labels = np.load(e.labels)[:N_TOP1]
    out = next(iter(got))
    top1 = lambda o: np.argmax(o[out].reshape(len(o[out]), -1), axis=1)  # noqa: E731
    agree = float(np.mean(top1(got) == top1(ort)))
    assert agree >= 0.99, f"top-1 agrees with ORT on {agree:.1%} of images"
    acc = lambda o: float(np.mean(top1(o) == labels))  # noqa: E731
    assert abs(acc(got) - acc(ort)) <= 0.005, (acc(got), acc(ort))


@pytest.mark.parametrize("name", ZOO)
def test_memory_report(name, built):
    art = built(name)
    meta = program.read_meta(art.out_dir / mcu.SUBDIR)
    mem = meta["memory"]
    assert mem["arena_bytes"] <= 1.05 * mem["arena_lower_bound"], mem
    assert mem["weights_bytes"] < mem["flash_bytes"] and mem["arena_bytes"] < mem["ram_bytes"]
    assert 0 < mem["stack_used"] < mem["stack_reserved"]
    assert mem["instructions_per_inference"] > 0
    assert {"smlad", "sxtb16", "smlabb"} <= set(meta["dsp"])


def test_make_run_and_dsp_instructions(built):
    art = built("digits-cnn")
    fw = art.out_dir / "firmware"
    assert {"Makefile", "include", "mps2_an386.ld", "src"} <= {p.name for p in fw.iterdir()}
    subprocess.run(["make", "-C", str(fw), "clean"], check=True, capture_output=True)
    res = subprocess.run(["make", "-C", str(fw), "run"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    console = res.stdout + res.stderr  # QEMU writes the semihosting console to stderr
    assert "argmax = " in console and "qc: samples=1 status=0" in console, console
    counts = mcu.dsp_counts(fw / "src" / "kernels.o")
    assert counts["smlad"] > 0 and counts["sxtb16"] > 0, counts  # DSP kernels (kernels/arm_dsp): SMLAD on SXTB16 pairs
    # quantized I/O: the kernels of an all-integer graph do no float work at all
    dis = subprocess.run(["arm-none-eabi-objdump", "-d", str(fw / "src" / "kernels.o")], capture_output=True,
                         text=True, check=True).stdout
    assert not re.search(r"\tv\w+\.f(32|64)|\tvcvt", dis) and not _undefined(fw / "src" / "kernels.o") & {
        "__aeabi_l2f", "__aeabi_i2f", "__aeabi_fmul", "__aeabi_fdiv"}
    # the example shows the int8 path on the device: float sample -> qc_quantize_input0 -> run -> dequantize
    x = _example_float(fw / "src" / "example_input.c").reshape(1, 1, 8, 8)
    ref = Interpreter(onnx.load(str(art.out_dir / "model.qdq.onnx"))).run({"input": x})[0]["logits"].reshape(-1)
    shown = re.search(r"logits =((?: -?\d+\.\d{4})+)\nargmax = (\d+)", console)
    assert shown, console
    np.testing.assert_allclose([float(v) for v in shown.group(1).split()], ref, atol=1.5e-4, rtol=0)
    assert int(shown.group(2)) == int(np.argmax(ref))


def _undefined(obj) -> set[str]:
    nm = subprocess.run(["arm-none-eabi-nm", "-u", str(obj)], capture_output=True, text=True, check=True)
    return {line.split()[-1] for line in nm.stdout.splitlines() if line.strip()}


def _example_float(path) -> np.ndarray:
    body = path.read_text().split("qc_example_input0_f32")[1]
    return np.array([float.fromhex(v) for v in re.findall(r"(-?0x[0-9a-f.]+p[-+]?\d+)f", body)], np.float32)


def test_float_io_kernels_call_soft_float_by_rtabi_names(built, tmp_path):
    """The float-I/O lowering of the same model dequantizes its int32 logits in the kernels (int64 -> float):
    soft-float helpers by their RTABI names (base AAPCS, as libgcc implements them), never the GNU names that LLVM
    calls with the VFP convention for an unnormalized "thumbv7em-none-eabi" (int64 -> float read s0: zeros)."""
    art = built("digits-cnn")
    prog = program.lower_to_relax(onnx.load(str(art.out_dir / "model.qdq.onnx")), None, probe=False)
    assert prog.quantized_io is None and prog.returns == ["logits"]
    static_prog = static_c.lower_static(prog.mod, mcu.CORTEX_M4.target, output_names=prog.outputs)
    static_c.build_kernels(static_prog, mcu.CORTEX_M4.target, tmp_path / "kernels.o")
    undefined = _undefined(tmp_path / "kernels.o")
    gnu = {s for s in undefined if re.fullmatch(r"__(\w+[sd]f[23]?|fix\w+)", s)}
    assert "__aeabi_l2f" in undefined and not gnu, undefined


def test_budget_too_small_is_one_error_and_leaves_nothing(tmp_path, monkeypatch):
    _needs_tools()
    monkeypatch.setattr(driver, "get_target", lambda name: mcu.McuCortexM4Target(ram_kb=16))
    out = tmp_path / "out"
    with pytest.raises(TargetError, match=r"does not fit: RAM .* > budget 16 KB.*largest tensors: activation"):
        _compile("digits-cnn", out)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_check_budget_names_largest_tensors():
    mem = {"ram_bytes": 200 * 1024, "flash_bytes": 100 * 1024, "arena_bytes": 150 * 1024, "stack_reserved": 16384,
           "io_bytes": 64, "weights_bytes": 60 * 1024,
           "largest_tensors": [{"name": "lv1", "bytes": 90000, "memory": "ram", "kind": "activation", "kernel": "conv"},
                               {"name": "c3", "bytes": 50000, "memory": "flash", "kind": "constant", "kernel": "fc"}]}
    mcu.check_budget(mem, ram_kb=256, flash_kb=128)
    with pytest.raises(TargetError, match=r"flash 100.0 KB > budget 64 KB.*constant c3 \(fc\)"):
        mcu.check_budget(mem, flash_kb=64)
    with pytest.raises(TargetError, match=r"RAM 200.0 KB > budget 128 KB.*activation lv1 \(conv\)"):
        mcu.check_budget(mem, ram_kb=128)


# ------------------------------------------------------------------------------------------- quantized I/O
def _define(header: str, name: str) -> str:
    m = re.search(rf"^#define {name} (.+?)(?: /\*.*)?$", header, re.M)
    assert m, f"{name} not in model.h"
    return m.group(1).strip()


def test_int8_api_in_model_h_matches_the_qdq_model(built):
    art = built("digits-cnn")
    h = (art.out_dir / "firmware" / "include" / "model.h").read_text()
    q = onnx.load(str(art.out_dir / "model.qdq.onnx"))
    inits = {i.name: numpy_helper.to_array(i) for i in q.graph.initializer}
    producer = {o: n for n in q.graph.node for o in n.output}
    qin = next(n for n in q.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "input")
    s_in, z_in = inits[qin.input[1]], inits[qin.input[2]]
    assert _define(h, "QC_INT8_IO") == "1"
    assert f"typedef {quantized_io.C_TYPES[z_in.dtype.name]} qc_input0_t;" in h and z_in.dtype == np.uint8
    assert np.float32(float.fromhex(_define(h, "QC_INPUT0_SCALE").rstrip("f"))) == np.float32(s_in)
    assert int(_define(h, "QC_INPUT0_ZERO_POINT")) == int(z_in)
    assert _define(h, "QC_INPUT0_SHAPE") == "{1, 1, 8, 8}" and _define(h, "QC_INPUT0_SIZE") == "64u"
    # logits = Gemm(DQ(x), DQ(w)): the firmware returns the int32 accumulator, scale s_x * s_w per channel
    gemm = producer["logits"]
    s_x, s_w = (inits[producer[i].input[1]] for i in gemm.input[:2])
    want = (np.float64(s_x) * s_w.astype(np.float64)).astype(np.float32)
    table = re.search(r"qc_output0_scale\(uint32_t c\) \{\n  static const float scales\[10\] = \{(.*?)\};", h, re.S)
    got = np.array([float.fromhex(v) for v in re.findall(r"(0x[0-9a-f.]+p[-+]\d+)f", table.group(1))], np.float32)
    np.testing.assert_array_equal(got, want)
    assert "typedef int32_t qc_output0_t;" in h and _define(h, "QC_OUTPUT0_ZERO_POINT") == "0"
    assert _define(h, "QC_OUTPUT0_SHAPE") == "{1, 10}" and _define(h, "QC_OUTPUT0_AXIS").startswith("1")
    assert "static inline int qc_model_run_int8(const qc_input0_t *in0, qc_output0_t *out0)" in h
    meta = program.read_meta(art.out_dir / mcu.SUBDIR)
    assert meta["quantized_io"]["enabled"] and meta["inputs"][0]["dtype"] == "float32"
    assert meta["io"]["main"]["inputs"] == [{"name": qin.output[0], "shape": [1, 1, 8, 8], "dtype": "uint8",
                                             "nbytes": 64}]


HOST_TEST_C = r"""
#include <stdio.h>
#include <stdlib.h>
#include "model.h"

/* argv[1]: float32 x[], argv[2]: qc_output0_t q[] (whole blocks) -> argv[3]: qc_quantize_input0 of each block
 * of x, then qc_dequantize_output0 of each block of q. */
static void *slurp(const char *path, long *n) {
  FILE *f = fopen(path, "rb");
  void *buf;
  fseek(f, 0, SEEK_END);
  *n = ftell(f);
  fseek(f, 0, SEEK_SET);
  buf = malloc((size_t)*n + 1);
  if (fread(buf, 1, (size_t)*n, f) != (size_t)*n) exit(2);
  fclose(f);
  return buf;
}

int main(int argc, char **argv) {
  long nx, nq, i;
  const float *x = slurp(argv[1], &nx);
  const qc_output0_t *q = slurp(argv[2], &nq);
  FILE *out = fopen(argv[3], "wb");
  static qc_input0_t qx[QC_INPUT0_SIZE];
  static float y[QC_OUTPUT0_SIZE];
  (void)argc;
  for (i = 0; i < nx / (long)sizeof(float); i += QC_INPUT0_SIZE) {
    qc_quantize_input0(x + i, qx);
    fwrite(qx, sizeof qx, 1, out);
  }
  for (i = 0; i < nq / (long)sizeof(qc_output0_t); i += QC_OUTPUT0_SIZE) {
    qc_dequantize_output0(q + i, y);
    fwrite(y, sizeof y, 1, out);
  }
  return fclose(out);
}
"""


def _adversarial_floats(scale: float, zp: int, dtype: str) -> np.ndarray:
    """Ties (k + 1/2)·scale and their float32 neighbours over the whole range and past both ends, zeros of
    both signs, infinities, huge, tiny and denormal values."""
    info = np.iinfo(dtype)
    s = np.float32(scale)
    k = np.arange(info.min - zp - 4, info.max - zp + 4, dtype=np.float64)
    ties = np.concatenate([((k + 0.5) * np.float64(s)).astype(np.float32), (k + 0.5).astype(np.float32) * s,
                           (k * np.float64(s)).astype(np.float32)])
    near = np.concatenate([ties, np.nextafter(ties, np.float32(np.inf)), np.nextafter(ties, np.float32(-np.inf))])
    fmax, tiny = np.finfo(np.float32).max, np.finfo(np.float32).smallest_subnormal
    special = np.array([0.0, -0.0, np.inf, -np.inf, fmax, -fmax, 1e30, -1e30, 3e9, -3e9, tiny, -tiny, 1e-38,
                        -1e-38, s / 2, -s / 2, s * 0.49999997, -s * 0.49999997], np.float32)
    noise = (np.random.default_rng(0).standard_normal(4096) * s * (info.max - info.min)).astype(np.float32)
    return np.concatenate([near, special, noise]).astype(np.float32)


def _adversarial_ints(dtype: str) -> np.ndarray:
    info = np.iinfo(dtype)
    if info.bits <= 16:
        return np.arange(info.min, info.max + 1, dtype=np.int64).astype(dtype)
    edges = [info.min, info.min + 1, -1, 0, 1, info.max - 1, info.max, 2**24, 2**24 + 1, 2**24 + 3, -(2**24) - 1,
             2**25 + 3, 123456789, -987654321]
    rand_ints = np.random.default_rng(1).integers(info.min, info.max, 4096, endpoint=True)
    return np.concatenate([np.array(edges, np.int64), rand_ints]).astype(dtype)


def _check_helpers_on_host(header: str, qio: dict, tmp) -> None:
    """Compile HOST_TEST_C against ``header`` with the host gcc (-Wall -Wextra -Werror, strict C99) and compare
    input 0's quantize and output 0's dequantize helpers with the reference's ops (mcu.QuantizedIO), bit for bit."""
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "model.h").write_text(header)
    (tmp / "t.c").write_text(HOST_TEST_C)
    res = subprocess.run(["gcc", "-std=c99", "-O2", "-Wall", "-Wextra", "-Werror", "-I", str(tmp), str(tmp / "t.c"),
                          "-lm", "-o", str(tmp / "t")], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    e_in, e_out = qio["inputs"][0], qio["outputs"][0]
    n_in, n_out = int(np.prod(e_in["shape"])), int(np.prod(e_out["shape"]))
    x = _adversarial_floats(e_in["scale"][0], e_in["zero_point"], e_in["dtype"])
    x = np.concatenate([x, np.zeros(-len(x) % n_in, np.float32)])
    q = _adversarial_ints(e_out["dtype"])
    q = np.concatenate([q, np.zeros(-len(q) % n_out, q.dtype)])
    (tmp / "x.bin").write_bytes(x.tobytes())
    (tmp / "q.bin").write_bytes(q.tobytes())
    subprocess.run([str(tmp / "t"), str(tmp / "x.bin"), str(tmp / "q.bin"), str(tmp / "out.bin")], check=True)
    raw = (tmp / "out.bin").read_bytes()
    got_q = np.frombuffer(raw[:x.size * np.dtype(e_in["dtype"]).itemsize], e_in["dtype"])
    got_y = np.frombuffer(raw[x.size * np.dtype(e_in["dtype"]).itemsize:], np.float32)
    ref = mcu.QuantizedIO(qio)
    with np.errstate(invalid="ignore", over="ignore"):
        want_q = np.concatenate([ref.quantize({e_in["name"]: b.reshape(e_in["shape"])})[e_in["q"]].reshape(-1)
                                 for b in x.reshape(-1, n_in)])
    want_y = np.concatenate([ref.dequantize({e_out["q"]: b.reshape(e_out["shape"])}, {})[e_out["name"]].reshape(-1)
                             for b in q.reshape(-1, n_out)])
    assert got_q.dtype == want_q.dtype and want_y.dtype == np.float32
    bad = np.flatnonzero(got_q != want_q)
    assert bad.size == 0, [(float(x[i]), int(got_q[i]), int(want_q[i])) for i in bad[:10]]
    bad = np.flatnonzero(got_y.view(np.uint32) != want_y.view(np.uint32))
    assert bad.size == 0, [(int(q[i]), float(got_y[i]), float(want_y[i])) for i in bad[:10]]
    lo, hi = np.iinfo(e_in["dtype"]).min, np.iinfo(e_in["dtype"]).max
    assert {lo, hi} <= set(got_q.tolist())  # both saturation ends were exercised


SYNTHETIC = [  # (input dtype, scale, zero point), (output dtype, shape, scales, axis, zero point)
    (("int8", 0.05, -3), ("int8", [4], [0.1], 1, 5)),
    (("uint8", 1 / 3, 128), ("uint8", [2, 3, 4], [0.5, 0.013, 3e-5], 1, 128)),
    (("int16", 7.3e-4, 11), ("int32", [6], [1.7e-6], 0, -7)),
    (("uint16", 3.1, 0), ("int32", [2, 5], [2.0**-20, 0.1, 1e-3, 7.7, 1e-9], -1, 0)),
]


def _synthetic_qio(spec) -> dict:
    (idt, isc, izp), (odt, oshape, osc, oaxis, ozp) = spec
    return {"enabled": True,
            "inputs": [{"name": "x", "q": "x_q", "dtype": idt, "shape": [3, 5], "scale": [float(np.float32(isc))],
                        "zero_point": izp, "axis": 0}],
            "outputs": [{"name": "y", "q": "y_q", "dtype": odt, "shape": oshape,
                         "scale": [float(np.float32(v)) for v in osc], "zero_point": ozp, "axis": oaxis}]}


@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs the host gcc")
def test_quantize_helpers_bit_identical_to_reference(built, tmp_path):
    """The digits CNN's own model.h (uint8 input, int32 per-channel logits), then synthetic headers for the other
    types, zero points and per-axis layouts the generator emits."""
    art = built("digits-cnn")
    qio = program.read_meta(art.out_dir / mcu.SUBDIR)["quantized_io"]
    _check_helpers_on_host((art.out_dir / "firmware" / "include" / "model.h").read_text(), qio, tmp_path / "digits")
    for k, spec in enumerate(SYNTHETIC):
        qio = _synthetic_qio(spec)
        header = ("#ifndef T_H_\n#define T_H_\n#include <stdint.h>\n"
                  "int qc_model_run(const void *const *inputs, void *const *outputs);\n"
                  f"{quantized_io.quantized_io_h(qio)}#endif\n")
        _check_helpers_on_host(header, qio, tmp_path / f"synthetic{k}")


def test_float_io_kept_when_an_input_feeds_float_ops(tmp_path):
    """Sigmoid(x) -> Conv: the input is not quantized directly, so the firmware keeps float I/O, says so in
    model.h and meta.json, and still matches the reference on its integer ops."""
    _needs_tools()
    nodes = [helper.make_node("Sigmoid", ["x"], ["s"], name="sig"),
             helper.make_node("Conv", ["s", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["y"], name="relu")]
    path, calib = save_with_calib(tmp_path, make(nodes, [vi("x", [1, 2, 6, 6])], [vi("y", [1, 4, 6, 6])],
                                                 [init("w", rand(4, 2, 3, 3, scale=0.3))], opset=17))
    art = driver.compile(str(path), calib=str(calib), recipe="w8a8", target="mcu-cortex-m4",
                         out_dir=tmp_path / "out", check_numerics=False, measure_latency=False)
    h = (art.out_dir / "firmware" / "include" / "model.h").read_text()
    assert _define(h, "QC_INT8_IO") == "0" and "input 'x' is not read by QuantizeLinear alone (Sigmoid)" in h
    meta = program.read_meta(art.out_dir / mcu.SUBDIR)
    assert meta["quantized_io"] == {"enabled": False, "reason": "input 'x' is not read by QuantizeLinear alone "
                                                                "(Sigmoid)"}
    assert meta["io"]["main"]["inputs"][0]["dtype"] == "float32"
    lsb = art.report["lsb_vs_reference"]["mcu-cortex-m4"]
    assert lsb["integer_ops_exact"], lsb


def test_strip_quantized_io_cases():
    """Two QuantizeLinear of one input with the same parameters share the integer input; different ones, a
    per-channel input scale or an output that is not dequantized keep the float graph, with the reason."""
    def graph(q2_scale: float, out_dq: bool = True) -> onnx.ModelProto:
        nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"], name="q1"),
                 helper.make_node("QuantizeLinear", ["x", "s2", "z"], ["xq2"], name="q2"),
                 helper.make_node("Add", ["xq", "xq2"], ["t"], name="add")]
        nodes.append(helper.make_node("DequantizeLinear", ["t", "s", "z"], ["y"], name="dq") if out_dq
                     else helper.make_node("Cast", ["t"], ["y"], to=TensorProto.FLOAT, name="cast"))
        inits = [init("s", np.float32(0.5)), init("s2", np.float32(q2_scale)), init("z", np.uint8(3))]
        return make(nodes, [vi("x", [2])], [vi("y", [2])], inits)

    cut = io_cut.strip_quantized_io(graph(0.5))
    assert [n.op_type for n in cut.model.graph.node] == ["Identity", "Add"]
    assert [i.name for i in cut.model.graph.input] == ["xq"] and [o.name for o in cut.model.graph.output] == ["t"]
    assert cut.inputs[0].q == "xq" and cut.inputs[0].zero_point.dtype == np.uint8 and cut.outputs[0].q == "t"
    with pytest.raises(io_cut.NotStrippable, match="input 'x' is quantized with 2 different scales"):
        io_cut.strip_quantized_io(graph(0.25))
    with pytest.raises(io_cut.NotStrippable, match="output 'y' is not computed by a DequantizeLinear \\(Cast\\)"):
        io_cut.strip_quantized_io(graph(0.5, out_dq=False))


# ------------------------------------------------------------------------------------------- unsupported ops
def test_topk_runs_in_firmware(tmp_path):
    """TopK (a detector's choice of candidates): TVM's own lowering is a sort in its C++ runtime, which firmware does
    not have (declined before 85854d6's rewrite reached the CPU targets); as ranks by counting and a gather it runs,
    values and indices equal to the reference's."""
    _needs_tools()
    _, lsb = helpers.compile_exact(tmp_path, conv_then("TopK"), "mcu-cortex-m4")
    helpers.assert_main_build_equal(lsb)
    assert [o["output"] for o in lsb["main_outputs"]] == ["y", "i"]


def test_if_on_a_static_shape_runs_in_firmware(tmp_path):
    """TorchScript's ``squeeze(1)`` of a dimension it cannot see is an If on ``Shape(x)[1] == 1`` (LocalResponseNorm
    carries one): with the firmware's static shapes the condition is a constant and the taken branch is inlined
    (declined before as data-dependent control flow)."""
    _needs_tools()
    from qcompile.lowering import specialize

    model = conv_then("SqueezeIf")
    assert "If" not in {n.op_type for n in specialize(model, {"x": [1, 1, 8, 8]}).graph.node}
    _, lsb = helpers.compile_exact(tmp_path, model, "mcu-cortex-m4")
    helpers.assert_main_build_equal(lsb)


def test_kernels_tvm_builds_with_parallel_loops_run_serially_in_firmware(tmp_path):
    """TOPI's ScatterElements (a token-pruning model's scatter back) is built from IR-builder loops marked parallel,
    which the firmware's runtime cannot launch (declined before: "parallel loop (needs TVMBackendParallelLaunch)");
    run serially they give the reference's values."""
    _needs_tools()
    _, lsb = helpers.compile_exact(tmp_path, conv_then("ScatterElements"), "mcu-cortex-m4")
    helpers.assert_main_build_equal(lsb)


@pytest.mark.parametrize("op", ["NonZero"])
def test_unsupported_op_is_one_clear_error_and_leaves_nothing(op, tmp_path, capfd):
    _needs_tools()
    path, calib = save_with_calib(tmp_path, conv_then(op))
    out = tmp_path / "out"
    rc = cli.main(["compile", str(path), "--calib", str(calib), "--target", "mcu-cortex-m4", "-o", str(out)])
    err = capfd.readouterr().err
    errors = [line for line in err.splitlines() if "error" in line]
    assert rc == TargetError.exit_code and len(errors) == 1, err
    assert re.fullmatch(rf"qcompile: error: mcu-cortex-m4: cannot compile {op} \(node 'the_op'\): .+", errors[0])
    assert "its output shape depends on the input values" in errors[0]
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["calib.npz", "m.onnx"]


def test_model_over_the_boards_flash_is_one_clear_error_and_leaves_nothing(tmp_path, capfd):
    """A 5 MB int8 MatMul (Paddle's ResNet-18 on this board: FLASH over by 7.2 MB) does not fit mps2-an386's 4 MiB
    FLASH: one error line saying so, with the bytes over from the linker, and no output folder."""
    _needs_tools()
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"], name="fc"), helper.make_node("Relu", ["m"], ["y"], name="r")]
    model = make(nodes, [vi("x", [1, 2048])], [vi("y", [1, 2560])], [init("w", rand(2048, 2560, scale=0.05))])
    path, calib = save_with_calib(tmp_path, model)
    out = tmp_path / "out"
    rc = cli.main(["compile", str(path), "--calib", str(calib), "--target", "mcu-cortex-m4", "-o", str(out)])
    err = capfd.readouterr().err
    errors = [line for line in err.splitlines() if "error" in line]
    assert rc == TargetError.exit_code and len(errors) == 1, err
    assert re.fullmatch(r"qcompile: error: mcu-cortex-m4: the model does not fit the board's memory \(mps2_an386.ld: "
                        r"4 MiB FLASH, 4 MiB RAM\): over FLASH by [\d,]+ bytes", errors[0]), errors[0]
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["calib.npz", "m.onnx"]


def test_does_not_fit_reads_the_linkers_overflow_lines():
    from qcompile.targets.tvm.firmware.project import does_not_fit

    ld = ("ld: build/firmware.elf section `.text' will not fit in region `FLASH'\n"
          "ld: region `FLASH' overflowed by 7240724 bytes\nld: region `RAM' overflowed by 12 bytes\n")
    assert does_not_fit(ld).endswith("over FLASH by 7,240,724 bytes, RAM by 12 bytes")
    assert does_not_fit("undefined reference to `powf'") is None


# ------------------------------------------------------------------------------------------- Cortex-M7
def test_cortex_m7_smoke(built, tmp_path):
    """mcu-cortex-m7: the same code path for QEMU mps2-an500; bit-identical to the Cortex-M4 firmware."""
    m4 = built("digits-cnn")
    art = _compile("digits-cnn", tmp_path / "out", target="mcu-cortex-m7")
    meta = program.read_meta(art.out_dir / "mcu-cortex-m7")
    assert meta["machine"] == "mps2-an500" and meta["target"]["mcpu"] == "cortex-m7"
    assert "-M mps2-an500" in (art.out_dir / "firmware" / "Makefile").read_text()
    lsb = art.report["lsb_vs_reference"]["mcu-cortex-m7"]
    assert lsb["integer_ops_exact"] and lsb["max_lsb"] == 0, lsb
    attrs = subprocess.run(["arm-none-eabi-readelf", "-A", str(art.out_dir / "firmware" / mcu.ELF)],
                           capture_output=True, text=True, check=True).stdout
    assert "Tag_FP_arch: FPv5/FP-D16" in attrs, attrs  # the Cortex-M7 FPU (the M4's is VFPv4-D16)
    test = _test_set("digits-cnn", 32)
    got, want = art.run(test), m4.run(test)
    np.testing.assert_array_equal(got["logits"].view(np.uint32), want["logits"].view(np.uint32))
