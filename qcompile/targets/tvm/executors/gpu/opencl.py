"""OpenCL host program for a static program's device kernels: model.c with the API of ``model.h`` (the static C
executor's), linked with its batch runner (``runner.c``) against the ICD loader (``-lOpenCL``). No TVM runtime.

At the first run the program picks a device (the first GPU, else the first device; ``QC_OPENCL_DEVICE=i``: the
i-th device over all platforms), builds the kernels' OpenCL C (TVM's output, embedded) with correctly rounded
float32 division and square root where the device offers them (the reference's IEEE arithmetic), allocates one
device arena (every intermediate a sub-buffer at its planned offset), uploads the constants once and creates one
``cl_kernel`` per launch with its arguments bound. A run writes the inputs, enqueues every launch and copy in
order on one in-order queue, reads the outputs and waits. Runs on any OpenCL 1.2 device (POCL on a CPU, a
phone's Adreno or Mali).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import re
from pathlib import Path

from qcompile.errors import TargetError
from qcompile.targets.base import require_tools, run_tool
from qcompile.targets.tvm.executors.gpu.host import (BUF_KIND, WEIGHTS, buffer_offset, c_source, incbin_weights,
                                                     io_buffer_tables, prepare, write_text)
from qcompile.targets.tvm.executors.gpu.kernels import DeviceKernels
from qcompile.targets.tvm.executors.static_c.emit_c import c_str, io_tables
from qcompile.targets.tvm.executors.static_c.program import StaticProgram

logger = logging.getLogger(__name__)

# sub-buffer offsets must be multiples of the device's CL_DEVICE_MEM_BASE_ADDR_ALIGN: 128 B on POCL, Adreno and
# Mali, 512 B on NVIDIA's OpenCL; the arena is planned at this alignment and the host program checks the device's
DEVICE_ALIGN = 512
HOST_C = Path(__file__).parent / "opencl_host.c"  # the calls behind the tables, appended to model.c
CC = ["gcc", "-O2", "-std=c11"]
LIBS = ["-lOpenCL"]
# kernel argument kinds of the host program's table
_ARG_KIND = {"handle": 0, "int32": 1, "uint32": 1, "int64": 2, "uint64": 2, "float32": 3, "float64": 4}


def emit_opencl(program: StaticProgram, out_dir: Path, target: dict, *, cc: list[str] | None = None) -> dict:
    """Lower the program's kernels for OpenCL, write ``kernels.cl``, ``model.c``/``model.h`` and link ``runner``
    (skipped when ``cc`` is empty); returns the facts ``program.json`` records."""
    cc = CC if cc is None else cc
    out_dir = Path(out_dir)
    dk, weights, info = prepare(program, out_dir, target, DEVICE_ALIGN)
    source = half_storage_only(dk.source)
    if source != dk.source:
        dk = dataclasses.replace(dk, source=source)
        info["half_storage"] = True
    write_text(out_dir / "kernels.cl", dk.source)
    write_text(out_dir / "model.c", model_c(program, dk, weights))
    if cc:
        require_tools([cc[0]], "tvm-opencl")
        run_tool([*cc, "-I.", "model.c", "runner.c", *LIBS, "-o", "runner"], "tvm-opencl: link", cwd=out_dir,
                 text=True)
        info["binary"] = "runner"
    write_text(out_dir / "program.json", json.dumps(info, indent=2))
    logger.info("tvm-opencl: %d kernels, %d launches, arena %d B -> %s", len(dk.kernels), info["launches"],
                program.plan.arena_bytes, out_dir)
    return {**info, "out_dir": str(out_dir)}


_FP16_PRAGMA = re.compile(r"#ifdef cl_khr_fp16\n.*?#endif\n", re.S)
_KERNEL = re.compile(r"__kernel void \w+\(([^)]*)\)\s*\{")
_HALF_PARAM = re.compile(r"__global half\* restrict (\w+)")
_HALF_LEFT = re.compile(r"\bhalf\d*\b|convert_half")


def _close(text: str, start: int, opening: str, closing: str) -> int:
    """The index of the bracket closing the one at ``start``."""
    depth = 0
    for i in range(start, len(text)):
        depth += (text[i] == opening) - (text[i] == closing)
        if depth == 0:
            return i
    raise ValueError("unbalanced")


def _half_body(body: str, names: list[str]) -> str | None:
    """``body`` with every element of the half buffers ``names`` read by ``vload_half`` and written by
    ``vstore_half_rte``; None where a half value is used any other way (half arithmetic, vectors, locals)."""
    for name in names:
        out, i = [], 0
        pattern = re.compile(rf"\b{name}\[")
        while (m := pattern.search(body, i)) is not None:
            end = _close(body, m.end() - 1, "[", "]")
            index = body[m.end():end]
            assign = re.match(r"\s*=(?!=)\s*", body[end + 1:])
            out.append(body[i:m.start()])
            if assign is None:
                out.append(f"vload_half({index}, {name})")
                i = end + 1
                continue
            value_at = end + 1 + assign.end()
            stmt_end = body.index(";", value_at)
            value = body[value_at:stmt_end].strip()
            inner = re.fullmatch(r"\(convert_half\((.*)\)\)", value, re.S)
            if inner is None or _close(value, len("(convert_half"), "(", ")") != len(value) - 2:
                return None
            out.append(f"vstore_half_rte({inner.group(1)}, {index}, {name})")
            i = stmt_end
        out.append(body[i:])
        body = "".join(out)
    return None if _HALF_LEFT.search(body) else body


def half_storage_only(source: str) -> str:
    """TVM's OpenCL C with float16 buffers read and written through ``vload_half`` / ``vstore_half_rte`` (core
    OpenCL: a ``half`` pointer needs no extension) instead of ``half`` arithmetic, which needs ``cl_khr_fp16`` (TVM
    then emits an ``#error`` for devices without it: POCL on a CPU, some embedded GPUs). A float16 model keeps
    float16 inputs and outputs, cast at the borders (qcompile.upcast): those casts are the only half values, and
    ``convert_half``'s rounding is ``vstore_half_rte``'s (to nearest even). The source as it was where any kernel
    uses half otherwise."""
    if "cl_khr_fp16" not in source:
        return source
    out, i = [], 0
    for m in _KERNEL.finditer(source):
        names = _HALF_PARAM.findall(m.group(1))
        if not names:
            continue
        body_end = _close(source, m.end() - 1, "{", "}")
        body = _half_body(source[m.end():body_end], names)
        if body is None:
            return source
        out += [source[i:m.end()], body]
        i = body_end
    out.append(source[i:])
    rewritten = _FP16_PRAGMA.sub("", "".join(out))
    return source if _HALF_LEFT.search(_HALF_PARAM.sub("", rewritten)) else rewritten


def _scalar(arg) -> tuple[int, str, str]:
    if arg.dtype not in _ARG_KIND:
        raise TargetError(f"tvm-opencl: kernel scalar argument of type {arg.dtype} is not supported")
    kind = _ARG_KIND[arg.dtype]
    return kind, str(int(arg.value)) if kind in (1, 2) else "0", repr(float(arg.value)) if kind in (3, 4) else "0"


def model_c(program: StaticProgram, dk: DeviceKernels, weights: dict[str, int]) -> str:
    """model.c: the embedded kernel source, the weights (``.incbin`` of :data:`WEIGHTS`, offsets ``weights``), the
    buffer / argument / operation tables and the OpenCL calls that serve ``qc_model_run``."""
    buffers = list(program.buffers.values())
    index = {b.name: i for i, b in enumerate(buffers)}
    out = ["/* Generated by qcompile (OpenCL host program). Do not edit. */",
           "#define CL_TARGET_OPENCL_VERSION 120", "#include <CL/cl.h>", "#include <stdio.h>",
           "#include <stdlib.h>", "#include <string.h>", '#include "model.h"', "",
           f"#define QC_DEVICE_ALIGN {DEVICE_ALIGN}u", f"#define QC_NUM_BUFFERS {len(buffers)}", ""]
    out += c_source("qc_source", dk.source)
    out += incbin_weights(WEIGHTS, DEVICE_ALIGN)
    rows = []
    for b in buffers:
        offset = buffer_offset(program, b, weights)
        data = f"qc_weights + {offset}" if b.kind == "const" else "NULL"
        rows.append(f"  {{{BUF_KIND[b.kind]}, {b.index}, {offset}u, {max(b.nbytes, 1)}u, {data}}},")
    out += ["typedef struct { int kind, index; size_t offset, size; const void *data; } qc_buffer_t;",
            "static const qc_buffer_t qc_buffers[QC_NUM_BUFFERS] = {", *rows, "};"]
    args, ops, names = [], [], []
    for step_i, step in enumerate(program.steps):
        if step.kind == "copy":
            src, dst = (index[program.views[v].buffer] for v in step.args)
            ops.append(f"  {{1, {step_i}, -1, 0, 0, {src}, {dst}, {program.views[step.args[1]].nbytes}u, "
                       "{1, 1, 1}, {1, 1, 1}},")
            continue
        for launch in dk.launches[step.symbol]:
            first = len(args)
            for a in launch.args:
                if a.dtype == "handle":
                    args.append(f"  {{0, {index[program.views[step.args[a.param]].buffer]}, 0, 0}},")
                else:
                    kind, i_val, f_val = _scalar(a)
                    args.append(f"  {{{kind}, -1, {i_val}LL, {f_val}}},")
            gsize = ", ".join(str(g * b) for g, b in zip(launch.grid, launch.block))
            lsize = ", ".join(str(b) for b in launch.block)
            ops.append(f"  {{0, {step_i}, {len(names)}, {first}, {len(launch.args)}, -1, -1, 0u, "
                       f"{{{gsize}}}, {{{lsize}}}}},")
            names.append(c_str(launch.kernel))
    out += ["typedef struct { int kind, buffer; long long i; double f; } qc_arg_t;",
            f"static const qc_arg_t qc_args[{max(len(args), 1)}] = {{", *(args or ["  {0, -1, 0, 0},"]), "};",
            f"#define QC_NUM_LAUNCHES {len(names)}",
            f"static const char *const qc_kernel_names[{max(len(names), 1)}] = {{{', '.join(names) or '0'}}};",
            "/* kind 0: launch (kernel, first arg, n args, global and local sizes); 1: copy src -> dst */",
            "typedef struct { int kind, step, kernel, first, nargs, src, dst; size_t nbytes;"
            " size_t global[3], local[3]; } qc_op_t;",
            f"#define QC_NUM_OPS {len(ops)}",
            f"static const qc_op_t qc_ops[{max(len(ops), 1)}] = {{", *(ops or ["  {1, 0, -1, 0, 0, 0, 0, 0u},"]), "};",
            ""]
    out += io_tables(program, "input") + io_tables(program, "output")
    out += io_buffer_tables(program, index)
    out += [HOST_C.read_text()]
    return "\n".join(out)


__all__ = ["CC", "DEVICE_ALIGN", "WEIGHTS", "emit_opencl", "model_c"]
