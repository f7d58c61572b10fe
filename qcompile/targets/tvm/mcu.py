"""mcu-cortex-m4: the integer Relax module as a bare-metal firmware project for QEMU ``mps2-an386`` (Cortex-M4F).

``build`` writes ``OUT/firmware/``, a self-contained project a firmware engineer can copy: ``include/model.h``
(the C API of ``static_c``: ``qc_model_run(inputs, outputs)``, shapes, dtypes), ``src/`` (generated ``model.c`` with
the weights as ``static const`` arrays in flash and every activation in one planned static arena, TVM's LLVM
object ``kernels.o`` for ``thumbv7em-none-eabi``, the small runtime shim, start-up code, semihosting I/O and an
example ``main.c``), the linker script and a ``Makefile`` (``make``, ``make run``). ``build`` runs that Makefile with
``arm-none-eabi-gcc``, then runs the firmware once in ``qemu-system-arm`` to measure the stack high-water mark
(stack painting) and the instructions per inference (``-icount``), and checks the optional RAM / flash budget.

Quantized I/O: where every graph input is read only by a per-tensor QuantizeLinear and every output is a
DequantizeLinear (:func:`~.frontend.io_cut.strip_quantized_io`), the firmware takes the quantized inputs and
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
import tempfile
from pathlib import Path

import numpy as np
import onnx

from qcompile import ir
from qcompile.errors import TargetError
from qcompile.lowering import lower
from qcompile.targets.base import BatchRunner, CompiledTarget, require_tools
from qcompile.targets.tvm.executors import static_c
from qcompile.targets.tvm.firmware.board import (
    CORTEX_M4,
    CORTEX_M7,
    ELF,
    FIRMWARE,
    SUBDIR,
    TOOLS,
    Cpu,
)
from qcompile.targets.tvm.firmware.project import (
    _kb,
    check_budget,
    dsp_counts,
    elf_sizes,
    make,
    memory_report,
    run_firmware,
    run_qemu,
    write_project,
)
from qcompile.targets.tvm.firmware.quantized_io import QuantizedIO, quantized_io_meta
from qcompile.targets.tvm.frontend import program as frontend
from qcompile.targets.tvm.pipeline import mcu_phases

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------- target
class _FirmwareRunner(BatchRunner):
    """Float samples in, float outputs out, whatever the firmware's I/O: with quantized I/O the samples are
    quantized (and the outputs dequantized) here, by the reference's own ops (:class:`QuantizedIO`)."""

    def __init__(self, out_dir: Path, meta: dict, cpu: Cpu = CORTEX_M4) -> None:
        super().__init__(meta)
        self.out_dir, self.cpu = Path(out_dir), cpu
        qio = meta.get("quantized_io", {})
        self.quantized_io = QuantizedIO(qio) if qio.get("enabled") else None

    def _elf(self, which: str) -> Path:
        folder = self.out_dir / (FIRMWARE if which == "main" else f"{self.cpu.target_name}/probe")
        elf = folder / ELF
        if not elf.is_file():  # a copied project without its build folder: build it again
            make(folder, who=self.cpu.target_name)
        return elf

    def _run(self, samples: list[dict[str, np.ndarray]], which: str) -> list[dict[str, np.ndarray]]:
        qio = self.quantized_io
        feeds = [qio.quantize(s) for s in samples] if qio else list(samples)
        results, stats = run_firmware(self._elf(which), self.meta["io"][which], feeds, cpu=self.cpu)
        logger.info("%s: %d samples in one QEMU run, %d ticks", self.cpu.target_name, stats["samples"],
                    stats["ticks"])
        if qio:
            results = [qio.dequantize(r, f, keep=which == "probe") for r, f in zip(results, feeds)]
        return results


# ------------------------------------------------------------------------------------- unsupported ops
# Ops the firmware cannot run, and why: found in the integer graph when the static lowering fails, so the error
# names the ONNX op rather than a TVM-internal symptom (a match_cast, a packed call).
DATA_DEPENDENT = ("its output shape depends on the input values, and the firmware runs a fixed list of kernels "
                  "over statically planned memory")
