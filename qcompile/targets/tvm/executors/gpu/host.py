"""What the OpenCL and CUDA host programs share: the weights as one file embedded at link time, C string literals
for embedded source, atomic writes."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from qcompile.errors import TargetError
from qcompile.ir import atomic_write
from qcompile.targets.tvm.executors.static_c.emit_c import c_str
from qcompile.targets.tvm.executors.static_c.program import StaticProgram


def write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda p: p.write_text(text))


def c_source(name: str, text: str) -> list[str]:
    """``static const char name[] = "..." "...";``, one literal per line of ``text``."""
    lines = text.splitlines(keepends=True) or [""]
    return [f"static const char {name}[] ="] + [f"  {c_str(line)}" for line in lines] + ["  ;"]


def weights_blob(program: StaticProgram, align: int) -> tuple[bytes, dict[str, int]]:
    """Every constant back to back at ``align``-byte offsets (the host program embeds the file with ``.incbin``: a
    135M-parameter decoder as a C array initializer would be a ~500 MB source file); offsets by buffer name."""
    parts, offsets, pos = [], {}, 0
    for b in program.buffers.values():
        if b.kind == "const":
            pad = -pos % align
            parts.append(b"\0" * pad)
            pos += pad
            offsets[b.name] = pos
            data = np.ascontiguousarray(b.value).tobytes()
            parts.append(data)
            pos += len(data)
    return b"".join(parts), offsets


def incbin_weights(path: str, align: int) -> list[str]:
    """C / C++ lines that embed the file ``path`` (relative to the compiler's working directory, or absolute) as
    ``qc_weights``, ``align``-byte aligned, through the assembler's ``.incbin``."""
    if any(c in path for c in '"\\\n'):
        raise TargetError(f"cannot embed weights from a path with quotes or backslashes: {path!r}")
    return [f'__asm__(".section .rodata\\n.balign {align}\\nqc_weights:\\n.incbin \\"{path}\\"\\n.byte 0\\n'
            '.previous");', "extern const unsigned char qc_weights[];"]


def io_buffer_tables(program: StaticProgram, index: dict[str, int]) -> list[str]:
    """``qc_input_buffer[i]`` / ``qc_output_buffer[i]``: the host program's buffer of input / output i."""
    def table(which: str, views: list[str]) -> str:
        ids = ", ".join(str(index[program.views[v].buffer]) for v in views) or "-1"
        return f"static const int qc_{which}_buffer[{max(len(views), 1)}] = {{{ids}}};"
    return [table("input", program.inputs), table("output", program.outputs)]


WEIGHTS = "weights.bin"  # every constant, embedded into the host program at link time (incbin_weights)
BUF_KIND = {"arena": 0, "const": 1, "input": 2, "output": 3}  # the host programs' buffer-table kinds


def prepare(program: StaticProgram, out_dir: Path, target: dict, align: int):
    """What both host programs start from: the device kernels (:func:`.kernels.lower_kernels`), the arena planned at
    ``align``, and ``model.h``, ``weights.bin`` and the batch runner's ``runner.c`` written into ``out_dir``.
    Returns (kernels, weight offsets by buffer name, the facts program.json records)."""
    import platform

    from qcompile.targets.tvm.executors.gpu.kernels import lower_kernels
    from qcompile.targets.tvm.executors.static_c.arena import lifetimes, plan_arena
    from qcompile.targets.tvm.executors.static_c.emit_c import io_meta, model_h
    from qcompile.targets.tvm.executors.static_c.program import RUNTIME_DIR

    out_dir.mkdir(parents=True, exist_ok=True)
    dk = lower_kernels(program, target)
    sizes = {b.name: b.nbytes for b in program.buffers.values() if b.kind == "arena"}
    program.plan = plan_arena(sizes, lifetimes(program), align=align)
    blob, weights = weights_blob(program, align)
    atomic_write(out_dir / WEIGHTS, lambda p: p.write_bytes(blob))
    write_text(out_dir / "model.h", model_h(program, 0))
    write_text(out_dir / "runner.c", (RUNTIME_DIR / "runner.c").read_text())
    facts = {
        "triple": f"{platform.machine()}-linux-gnu",  # the host program is built by and for this machine
        "inputs": [io_meta(program, n, v) for n, v in zip(program.input_names, program.inputs)],
        "outputs": [io_meta(program, n, v) for n, v in zip(program.output_names, program.outputs)],
        "steps": len(program.steps),
        "step_symbols": [s.symbol for s in program.steps],
        "step_args": [step_args(program, s) for s in program.steps],
        "kernels": dk.kernels,
        "launches": sum(len(dk.launches[s.symbol]) for s in program.steps if s.kind == "kernel"),
        "arena_bytes": program.plan.arena_bytes,
        "arena_lower_bound": program.plan.lower_bound,
        "align": align,
        "workspace_bytes": 0,
        "const_bytes": sum(b.nbytes for b in program.buffers.values() if b.kind == "const"),
        "binary": None,
    }
    return dk, weights, facts


def step_args(program: StaticProgram, step) -> list[dict]:
    """A step's arguments (inputs, then its ``n_out`` outputs) as shape, dtype and storage kind (``const`` for a
    weight): what a profile needs to name a step's work, e.g. the M, N, K of a matmul with a constant operand."""
    out = []
    for i, name in enumerate(step.args):
        view = program.views[name]
        out.append({"shape": list(view.shape), "dtype": view.dtype, "kind": program.buffers[view.buffer].kind,
                    "out": i >= len(step.args) - step.n_out})
    return out


def buffer_offset(program: StaticProgram, buf, weights: dict[str, int]) -> int:
    """A buffer's offset: in weights.bin (constants), in the arena (intermediates), 0 (inputs and outputs)."""
    if buf.kind == "const":
        return weights[buf.name]
    return program.plan.offsets.get(buf.name, 0) if buf.kind == "arena" else 0


__all__ = ["BUF_KIND", "WEIGHTS", "buffer_offset", "c_source", "incbin_weights", "io_buffer_tables", "prepare",
           "step_args", "weights_blob", "write_text"]
