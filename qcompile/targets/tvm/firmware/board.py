"""The Cortex-M cores and the QEMU mps2 boards that run them, and the firmware project's fixed names."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

SUBDIR = "mcu-cortex-m4"
FIRMWARE = "firmware"
FIRMWARE_DIR = Path(__file__).parent  # the C sources, start-up code, linker script and Makefile beside this file
ELF = "build/firmware.elf"
STACK_SIZE = 16 * 1024
TICKS_PER_INSN = 1 / 40  # mps2 timer at 25 MHz; -icount shift=0 runs one instruction per virtual ns
QEMU_FLAGS = ["-M", "mps2-an386", "-nographic", "-monitor", "none", "-serial", "null", "-icount", "shift=0",
              "-semihosting-config", "enable=on,target=native"]  # the Cortex-M4 board; other boards swap "-M"
TOOLS = ("arm-none-eabi-gcc", "arm-none-eabi-size", "arm-none-eabi-objdump", "qemu-system-arm", "make")
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
