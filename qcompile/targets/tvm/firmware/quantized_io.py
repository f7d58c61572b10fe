"""Quantized firmware I/O: where the graph can be cut at its input QuantizeLinear and output DequantizeLinear nodes,
the firmware takes and returns the integer tensors; model.h gets their scales, zero points and C helpers that
quantize / dequantize bit-identically to ``qcompile/reference.py``, and :class:`QuantizedIO` does the same in Python
around a run."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from qcompile import reference
from qcompile.errors import TargetError
from qcompile.targets.tvm.executors import static_c
from qcompile.targets.tvm.firmware.board import SUBDIR
from qcompile.targets.tvm.frontend import program as frontend

logger = logging.getLogger(__name__)



# ------------------------------------------------------------------------------------------ quantized I/O
C_TYPES = {"int8": "int8_t", "uint8": "uint8_t", "int16": "int16_t", "uint16": "uint16_t", "int32": "int32_t",
           "uint32": "uint32_t"}


def quantized_io_meta(prog: frontend.Program, program: static_c.StaticProgram, who: str = SUBDIR) -> dict:
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
            f"#define {up}_NAME {static_c.c_str(e['name'])}",
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
