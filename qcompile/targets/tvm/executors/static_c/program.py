"""The static program: tensor views over storage buffers, the steps that call kernels, the planned arena."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)


ALIGN = 64
KERNEL_PREFIX = "qcm_"
FFI_SYMBOL_PREFIX = "__tvm_ffi_"
RUNTIME_DIR = Path(__file__).parent / "runtime"
DL_CODES = {"int": 0, "uint": 1, "float": 2, "bfloat": 4, "bool": 6}
# LLVM opt level for the kernels unless the target names an "opt-level". TVM's default (3) fully
# unrolls every small constant-trip loop; a fused kernel (matmul + a dozen elementwise stages, each
# a loop nest over its own intermediate) then becomes one straight-line function of ~40k IR
# instructions, and the backend (scheduling, register allocation) is superlinear in that: the ViT's
# fused MLP kernels took 10-14 s each for aarch64. At 2 the loops stay loops (still vectorized),
# the whole ViT builds in ~2 s and the object is half the size (zoo CNN/ViT outputs bit-identical
# to the opt-level 3 build: neither level reassociates floats).
KERNEL_OPT_LEVEL = 2


def align_up(n: int, a: int = ALIGN) -> int:
    return (n + a - 1) // a * a


@dataclass(frozen=True)
class View:
    """One DLTensor: a shape/dtype view on a storage buffer."""

    name: str
    buffer: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


@dataclass
class Buffer:
    """Storage: kind is 'input', 'output', 'const' or 'arena'; index is the I/O position."""

    name: str
    nbytes: int
    kind: str
    index: int = -1
    value: np.ndarray | None = None


@dataclass(frozen=True)
class Step:
    """``kind='kernel'``: call ``symbol(*args)`` (inputs then outputs); ``'copy'``: args = (src, dst)."""

    kind: str
    symbol: str
    args: tuple[str, ...]
    n_out: int = 1


@dataclass(frozen=True)
class ArenaPlan:
    offsets: dict[str, int]
    arena_bytes: int
    lower_bound: int
    align: int


@dataclass
class StaticProgram:
    tir_mod: object  # tvm.IRModule of PrimFuncs, global_symbol = Step.symbol
    views: dict[str, View]
    buffers: dict[str, Buffer]
    steps: list[Step]
    inputs: list[str]  # view names, model order
    outputs: list[str]
    input_names: list[str]
    output_names: list[str]
    plan: ArenaPlan = field(default_factory=lambda: ArenaPlan({}, 0, 0, ALIGN))
