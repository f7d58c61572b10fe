"""CUDA host program for a static program's device kernels: ``model.cu`` holds TVM's CUDA C kernels and a host part
with the API of ``model.h`` (the static C executor's), compiled by ``nvcc`` once into ``model.o`` and linked into a
shared library (``model.so``, loaded in-process) and the batch runner (``runner``). No TVM runtime.

At the first run the host part selects a device (``QC_CUDA_DEVICE``, default 0), allocates one device arena (every
intermediate at its planned offset), uploads the weights (embedded at link time) once; a run copies the inputs
in, launches every kernel with ``<<<grid, block>>>`` on one stream in order, copies the outputs out and waits.
``qc_model_profile`` times every step by CUDA events (``tools/gpu_device.py`` uses it). ``ptxas -v`` reports every
kernel it compiled per architecture: that listing (``ptxas.txt``) is how a build on a machine without a GPU shows its
kernels are in the SASS.
"""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path

from qcompile.errors import TargetError
from qcompile.targets.base import require_tools, run_tool
from qcompile.targets.tvm.executors.gpu.host import (BUF_KIND, WEIGHTS, buffer_offset, incbin_weights, io_buffer_tables,
                                                     prepare, write_text)
from qcompile.targets.tvm.executors.gpu.kernels import DeviceKernels
from qcompile.targets.tvm.executors.static_c.emit_c import io_tables
from qcompile.targets.tvm.executors.static_c.program import StaticProgram

logger = logging.getLogger(__name__)

ALIGN = 256  # cudaMalloc's alignment; every planned offset keeps it
ARCHS = ("sm_80", "sm_90")  # A100, H100 / H200
# --fmad=false: float multiply and add rounded one by one, as the reference computes them (qcompile.floatspec)
NVCC = ["nvcc", "-O3", "--fmad=false", "-std=c++17", "--threads", "0", "-Xcompiler", "-fPIC",
        "-diag-suppress", "177,550"]
HOST_CU = Path(__file__).parent / "cuda_host.cu"
HOST_KERNELS = ("qc_spin",)  # the host program's own kernel (qc_model_profile's), not one of the model's
_ENTRY = re.compile(r"Compiling entry function '(\w+)' for '(sm_\d+a?)'")
_CTYPE = {"int8": "int8_t", "uint8": "uint8_t", "int16": "int16_t", "uint16": "uint16_t", "int32": "int32_t",
          "uint32": "uint32_t", "int64": "int64_t", "uint64": "uint64_t", "float32": "float", "float64": "double",
          "bool": "bool"}


def emit_cuda(program: StaticProgram, out_dir: Path, target: dict, *, archs: tuple[str, ...] = ARCHS,
              nvcc: list[str] | None = None) -> dict:
    """Lower the program's kernels for CUDA, write ``model.cu``/``model.h``/``weights.bin`` and build ``model.so``
    and ``runner`` for ``archs`` (skipped when ``nvcc`` is empty); returns the facts ``program.json`` records,
    with the kernels ptxas compiled per architecture."""
    nvcc = NVCC if nvcc is None else nvcc
    out_dir = Path(out_dir).resolve()
    dk, weights, info = prepare(program, out_dir, target, ALIGN)
    write_text(out_dir / "model.cu", model_cu(program, dk, weights, str(out_dir / WEIGHTS)))
    info.update(archs=list(archs), sass_kernels={})
    if nvcc:
        require_tools([nvcc[0]], "tvm-cuda")
        gencode = [f"-gencode=arch=compute_{a[3:]},code={a}" for a in archs]
        res = run_tool([*nvcc, *gencode, "-Xptxas", "-v", "-c", "model.cu", "-o", "model.o"], "tvm-cuda: nvcc",
                       cwd=out_dir, text=True)
        listing = (res.stdout or "") + (res.stderr or "")
        write_text(out_dir / "ptxas.txt", listing)
        run_tool([*nvcc, "-shared", "model.o", "-o", "model.so"], "tvm-cuda: link model.so", cwd=out_dir, text=True)
        run_tool([*nvcc, "runner.c", "model.o", "-o", "runner"], "tvm-cuda: link runner", cwd=out_dir, text=True)
        info["binary"] = "runner"
        info["sass_kernels"] = sass_kernels(listing)
        missing = {a: sorted(set(dk.kernels) - set(info["sass_kernels"].get(a, []))) for a in archs}
        if any(missing.values()):
            raise TargetError(f"tvm-cuda: ptxas compiled no code for {missing}")
    write_text(out_dir / "program.json", json.dumps(info, indent=2))
    logger.info("tvm-cuda: %d kernels, %d launches, arena %d B, %s -> %s", len(dk.kernels), info["launches"],
                program.plan.arena_bytes, ",".join(archs), out_dir)
    return {**info, "out_dir": str(out_dir)}


