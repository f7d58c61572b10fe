"""mcu-cortex-m4: the integer Relax module as a bare-metal firmware project for QEMU ``mps2-an386`` (Cortex-M4F).

``build`` writes ``OUT/firmware/``, a self-contained project a firmware engineer can copy: ``include/model.h``
(the C API of ``static_c``: ``qc_model_run(inputs, outputs)``, shapes, dtypes), ``src/`` (generated ``model.c`` with
the weights as ``static const`` arrays in flash and every activation in one planned static arena, TVM's LLVM
object ``kernels.o`` for ``thumbv7em-none-eabi``, the small runtime shim, start-up code, semihosting I/O and an
example ``main.c``), the linker script and a ``Makefile`` (``make``, ``make run``). ``build`` runs that Makefile with
``arm-none-eabi-gcc``, then runs the firmware once in ``qemu-system-arm`` to measure the stack high-water mark
(stack painting) and the instructions per inference (``-icount``), and checks the optional RAM / flash budget.

Quantized I/O: where every graph input is read only by a per-tensor QuantizeLinear and every output is a
DequantizeLinear (:func:`qcompile.lowering.strip_quantized_io`), the firmware takes the quantized inputs and
returns the integer outputs, and model.h adds their scales, zero points, shapes and ``static inline`` helpers
that quantize / dequantize bit-identically to ``qcompile/reference.py`` (:func:`quantized_io_h`,
docs/firmware.md). Otherwise model.h says ``#define QC_INT8_IO 0`` and why, and the float graph is built.
``run`` keeps float samples either way: :class:`QuantizedIO` applies the reference's own Quantize/DequantizeLinear
around the firmware.

A second project, ``OUT/mcu-cortex-m4/probe/``, returns every integer tensor too (the report's LSB comparison).
``run`` executes a whole batch in ONE QEMU start: the samples go in through ``inputs.bin`` and come back
through ``outputs.bin`` (semihosting file I/O relative to QEMU's working directory).

``mcu-cortex-m7`` is the same code path for QEMU ``mps2-an500`` (:data:`CORTEX_M7`; the mps2 boards share the
memory map, so the start-up file and linker script are the same); its files go to ``OUT/mcu-cortex-m7/``.

``meta.json`` (in ``OUT/mcu-cortex-m4/``) holds ``memory`` (see :func:`memory_report`), ``dsp`` (DSP
instruction counts in the kernels), ``io`` (the firmware's I/O layout, both builds) and ``quantized_io``
(:func:`quantized_io_meta`).
"""
from __future__ import annotations

import logging
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

from qcompile import reference
from qcompile.errors import TargetError
from qcompile.lowering import lower
from qcompile.targets.onnxruntime import OnnxRuntimeTarget
from qcompile.targets.tvm import common, static_c
from qcompile.targets.tvm.dsp import dsp_schedule

logger = logging.getLogger(__name__)

SUBDIR = "mcu-cortex-m4"
FIRMWARE = "firmware"
FIRMWARE_DIR = Path(__file__).parent / "firmware"
ELF = "build/firmware.elf"
STACK_SIZE = 16 * 1024
TICKS_PER_INSN = 1 / 40  # mps2 timer at 25 MHz; -icount shift=0 runs one instruction per virtual ns
QEMU_FLAGS = ["-M", "mps2-an386", "-nographic", "-monitor", "none", "-serial", "null", "-icount", "shift=0",
              "-semihosting-config", "enable=on,target=native"]  # the Cortex-M4 board; other boards swap "-M"
TOOLS = {"arm-none-eabi-gcc": "gcc-arm-none-eabi libnewlib-arm-none-eabi",
         "arm-none-eabi-size": "binutils-arm-none-eabi", "arm-none-eabi-objdump": "binutils-arm-none-eabi",
         "qemu-system-arm": "qemu-system-arm", "make": "make"}
DSP_MNEMONICS = ("smlad", "smladx", "smuad", "sxtb16", "sxtab16", "smlabb", "smlabt", "smlatb", "smlatt",
                 "smulbb", "smlal", "sadd16", "ssat", "usat")


@dataclass(frozen=True)
class Cpu:
    """A Cortex-M core and the QEMU board that runs it. The mps2 boards share one memory map (code at 0, data at
    0x20000000, CMSDK timer 0 at 0x40000000), so one start-up file and linker script serve them all."""
    name: str
    target: dict
    cflags: str
    machine: str

    @property
    def target_name(self) -> str:
        """``--target`` name, also the folder of meta.json and the probe build, and every error's prefix."""
        return f"mcu-{self.name}"

    @property
    def qemu_flags(self) -> list[str]:
        return [self.machine if f == "mps2-an386" else f for f in QEMU_FLAGS]


CORTEX_M4 = Cpu("cortex-m4",
                {"kind": "llvm", "mtriple": "thumbv7em-none-eabi", "mcpu": "cortex-m4", "mfloat-abi": "hard"},
                "-mcpu=cortex-m4 -mthumb -mfloat-abi=hard -mfpu=fpv4-sp-d16", "mps2-an386")
