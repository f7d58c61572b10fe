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


__all__ = ["c_source", "io_buffer_tables", "incbin_weights", "weights_blob", "write_text"]