def sass_kernels(ptxas_listing: str) -> dict[str, list[str]]:
    """Architecture -> the model's entry functions ``ptxas -v`` compiled for it (:data:`HOST_KERNELS` left out)."""
    out: dict[str, set[str]] = {}
    for name, arch in _ENTRY.findall(ptxas_listing):
        if not any(name == h or name.startswith(f"_Z{len(h)}{h}") for h in HOST_KERNELS):  # C++-mangled
            out.setdefault(arch, set()).add(name)
    return {a: sorted(v) for a, v in out.items()}


def _scalar(arg) -> str:
    if arg.dtype not in _CTYPE:
        raise TargetError(f"tvm-cuda: kernel scalar argument of type {arg.dtype} is not supported")
    value = repr(float(arg.value)) if arg.dtype.startswith("float") else str(int(arg.value))
    return f"({_CTYPE[arg.dtype]}){value}"


def model_cu(program: StaticProgram, dk: DeviceKernels, weights: dict[str, int], weights_path: str) -> str:
    """model.cu: TVM's kernels, the weights (``.incbin``), the buffer table and ``qc_model_run``'s launches."""
    buffers = list(program.buffers.values())
    index = {b.name: i for i, b in enumerate(buffers)}
    out = ["/* Generated by qcompile (CUDA host program). Do not edit. */", '#include "model.h"', "",
           dk.source, "", "#include <cuda_runtime.h>", "#include <stdio.h>", "#include <stdlib.h>", "",
           f"#define QC_NUM_BUFFERS {len(buffers)}", f"#define QC_NUM_STEPS {len(program.steps)}",
           *incbin_weights(weights_path, ALIGN)]
    rows = []
    for b in buffers:
        rows.append(f"  {{{BUF_KIND[b.kind]}, {b.index}, {buffer_offset(program, b, weights)}u, "
                    f"{max(b.nbytes, 1)}u}},")
    out += ["typedef struct { int kind, index; size_t offset, size; } qc_buffer_t;",
            "static const qc_buffer_t qc_buffers[QC_NUM_BUFFERS] = {", *rows, "};", ""]
    out += io_tables(program, "input") + io_tables(program, "output")
    out += io_buffer_tables(program, index)
    out += [HOST_CU.read_text(), "", "static int qc_enqueue(void) {", "  cudaError_t err;", "  QC_MARK(0);"]
    for step_i, step in enumerate(program.steps):
        if step_i:
            out.append(f"  QC_MARK({step_i});")
        if step.kind == "copy":
            src, dst = (index[program.views[v].buffer] for v in step.args)
            out += [f"  err = cudaMemcpyAsync(qc_ptr[{dst}], qc_ptr[{src}], {program.views[step.args[1]].nbytes}, "
                    "cudaMemcpyDeviceToDevice, qc_stream);",
                    f"  if (err != cudaSuccess) return qc_step_failed({step_i}, \"copy\", err);"]
            continue
        for launch in dk.launches[step.symbol]:
            args = ", ".join(f"qc_any_ptr{{qc_ptr[{index[program.views[step.args[a.param]].buffer]}]}}"
                             if a.dtype == "handle" else _scalar(a) for a in launch.args)
            grid, block = (", ".join(map(str, d)) for d in (launch.grid, launch.block))
            out += [f"  {launch.kernel}<<<dim3({grid}), dim3({block}), 0, qc_stream>>>({args});",
                    "  err = cudaGetLastError();",
                    f"  if (err != cudaSuccess) return qc_step_failed({step_i}, \"{launch.kernel}\", err);"]
    out += [f"  QC_MARK({len(program.steps)});", "  return 0;", "}", ""]
    return "\n".join(out)


__all__ = ["ALIGN", "ARCHS", "HOST_KERNELS", "NVCC", "emit_cuda", "model_cu", "sass_kernels"]