CORTEX_M7 = Cpu("cortex-m7",  # QEMU's M7 has the double-precision FPv5 unit
                {"kind": "llvm", "mtriple": "thumbv7em-none-eabi", "mcpu": "cortex-m7", "mfloat-abi": "hard"},
                "-mcpu=cortex-m7 -mthumb -mfloat-abi=hard -mfpu=fpv5-d16", "mps2-an500")


def require_tools(who: str = SUBDIR) -> None:
    """One clear error naming the Debian packages when the Arm toolchain, QEMU or make is missing."""
    missing = sorted({pkg for tool, pkg in TOOLS.items() if shutil.which(tool) is None})
    if missing:
        raise TargetError(f"target {who} needs the Arm bare-metal toolchain and QEMU: "
                          f"apt-get install -y {' '.join(missing)} (or run tools/setup)")


# ------------------------------------------------------------------------------------------ quantized I/O
C_TYPES = {"int8": "int8_t", "uint8": "uint8_t", "int16": "int16_t", "uint16": "uint16_t", "int32": "int32_t",
           "uint32": "uint32_t"}


def quantized_io_meta(prog: common.Program, program: static_c.StaticProgram, who: str = SUBDIR) -> dict:
    """meta.json ``quantized_io``: ``{"enabled": false, "reason"}``, or per firmware input/output the float tensor
    ``name``, the integer tensor ``q``, its ``dtype`` and ``shape``, ``scale`` (float32 values, one or one per
    channel along ``axis``) and ``zero_point``. JSON keeps a float32 exactly (a float64 repr)."""
    qio = prog.quantized_io
    if qio is None:
        return {"enabled": False, "reason": prog.quantized_io_reason}

    def entry(io, view: str) -> dict:
        v = program.views[view]
        if v.dtype not in C_TYPES:
            raise TargetError(f"{who}: quantized I/O tensor {io.q!r} is {v.dtype}, not an 8/16/32-bit integer")
        zp = 0 if io.zero_point is None else int(io.zero_point)
        return {"name": io.name, "q": io.q, "dtype": v.dtype, "shape": list(v.shape),
                "scale": [float(x) for x in np.asarray(io.scale, np.float32).reshape(-1)], "zero_point": zp,
                "axis": int(io.axis)}
    return {"enabled": True, "inputs": [entry(io, v) for io, v in zip(qio.inputs, program.inputs)],
            "outputs": [entry(io, v) for io, v in zip(qio.outputs, program.outputs)]}