UNSUPPORTED_OPS = {
    "NonZero": DATA_DEPENDENT, "Unique": DATA_DEPENDENT, "NonMaxSuppression": DATA_DEPENDENT,
    "Compress": DATA_DEPENDENT,
    "If": "data-dependent control flow; the firmware runs a fixed list of kernels",
    "Loop": "data-dependent control flow; the firmware runs a fixed list of kernels",
    "Scan": "data-dependent control flow; the firmware runs a fixed list of kernels",
}


def explain_failure(model: onnx.ModelProto, exc: TargetError, who: str = SUBDIR) -> TargetError:
    """One line naming the op the firmware cannot run (:data:`UNSUPPORTED_OPS`) in ``model`` (the integer
    graph), with TVM's own words at the end; ``exc`` prefixed with the target's name when no such op is there."""
    detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    found = [n for g in ir.iter_graph_protos(model.graph) for n in g.node if n.op_type in UNSUPPORTED_OPS]
    if not found:
        return TargetError(f"{who}: {detail}")
    n = found[0]
    more = sorted({m.op_type for m in found[1:]} - {n.op_type})
    also = f" (also: {', '.join(more)})" if more else ""
    return TargetError(f"{who}: cannot compile {n.op_type} (node {n.name or n.output[0]!r}): "
                       f"{UNSUPPORTED_OPS[n.op_type]}{also} [{detail}]")


class McuCortexM4Target(CompiledTarget):
    """``mcu-cortex-m4``; ``ram_kb`` / ``flash_kb`` (KiB) make ``build`` fail when the firmware does not fit."""

    name = "mcu-cortex-m4"
    cpu = CORTEX_M4

    def __init__(self, ram_kb: float | None = None, flash_kb: float | None = None) -> None:
        self.ram_kb, self.flash_kb = ram_kb, flash_kb

    def pipeline(self, spec: dict | None = None) -> list:
        return mcu_phases(self.cpu.target)

    def build(self, model: onnx.ModelProto, out_dir: Path, example: dict[str, np.ndarray] | None = None
              ) -> dict[str, str]:
        require_tools(TOOLS, self.name)
        try:
            return self._build(model, Path(out_dir), example)
        except TargetError as exc:
            if str(exc).startswith(f"{self.name}:"):  # the firmware's own checks (make, QEMU, budget): clear
                raise
            raise explain_failure(lower(model).model, exc, self.name) from exc  # import / static lowering failed

    def _build(self, model: onnx.ModelProto, out_dir: Path, example: dict[str, np.ndarray] | None
               ) -> dict[str, str]:
        import tvm

        prog = frontend.lower_to_relax(model, example, quantized_io=True)
        sub = out_dir / self.name
        facts, io, memory, qio = {}, {}, {}, {}
        for which, mod, names in frontend.entries(prog):
            program = static_c.lower_static(mod, self.cpu.target, output_names=names, schedule=self.pipeline())
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
        frontend.write_meta(sub, prog, {"target": self.cpu.target, "cpu": self.cpu.name, "machine": self.cpu.machine,
                                      "tvm": tvm.__version__, "memory": memory, "dsp": dsp, "io": io,
                                      "quantized_io": qio,
                                      "arena_bytes": memory["arena_bytes"],
                                      "arena_lower_bound": memory["arena_lower_bound"],
                                      "const_bytes": memory["weights_bytes"]})
        return {"firmware": FIRMWARE, "firmware_elf": f"{FIRMWARE}/{ELF}",
                "mcu_meta": f"{self.name}/{frontend.META_FILE}"}

    def runner(self, out_dir: Path) -> _FirmwareRunner:
        require_tools(TOOLS, self.name)
        return _FirmwareRunner(Path(out_dir), frontend.read_meta(Path(out_dir) / self.name), self.cpu)


class McuCortexM7Target(McuCortexM4Target):
    """``mcu-cortex-m7``: the same firmware for QEMU ``mps2-an500`` (Cortex-M7, FPv5 double-precision FPU)."""

    name = "mcu-cortex-m7"
    cpu = CORTEX_M7
