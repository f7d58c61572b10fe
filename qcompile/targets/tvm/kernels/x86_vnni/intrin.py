"""The host CPU and the VNNI dot-product intrinsics: 16 output channels x 4 reduction elements per ``vpdpbusd zmm``
(u8 x s8, or s8 x s8 through a +128 shift), as TIR tensor intrinsics for ``tensorize``."""
from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass

import tvm
from tvm import tirx
from tvm.s_tir import TensorIntrin
from tvm.script import tirx as T
from tvm.target import codegen

logger = logging.getLogger(__name__)



VNNI_INTRIN = "qcompile_dot_16x4_vnni"
VNNI_ROWS_INTRIN = "qcompile_dot_16x4_rows_vnni"  # registered with VNNI_INTRIN (same operand form)
_LANES = 16  # int32 accumulators per zmm register = output channels per intrinsic call
_RED = 4  # u8/s8 pairs reduced into each int32 lane
_ACC_BUDGET = 24  # zmm accumulators per register tile (32 zmm registers in total)
# relax OpPatternKind::kOutEWiseFusable: FuseOps fuses the elementwise requantize epilogue that follows into the
# kernel (a conv2d/matmul anchor), FuseTIR concatenates the two, and vnni_epilogue moves the epilogue into the
# kernel's output-tile loop
_OP_PATTERN_OUT_ELEMWISE = 4
# kOpaque, for a kernel whose elementwise consumers compute an erf (GELU): that chain stays its own kernel, where
# the certified-erf rebuild (schedules/rules.py) applies
_OP_PATTERN_OPAQUE = 8
_CHAIN_DEPTH = 64  # elementwise consumers followed from a conv2d / matmul


# --------------------------------------------------------------------------- host / target


def host_mcpu() -> str:
    """LLVM ``-mcpu`` name of this machine (e.g. ``"znver4"``).

    Uses LLVM's own detection; falls back to ``/proc/cpuinfo`` flags
    (``"cascadelake"`` if ``avx512_vnni``, ``"skylake-avx512"`` if ``avx512bw``, else
    ``"x86-64-v3"``/``"x86-64"``).
    """
    try:
        cpu = str(codegen.llvm_get_system_cpu())
        if cpu and cpu != "generic":
            return cpu
    except Exception as exc:  # pragma: no cover - depends on the TVM build
        logger.debug("llvm_get_system_cpu failed: %s", exc)
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    if "avx512_vnni" in flags:
        return "cascadelake"
    if "avx512bw" in flags:
        return "skylake-avx512"
    if "avx2" in flags:
        return "x86-64-v3"
    return "x86-64"


def target_has_vnni(target: tvm.target.Target) -> bool:
    """True when ``target`` is an LLVM x86 target whose CPU has AVX512-VNNI."""
    if target.kind.name != "llvm":
        return False
    try:
        return bool(codegen.llvm_cpu_has_features(["avx512vnni"], target))
    except Exception as exc:  # pragma: no cover - non-x86 LLVM
        logger.debug("feature query failed for %s: %s", target, exc)
        return False


# --------------------------------------------------------------------------- intrinsic


# Same description as TVM's ``dot_16x4_vnni``; copied because importing
# ``tvm.s_tir.tensor_intrin`` registers every backend's intrinsics and takes ~30 s.
@T.prim_func(s_tir=True)
def _dot_16x4_desc(
    A: T.Buffer((4,), "uint8", offset_factor=1),
    B: T.Buffer((16, 4), "int8", offset_factor=1),
    C: T.Buffer((16,), "int32", offset_factor=1),
) -> None:
    with T.sblock("root"):
        T.reads(C[0:16], A[0:4], B[0:16, 0:4])
        T.writes(C[0:16])
        for i in T.serial(0, 16):
            for k in T.serial(0, 4):
                with T.sblock("update"):
                    vi, vk = T.axis.remap("SR", [i, k])
                    C[vi] = C[vi] + T.cast(A[vk], "int32") * T.cast(B[vi, vk], "int32")


def _vnni_impl(byte_operands: bool) -> tirx.PrimFunc:
    """``C[16] += A[4] · B[16, 4]`` as one ``vpdpbusd``; operand form depends on LLVM."""
    if byte_operands:

        @T.prim_func(s_tir=True)
        def impl(
            A: T.Buffer((4,), "uint8", offset_factor=1),
            B: T.Buffer((16, 4), "int8", offset_factor=1),
            C: T.Buffer((16,), "int32", offset_factor=1),
        ) -> None:
            with T.sblock("root"):
                T.reads(C[0:16], A[0:4], B[0:16, 0:4])
                T.writes(C[0:16])
                a_i32 = T.reinterpret(A.vload([0], "uint8x4"), dtype="int32")
                C[T.ramp(T.int32(0), 1, 16)] = T.call_llvm_pure_intrin(
                    T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.512"),
                    C.vload([0], dtype="int32x16"),
                    T.reinterpret(T.broadcast(a_i32, 16), dtype="uint8x64"),
                    B.vload([0, 0], dtype="int8x64"),
                    dtype="int32x16",
                )

    else:

        @T.prim_func(s_tir=True)
        def impl(
            A: T.Buffer((4,), "uint8", offset_factor=1),
            B: T.Buffer((16, 4), "int8", offset_factor=1),
            C: T.Buffer((16,), "int32", offset_factor=1),
        ) -> None:
            with T.sblock("root"):
                T.reads(C[0:16], A[0:4], B[0:16, 0:4])
                T.writes(C[0:16])
                a_i32 = T.reinterpret(A.vload([0], "uint8x4"), dtype="int32")
                C[T.ramp(T.int32(0), 1, 16)] = T.call_llvm_pure_intrin(
                    T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.512"),
                    C.vload([0], dtype="int32x16"),
                    T.broadcast(a_i32, 16),
                    T.reinterpret(B.vload([0, 0], dtype="int8x64"), dtype="int32x16"),
                    dtype="int32x16",
                )

    return impl