class QuantizedIO:
    """The float <-> integer borders the firmware leaves to its caller, computed by ``qcompile.reference``'s own
    QuantizeLinear / DequantizeLinear (so a quantized-I/O firmware run is bit-identical to a float-I/O one that
    matches the reference). Built from meta.json ``quantized_io``."""

    def __init__(self, meta: dict) -> None:
        self.inputs, self.outputs = meta["inputs"], meta["outputs"]
        self._q = self._evaluator("QuantizeLinear", self.inputs, "name", "q")
        self._dq = self._evaluator("DequantizeLinear", self.outputs, "q", "name")

    @staticmethod
    def _evaluator(op: str, entries: list[dict], src: str, dst: str):
        from onnx.reference import ReferenceEvaluator

        nodes, inits = [], []
        for k, e in enumerate(entries):
            scale = np.asarray(e["scale"], np.float32)
            inits += [numpy_helper.from_array(scale.reshape(()) if scale.size == 1 else scale, f"s{k}"),
                      numpy_helper.from_array(np.asarray(e["zero_point"], e["dtype"]).reshape(()), f"z{k}")]
            nodes.append(helper.make_node(op, [e[src], f"s{k}", f"z{k}"], [e[dst]], axis=e["axis"]))
        graph = helper.make_graph(
            nodes, "quantized_io", [helper.make_tensor_value_info(e[src], onnx.TensorProto.UNDEFINED, None)
                                    for e in entries],
            [helper.make_tensor_value_info(e[dst], onnx.TensorProto.UNDEFINED, None) for e in entries], inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
        return ReferenceEvaluator(model, new_ops=[reference.QuantizeLinear, reference.DequantizeLinear])

    def quantize(self, sample: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Float inputs (by model input name) -> the firmware's integer inputs (by integer tensor name)."""
        vals = self._q.run(None, {e["name"]: np.asarray(sample[e["name"]]) for e in self.inputs})
        return {e["q"]: v for e, v in zip(self.inputs, vals)}

    def dequantize(self, got: dict[str, np.ndarray], fed: dict[str, np.ndarray], keep: bool = False
                   ) -> dict[str, np.ndarray]:
        """The firmware's integer outputs -> the float outputs; ``keep``: also every integer tensor it returned
        and the quantized inputs ``fed`` (the probe: the report compares them with the reference)."""
        vals = self._dq.run(None, {e["q"]: got[e["q"]] for e in self.outputs})
        out = {e["name"]: v for e, v in zip(self.outputs, vals)}
        if keep:
            out.update(got)
            out.update(fed)
        return out


def _c_float(v: float) -> str:
    """A float32 as an exact C literal (hex), with its decimal value as a comment."""
    f = np.float32(v)
    return f"{float(f).hex()}f /* {str(f)} */"


def _c_comment(text: str) -> str:
    return text.replace("*/", "* /")


_QUANT_CORE = """\
/* One element of QuantizeLinear exactly as qcompile's integer reference computes it:
 * saturate(round_half_even(x / scale) + zero_point), each step in float32. A division, never x * (1 / scale):
 * the rounded reciprocal moves results at rounding ties. rintf rounds half to even in the default rounding mode.
 * Do not build with -ffast-math (it allows that reciprocal). NaN has no defined result in ONNX: here the zero
 * point (the real value 0). */
static inline int32_t qc_quantize_value(float x, float scale, int32_t zero_point, int32_t qmin, int32_t qmax) {
  float v = rintf(x / scale) + (float)zero_point;
  if (v != v) return zero_point;
  if (v < (float)qmin) return qmin;
  if (v > (float)qmax) return qmax;
  return (int32_t)v;
}
"""


def _io_defines(kind: str, i: int, e: dict) -> list[str]:
    up, low = f"QC_{kind.upper()}{i}", f"qc_{kind}{i}"
    info = np.iinfo(e["dtype"])
    shape = ", ".join(map(str, e["shape"]))
    size = int(np.prod(e["shape"], dtype=np.int64))
    return [f"/* {kind} {i}: {C_TYPES[e['dtype']]}[{size}] (shape [{shape}]), the integers of the float "
            f"{kind} {_c_comment(e['name'])!r} */",
            f"#define {up}_NAME {static_c._c_str(e['name'])}",
            f"typedef {C_TYPES[e['dtype']]} {low}_t;",
            f"#define {up}_ZERO_POINT {e['zero_point']}",
            f"#define {up}_QMIN {info.min if info.min > -2**31 else '(-2147483647 - 1)'}",
            f"#define {up}_QMAX {info.max}{'u' if info.max > 2**31 - 1 else ''}",
            f"#define {up}_NDIM {len(e['shape'])}",
            f"#define {up}_SHAPE {{{shape}}}",
            f"#define {up}_SIZE {size}u"]


def _input_api(i: int, e: dict) -> list[str]:
    if len(e["scale"]) != 1:
        raise TargetError(f"quantized input {e['name']!r} has {len(e['scale'])} scales (one expected)")
    up = f"QC_INPUT{i}"
    return [*_io_defines("input", i, e),
            f"#define {up}_SCALE {_c_float(e['scale'][0])}",
            f"/* q = saturate(round_half_even(x / {up}_SCALE) + {up}_ZERO_POINT), {up}_SIZE elements. */",
            f"static inline void qc_quantize_input{i}(const float *x, qc_input{i}_t *q) {{",
            "  uint32_t i;",
            f"  for (i = 0; i < {up}_SIZE; ++i)",
            f"    q[i] = (qc_input{i}_t)qc_quantize_value(x[i], {up}_SCALE, {up}_ZERO_POINT, {up}_QMIN, {up}_QMAX);",
            "}", ""]


def _output_api(i: int, e: dict) -> list[str]:
    up = f"QC_OUTPUT{i}"
    lines = _io_defines("output", i, e)
    wide = np.dtype(e["dtype"]).itemsize >= 4
    if not wide:  # 8/16-bit: exact in int32, then exact in float32
        diff = f"(float)((int32_t)q[i] - {up}_ZERO_POINT)"
    elif e["zero_point"] == 0:  # one rounding int -> float32, as the reference's int64 -> float32
        diff = "(float)q[i]"
    else:
        diff = f"(float)((int64_t)q[i] - {up}_ZERO_POINT)"
    if len(e["scale"]) == 1:
        lines += [f"#define {up}_SCALE {_c_float(e['scale'][0])}"]
        scale = f"{up}_SCALE"
    else:
        shape, axis = e["shape"], e["axis"] % max(len(e["shape"]), 1)
        inner = int(np.prod(shape[axis + 1:], dtype=np.int64))
        lines += [f"#define {up}_AXIS {axis} /* one scale per index along this axis */",
                  f"#define {up}_CHANNELS {len(e['scale'])}u",
                  f"#define {up}_INNER {inner}u /* elements per step along {up}_AXIS */",
                  f"/* The scale of channel c < {up}_CHANNELS. */",
                  f"static inline float qc_output{i}_scale(uint32_t c) {{",
                  f"  static const float scales[{len(e['scale'])}] = {{",
                  *[f"    {_c_float(v)}," for v in e["scale"]],
                  "  };",
                  "  return scales[c];",
                  "}"]
        scale = f"qc_output{i}_scale((i / {up}_INNER) % {up}_CHANNELS)"
    return [*lines,
            f"/* y = float32(q - {up}_ZERO_POINT) * scale, {up}_SIZE elements. */",
            f"static inline void qc_dequantize_output{i}(const qc_output{i}_t *q, float *y) {{",
            "  uint32_t i;",
            f"  for (i = 0; i < {up}_SIZE; ++i) y[i] = {diff} * {scale};",
            "}", ""]


def quantized_io_h(meta: dict) -> str:
    """The quantized-I/O block of model.h for meta.json's ``quantized_io`` (see docs/firmware.md).

    Why helpers in the header: the caller's code owns the float data (a sensor driver, a feature extractor); the
    helpers let it quantize exactly as the compiler's reference does without knowing the rules, and
    ``static inline`` costs nothing where they are not used.
    """
    if not meta.get("enabled"):
        return (f"/* Quantized I/O is not available for this model ({_c_comment(meta.get('reason', ''))}):\n"
                " * qc_model_run takes the float inputs and returns the float outputs. */\n"
                "#define QC_INT8_IO 0\n")
    ins, outs = meta["inputs"], meta["outputs"]
    lines = ["/* Quantized I/O: qc_model_run takes the integer inputs and returns the integer outputs (8-bit",
             " * activations; a linear layer's output stays its int32 accumulator, with one scale per channel).",
             " * The helpers below convert float data exactly as qcompile's integer reference does. */",
             "#include <math.h>", "#define QC_INT8_IO 1", "", _QUANT_CORE]
    for i, e in enumerate(ins):
        lines += _input_api(i, e)
    for i, e in enumerate(outs):
        lines += _output_api(i, e)
    params = [f"const qc_input{i}_t *in{i}" for i in range(len(ins))] + [f"qc_output{i}_t *out{i}"
                                                                         for i in range(len(outs))]
    lines += ["/* qc_model_run with typed pointers, each QC_ALIGN-byte aligned. Returns 0, or 1 + the failing step. */",
              f"static inline int qc_model_run_int8({', '.join(params)}) {{",
              f"  const void *inputs[{len(ins)}] = {{{', '.join(f'in{i}' for i in range(len(ins)))}}};",
              f"  void *outputs[{len(outs)}] = {{{', '.join(f'out{i}' for i in range(len(outs)))}}};",
              "  return qc_model_run(inputs, outputs);",
              "}", ""]
    return "\n".join(lines)


def _add_to_header(path: Path, block: str) -> None:
    """Insert ``block`` before the include guard's closing ``#endif`` of a generated header."""
    text = path.read_text()
    head, sep, tail = text.rpartition("#endif")
    if not sep:
        raise TargetError(f"{path} has no include guard")
    path.write_text(f"{head}{block}\n{sep}{tail}")


# --------------------------------------------------------------------------------------------- project
def _example_c(program: static_c.StaticProgram, example: dict[str, np.ndarray] | None,
               float_input0: np.ndarray | None = None) -> str:
    """``qc_example_input``: every input's bytes at the QC_ALIGN-rounded offsets main.c uses; with quantized I/O
    also ``qc_example_input0_f32``, the float sample main.c quantizes with the model.h helper."""
    chunks = []
    for name, view in zip(program.input_names, program.inputs):
        v = program.views[view]
        arr = np.zeros(v.shape, v.dtype) if example is None or name not in example else np.asarray(example[name])
        raw = np.ascontiguousarray(arr, dtype=np.dtype(v.dtype).newbyteorder("<")).tobytes()
        chunks.append(raw + b"\0" * (static_c._align(len(raw)) - len(raw)))
    data = b"".join(chunks) or b"\0"
    rows = ",\n  ".join(",".join(map(str, data[i:i + 32])) for i in range(0, len(data), 32))
    text = ("/* Generated by qcompile: the example input (one calibration sample) for main.c. */\n"
            "#include <stdint.h>\n\n"
            f"const uint8_t qc_example_input[{len(data)}] __attribute__((aligned({static_c.ALIGN}))) = {{\n"
            f"  {rows}}};\n")
    if float_input0 is not None:
        vals = [f"{float(x).hex()}f" for x in np.asarray(float_input0, np.float32).reshape(-1)] or ["0"]
        rows = ",\n  ".join(",".join(vals[i:i + 8]) for i in range(0, len(vals), 8))
        text += ("\n/* input 0 before quantization (float32, exact) */\n"
                 f"const float qc_example_input0_f32[{len(vals)}] = {{\n  {rows}}};\n")
    return text


def write_project(program: static_c.StaticProgram, dest: Path, cpu: Cpu,
                  example: dict[str, np.ndarray] | None = None, stack_size: int = STACK_SIZE,
                  quantized_io: dict | None = None) -> dict:
    """Write a firmware project for ``program`` into ``dest`` (not built); returns ``static_c.emit``'s facts.

    ``example``: one sample of the model's (float) inputs. ``quantized_io``: meta.json's entry
    (:func:`quantized_io_meta`) when ``program`` has quantized I/O: model.h gets :func:`quantized_io_h`'s block and
    the example is quantized with the reference's QuantizeLinear.
    """
    dest = Path(dest)
    stage = dest / ".stage"
    facts = static_c.emit(program, stage, cpu.target, cc=[], entry="bare")
    (dest / "include").mkdir(parents=True, exist_ok=True)
    (dest / "src").mkdir(parents=True, exist_ok=True)
    shutil.move(stage / "model.h", dest / "include" / "model.h")
    for name in ("model.c", "qc_runtime.c", "qc_runtime.h", "kernels.o"):
        shutil.move(stage / name, dest / "src" / name)
    shutil.rmtree(stage)
    qio = quantized_io or {"enabled": False, "reason": "not requested"}
    _add_to_header(dest / "include" / "model.h", quantized_io_h(qio))
    float_input0 = None
    if qio["enabled"]:
        first = qio["inputs"][0]
        float_input0 = (np.zeros(first["shape"], np.float32) if example is None or first["name"] not in example
                        else np.asarray(example[first["name"]], np.float32))
        if example is not None:
            example = QuantizedIO(qio).quantize(example)
    for name in ("main.c", "startup_mps2_an386.c", "semihost.c", "semihost.h", "board.h"):
        shutil.copyfile(FIRMWARE_DIR / name, dest / "src" / name)
    (dest / "src" / "example_input.c").write_text(_example_c(program, example, float_input0))
    shutil.copyfile(FIRMWARE_DIR / "mps2_an386.ld", dest / "mps2_an386.ld")
    make = (FIRMWARE_DIR / "Makefile").read_text()
    for key, value in (("@CPU_FLAGS@", cpu.cflags), ("@STACK_SIZE@", str(stack_size)), ("@MACHINE@", cpu.machine),
                       ("@CPU@", cpu.name)):
        make = make.replace(key, value)
    (dest / "Makefile").write_text(make)
    return facts


def make(dest: Path, timeout: float = 600.0, who: str = SUBDIR) -> Path:
    """``make -C dest``; returns the ELF path."""
    cmd = ["make", "-C", str(dest), "-j4"]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise TargetError(f"{who}: firmware build timed out after {timeout}s") from exc
    if res.returncode != 0:
        raise TargetError(f"{who}: firmware build failed ({' '.join(cmd)}):\n{(res.stdout + res.stderr)[-3000:]}")
    return Path(dest) / ELF


def elf_sizes(elf: Path, who: str = SUBDIR) -> dict[str, int]:
    """Per-section sizes (``arm-none-eabi-size -A``) folded into flash and RAM bytes."""
    res = subprocess.run(["arm-none-eabi-size", "-A", str(elf)], capture_output=True, text=True)
    if res.returncode != 0:
        raise TargetError(f"{who}: arm-none-eabi-size failed: {res.stderr.strip()}")
    sections: dict[str, tuple[int, int]] = {}
    for line in res.stdout.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0].startswith(".") and parts[1].isdigit() and parts[2].isdigit():
            sections[parts[0]] = (int(parts[1]), int(parts[2]))
    flash = sum(s for name, (s, a) in sections.items() if a < 0x20000000 and s and not name.startswith(".debug")
                and name not in (".comment", ".ARM.attributes"))
    data = sections.get(".data", (0, 0))[0]
    bss = sections.get(".bss", (0, 0))[0]
    stack = sections.get(".stack", (0, 0))[0]
    return {"flash_bytes": flash + data, "ram_bytes": data + bss + stack, "text_bytes": flash, "data_bytes": data,
            "bss_bytes": bss, "stack_reserved": stack}


# ------------------------------------------------------------------------------------------------- QEMU
_STATS = re.compile(r"qc: samples=(\d+) status=(-?\d+) ticks=(\d+) stack_used=(\d+) stack_size=(\d+) "
                    r"arena=(\d+) workspace_peak=(\d+)")


def run_qemu(elf: Path, cwd: Path, timeout: float = 600.0, cpu: Cpu = CORTEX_M4) -> tuple[dict, str]:
    """One QEMU start of the firmware with semihosting rooted at ``cwd``; returns (stats, console text)."""
    who = cpu.target_name
    cmd = ["qemu-system-arm", *cpu.qemu_flags, "-kernel", str(Path(elf).resolve())]
    try:
        res = subprocess.run(cmd, cwd=cwd, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise TargetError(f"{who}: QEMU timed out after {timeout}s") from exc
    text = res.stdout.decode(errors="replace") + res.stderr.decode(errors="replace")
    match = _STATS.search(text)
    if res.returncode != 0 or match is None:
        raise TargetError(f"{who}: firmware failed in QEMU (exit {res.returncode}): {text.strip()[-1500:]}")
    keys = ("samples", "status", "ticks", "stack_used", "stack_size", "arena", "workspace_peak")
    return dict(zip(keys, map(int, match.groups()))), text


def run_firmware(elf: Path, io: dict, samples: Sequence[dict[str, np.ndarray]], timeout: float = 600.0,
                 cpu: Cpu = CORTEX_M4) -> tuple[list[dict[str, np.ndarray]], dict]:
    """All ``samples`` in one QEMU start (inputs.bin -> outputs.bin); returns (outputs per sample, stats)."""
    who = cpu.target_name
    data = static_c.pack_inputs(io["inputs"], samples, who)
    with tempfile.TemporaryDirectory(prefix="qc-mcu-") as tmp:
        (Path(tmp) / "inputs.bin").write_bytes(data)
        stats, _ = run_qemu(elf, Path(tmp), timeout, cpu)
        raw = (Path(tmp) / "outputs.bin").read_bytes() if (Path(tmp) / "outputs.bin").is_file() else b""
    if stats["status"] != 0:
        raise TargetError(f"{who}: firmware ran {stats['samples']} of {len(samples)} samples "
                          f"(status {stats['status']}, {len(raw)} output bytes)")
    results = static_c.unpack_outputs(raw, io["outputs"], len(samples), f"{who}: firmware")
    return results, stats


# --------------------------------------------------------------------------------------- memory, budget
def _largest_tensors(program: static_c.StaticProgram, workspace: dict[str, int], n: int = 5) -> list[dict]:
    """The biggest arena buffers (activations, kernel workspaces) and constants, named by their kernel."""
    producer: dict[str, str] = {}
    consumer: dict[str, str] = {}
    for step in program.steps:
        for k, arg in enumerate(step.args):
            buf = program.views[arg].buffer
            if k >= len(step.args) - step.n_out:
                producer.setdefault(buf, step.symbol)
            else:
                consumer.setdefault(buf, step.symbol)
    rows = []
    for b in program.buffers.values():
        if b.kind == "arena":
            rows.append({"name": b.name, "bytes": b.nbytes, "memory": "ram", "kind": "activation",
                         "kernel": producer.get(b.name, "")})
        elif b.kind == "const":
            rows.append({"name": b.name, "bytes": b.nbytes, "memory": "flash", "kind": "constant",
                         "kernel": consumer.get(b.name, "")})
    for i, step in enumerate(program.steps):
        if step.kind == "kernel" and workspace.get(step.symbol, 0) > 0:
            rows.append({"name": static_c.workspace_buffer(i), "bytes": workspace[step.symbol], "memory": "ram",
                         "kind": "workspace", "kernel": step.symbol})
    ram = sorted((r for r in rows if r["memory"] == "ram"), key=lambda r: -r["bytes"])[:n]
    flash = sorted((r for r in rows if r["memory"] == "flash"), key=lambda r: -r["bytes"])[:n]
    for r in ram + flash:  # fused kernel names list every op: keep the head
        k = r["kernel"].removeprefix(static_c.KERNEL_PREFIX)
        r["kernel"] = k if len(k) <= 40 else k[:40] + "..."
    return ram + flash


def memory_report(facts: dict, sizes: dict, stats: dict | None, program: static_c.StaticProgram) -> dict:
    """The ``memory`` entry of meta.json: flash/RAM (arm-none-eabi-size), arena vs its liveness lower bound,
    stack high-water mark (stack painting in QEMU), instructions per inference (QEMU -icount)."""
    mem = {**sizes,
           "weights_bytes": facts["const_bytes"],
           "arena_bytes": facts["arena_bytes"],
           "arena_lower_bound": facts["arena_lower_bound"],
           "arena_ratio": round(facts["arena_bytes"] / max(facts["arena_lower_bound"], 1), 4),
           "workspace_bytes": facts["workspace_bytes"],
           "io_bytes": sum(static_c._align(m["nbytes"]) for m in facts["inputs"] + facts["outputs"]),
           "largest_tensors": _largest_tensors(program, facts["workspace_per_kernel"])}
    if stats is not None:
        mem["stack_used"] = stats["stack_used"]
        mem["ticks_per_inference"] = stats["ticks"]
        mem["instructions_per_inference"] = int(stats["ticks"] / TICKS_PER_INSN)
    return mem


def _kb(n: int) -> str:
    return f"{n / 1024:.1f} KB"


def check_budget(memory: dict, *, ram_kb: float | None = None, flash_kb: float | None = None,
                 who: str = SUBDIR) -> None:
    """Raise one TargetError when the firmware exceeds ``ram_kb`` / ``flash_kb`` (KiB), naming the largest tensors.

    ``memory`` is :func:`memory_report`'s dict (meta.json ``memory``): RAM is .data + .bss (arena, I/O buffers)
    + the reserved stack; flash is code + constants + .data's load image.
    """
    over = []
    if ram_kb is not None and memory["ram_bytes"] > ram_kb * 1024:
        over.append(("ram", f"RAM {_kb(memory['ram_bytes'])} > budget {ram_kb:g} KB (arena "
                            f"{_kb(memory['arena_bytes'])}, stack {_kb(memory['stack_reserved'])}, "
                            f"I/O {_kb(memory['io_bytes'])})"))
    if flash_kb is not None and memory["flash_bytes"] > flash_kb * 1024:
        over.append(("flash", f"flash {_kb(memory['flash_bytes'])} > budget {flash_kb:g} KB (weights "
                              f"{_kb(memory['weights_bytes'])}, code and tables "
                              f"{_kb(memory['flash_bytes'] - memory['weights_bytes'])})"))
    if not over:
        return
    kinds = {k for k, _ in over}
    biggest = [t for t in memory["largest_tensors"] if t["memory"] in kinds][:5]
    names = ", ".join(f"{t['kind']} {t['name']} ({t['kernel']}) {_kb(t['bytes'])}" for t in biggest)
    raise TargetError(f"{who}: model does not fit: {'; '.join(m for _, m in over)}; largest tensors: {names}")


def dsp_counts(obj: Path, who: str = SUBDIR) -> dict[str, int]:
    """How often each Cortex-M DSP-extension mnemonic occurs in ``obj`` (arm-none-eabi-objdump -d)."""
    res = subprocess.run(["arm-none-eabi-objdump", "-d", str(obj)], capture_output=True, text=True)
    if res.returncode != 0:
        raise TargetError(f"{who}: arm-none-eabi-objdump failed: {res.stderr.strip()}")
    counts = dict.fromkeys(DSP_MNEMONICS, 0)
    for line in res.stdout.splitlines():
        parts = line.split("\t")
        if len(parts) >= 3:
            op = parts[2].split()[0].split(".")[0] if parts[2].split() else ""
            if op in counts:
                counts[op] += 1
    return counts


# --------------------------------------------------------------------------------------------- target
class _FirmwareRunner:
    """Float samples in, float outputs out, whatever the firmware's I/O: with quantized I/O the samples are
    quantized (and the outputs dequantized) here, by the reference's own ops (:class:`QuantizedIO`)."""

    def __init__(self, out_dir: Path, meta: dict, cpu: Cpu = CORTEX_M4) -> None:
        self.out_dir, self.meta, self.cpu = Path(out_dir), meta, cpu
        qio = meta.get("quantized_io", {})
        self.quantized_io = QuantizedIO(qio) if qio.get("enabled") else None

    def _elf(self, which: str) -> Path:
        folder = self.out_dir / (FIRMWARE if which == "main" else f"{self.cpu.target_name}/probe")
        elf = folder / ELF
        if not elf.is_file():  # a copied project without its build folder: build it again
            make(folder, who=self.cpu.target_name)
        return elf

    def __call__(self, sample: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.run([sample])[0]

    def run(self, samples: Sequence[dict[str, np.ndarray]], which: str = "main") -> list[dict[str, np.ndarray]]:
        for s in samples:
            common.check_inputs(self.meta, s)
        if not samples:
            return []
        qio = self.quantized_io
        feeds = [qio.quantize(s) for s in samples] if qio else list(samples)
        results, stats = run_firmware(self._elf(which), self.meta["io"][which], feeds, cpu=self.cpu)
        logger.info("%s: %d samples in one QEMU run, %d ticks", self.cpu.target_name, stats["samples"],
                    stats["ticks"])
        if qio:
            results = [qio.dequantize(r, f, keep=which == "probe") for r, f in zip(results, feeds)]
        return results

    def probe(self, sample: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.run([sample], "probe")[0]


# ------------------------------------------------------------------------------------- unsupported ops
# Ops the firmware cannot run, and why: found in the integer graph when the static lowering fails, so the error
# names the ONNX op rather than a TVM-internal symptom (a match_cast, a packed call).
DATA_DEPENDENT = ("its output shape depends on the input values, and the firmware runs a fixed list of kernels "
                  "over statically planned memory")
UNSUPPORTED_OPS = {
    "NonZero": DATA_DEPENDENT, "Unique": DATA_DEPENDENT, "NonMaxSuppression": DATA_DEPENDENT,
    "Compress": DATA_DEPENDENT,
    "TopK": "TVM lowers it to a sort in its C++ runtime (tvm.contrib.sort), which bare-metal firmware does not have",
    "If": "data-dependent control flow; the firmware runs a fixed list of kernels",
    "Loop": "data-dependent control flow; the firmware runs a fixed list of kernels",
    "Scan": "data-dependent control flow; the firmware runs a fixed list of kernels",
}


def _nodes(graph: onnx.GraphProto):
    for n in graph.node:
        yield n
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                yield from _nodes(a.g)


def explain_failure(model: onnx.ModelProto, exc: TargetError, who: str = SUBDIR) -> TargetError:
    """One line naming the op the firmware cannot run (:data:`UNSUPPORTED_OPS`) in ``model`` (the integer
    graph), with TVM's own words at the end; ``exc`` prefixed with the target's name when no such op is there."""
    detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    found = [n for n in _nodes(model.graph) if n.op_type in UNSUPPORTED_OPS]
    if not found:
        return TargetError(f"{who}: {detail}")
    n = found[0]
    more = sorted({m.op_type for m in found[1:]} - {n.op_type})
    also = f" (also: {', '.join(more)})" if more else ""
    return TargetError(f"{who}: cannot compile {n.op_type} (node {n.name or n.output[0]!r}): "
                       f"{UNSUPPORTED_OPS[n.op_type]}{also} [{detail}]")


class McuCortexM4Target:
    """``mcu-cortex-m4``; ``ram_kb`` / ``flash_kb`` (KiB) make ``build`` fail when the firmware does not fit."""

    name = "mcu-cortex-m4"
    cpu = CORTEX_M4

    def __init__(self, ram_kb: float | None = None, flash_kb: float | None = None) -> None:
        self.ram_kb, self.flash_kb = ram_kb, flash_kb

    def pipeline(self, spec: dict | None = None) -> list[str]:
        return []

    def build(self, model: onnx.ModelProto, out_dir: Path, example: dict[str, np.ndarray] | None = None
              ) -> dict[str, str]:
        require_tools(self.name)
        try:
            return self._build(model, Path(out_dir), example)
        except TargetError as exc:
            if str(exc).startswith(f"{self.name}:"):  # the firmware's own checks (make, QEMU, budget): clear
                raise
            raise explain_failure(lower(model).model, exc, self.name) from exc  # import / static lowering failed

    def _build(self, model: onnx.ModelProto, out_dir: Path, example: dict[str, np.ndarray] | None
               ) -> dict[str, str]:
        import tvm

        files = OnnxRuntimeTarget().build(model, out_dir)
        prog = common.lower_to_relax(model, example, quantized_io=True)
        sub = out_dir / self.name
        facts, io, memory, qio = {}, {}, {}, {}
        for which, names in (("main", prog.returns), ("probe", prog.returns + prog.probe)):
            program = static_c.lower_static(common.entry_module(prog.mod, which), self.cpu.target,
                                            output_names=names,
                                            schedule=dsp_schedule(self.cpu.target))
            dest = out_dir / FIRMWARE if which == "main" else sub / "probe"
            qio = qio or quantized_io_meta(prog, program, self.name)
            facts[which] = write_project(program, dest, self.cpu, example, quantized_io=qio)
            io[which] = {"inputs": facts[which]["inputs"], "outputs": facts[which]["outputs"]}
            elf = make(dest, who=self.name)
            if which == "main":
                with tempfile.TemporaryDirectory(prefix="qc-mcu-") as tmp:
                    stats, console = run_qemu(elf, Path(tmp), cpu=self.cpu)
                if stats["status"] != 0:
                    raise TargetError(f"{self.name}: the firmware failed on the example input: "
                                      f"{console.strip()[-500:]}")
                memory = memory_report(facts["main"], elf_sizes(elf, self.name), stats, program)
                check_budget(memory, ram_kb=self.ram_kb, flash_kb=self.flash_kb, who=self.name)
        if not qio["enabled"]:
            logger.warning("%s: float I/O kept (%s)", self.name, qio["reason"])
        dsp = dsp_counts(out_dir / FIRMWARE / "src" / "kernels.o", self.name)
        logger.info("%s: flash %s, RAM %s (arena %s, bound %s), stack used %s, ~%d instructions/inference",
                    self.name, _kb(memory["flash_bytes"]), _kb(memory["ram_bytes"]), _kb(memory["arena_bytes"]),
                    _kb(memory["arena_lower_bound"]), _kb(memory["stack_used"]), memory["instructions_per_inference"])
        common.write_meta(sub, prog, {"target": self.cpu.target, "cpu": self.cpu.name, "machine": self.cpu.machine,
                                      "tvm": tvm.__version__, "memory": memory, "dsp": dsp, "io": io,
                                      "quantized_io": qio,
                                      "arena_bytes": memory["arena_bytes"],
                                      "arena_lower_bound": memory["arena_lower_bound"],
                                      "const_bytes": memory["weights_bytes"]})
        files.update({"firmware": FIRMWARE, "firmware_elf": f"{FIRMWARE}/{ELF}",
                      "mcu_meta": f"{self.name}/{common.META_FILE}"})
        return files

    def runner(self, out_dir: Path) -> _FirmwareRunner:
        require_tools(self.name)
        return _FirmwareRunner(Path(out_dir), common.read_meta(Path(out_dir) / self.name), self.cpu)

    def run(self, out_dir: Path, samples: Sequence[dict[str, np.ndarray]], threads: int = 1
            ) -> list[dict[str, np.ndarray]]:
        return self.runner(out_dir).run(samples)


class McuCortexM7Target(McuCortexM4Target):
    """``mcu-cortex-m7``: the same firmware for QEMU ``mps2-an500`` (Cortex-M7, FPv5 double-precision FPU)."""

    name = "mcu-cortex-m7"
    cpu = CORTEX_M7