@T.prim_func(s_tir=True)
def _dot_16x4_rows_desc(
    A: T.Buffer((16, 4), "uint8", offset_factor=1),
    B: T.Buffer((4,), "int8", offset_factor=1),
    C: T.Buffer((16,), "int32", offset_factor=1),
) -> None:
    with T.sblock("root"):
        T.reads(C[0:16], A[0:16, 0:4], B[0:4])
        T.writes(C[0:16])
        for i in T.serial(0, 16):
            for k in T.serial(0, 4):
                with T.sblock("update"):
                    vi, vk = T.axis.remap("SR", [i, k])
                    C[vi] = C[vi] + T.cast(A[vi, vk], "int32") * T.cast(B[vk], "int32")


def _vnni_rows_impl(byte_operands: bool) -> tirx.PrimFunc:
    """``C[16] += A[16, 4] · B[4]`` as one ``vpdpbusd``: 16 activation rows (pixels) against one broadcast weight
    quadruple, the transpose of :func:`_vnni_impl` (whose 16 lanes are output channels)."""
    if byte_operands:

        @T.prim_func(s_tir=True)
        def impl(
            A: T.Buffer((16, 4), "uint8", offset_factor=1),
            B: T.Buffer((4,), "int8", offset_factor=1),
            C: T.Buffer((16,), "int32", offset_factor=1),
        ) -> None:
            with T.sblock("root"):
                T.reads(C[0:16], A[0:16, 0:4], B[0:4])
                T.writes(C[0:16])
                b_i32 = T.reinterpret(B.vload([0], "int8x4"), dtype="int32")
                C[T.ramp(T.int32(0), 1, 16)] = T.call_llvm_pure_intrin(
                    T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.512"),
                    C.vload([0], dtype="int32x16"),
                    A.vload([0, 0], dtype="uint8x64"),
                    T.reinterpret(T.broadcast(b_i32, 16), dtype="int8x64"),
                    dtype="int32x16",
                )

    else:

        @T.prim_func(s_tir=True)
        def impl(
            A: T.Buffer((16, 4), "uint8", offset_factor=1),
            B: T.Buffer((4,), "int8", offset_factor=1),
            C: T.Buffer((16,), "int32", offset_factor=1),
        ) -> None:
            with T.sblock("root"):
                T.reads(C[0:16], A[0:16, 0:4], B[0:4])
                T.writes(C[0:16])
                b_i32 = T.reinterpret(B.vload([0], "int8x4"), dtype="int32")
                C[T.ramp(T.int32(0), 1, 16)] = T.call_llvm_pure_intrin(
                    T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.512"),
                    C.vload([0], dtype="int32x16"),
                    T.reinterpret(A.vload([0, 0], dtype="uint8x64"), dtype="int32x16"),
                    T.broadcast(b_i32, 16),
                    dtype="int32x16",
                )

    return impl


def _probe_target() -> tvm.target.Target:
    return tvm.target.Target({"kind": "llvm", "mcpu": "cascadelake"})


@functools.cache
def _ensure_intrin() -> str:
    """Register :data:`VNNI_INTRIN` with the operand form the bundled LLVM accepts."""
    errors = []
    for byte_operands in (codegen.llvm_version_major() >= 22, codegen.llvm_version_major() < 22):
        impl = _vnni_impl(byte_operands)
        try:
            tvm.compile(tvm.IRModule({"main": impl.with_attr("global_symbol", "main")}),
                        _probe_target())
        except Exception as exc:  # LLVM verification error on the wrong signature
            errors.append(str(exc).splitlines()[0] if str(exc) else repr(exc))
            continue
        TensorIntrin.register(VNNI_INTRIN, _dot_16x4_desc, impl, override=True)
        TensorIntrin.register(VNNI_ROWS_INTRIN, _dot_16x4_rows_desc, _vnni_rows_impl(byte_operands), override=True)
        logger.debug("registered %s (byte operands: %s)", VNNI_INTRIN, byte_operands)
        return VNNI_INTRIN
    raise RuntimeError(f"no vpdpbusd operand form compiles with this LLVM: {errors}")


# --------------------------------------------------------------------------- weight packing


@dataclass(frozen=True)
class DotIsa:
    """A u8 x s8 -> i32 dot-product instruction as the matmul / conv2d kernels use it: ``lanes`` int32 accumulators
    per vector register, each reducing ``red`` byte pairs, ``acc_budget`` accumulator registers per register tile;
    ``intrin()`` registers the tensor intrinsic (desc: ``C[lanes] += A[red] . B[lanes, red]``) and returns its name;
    ``available(target)`` says whether ``target`` has the instruction."""

    name: str
    lanes: int
    red: int
    acc_budget: int
    intrin: Callable[[], str]
    available: Callable[[tvm.target.Target], bool]


VNNI = DotIsa("vnni", _LANES, _RED, _ACC_BUDGET, _ensure_intrin, target_has_vnni)
