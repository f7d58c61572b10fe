"""The Cortex-M DSP dot-product intrinsics: four u8 x s8 products per two ``SMLAD`` on ``SXTB16``/``UXTB16``-unpacked
words (or int16 im2col words against interleaved weights), as TIR tensor intrinsics for ``tensorize``."""
from __future__ import annotations

import functools
import logging

import tvm
from tvm import tirx
from tvm.s_tir import TensorIntrin
from tvm.script import tirx as T
from tvm.target import codegen

logger = logging.getLogger(__name__)


DSP_INTRIN = "qcompile_arm_dsp_dot4_u8s8"
_RED = 4  # reduction elements per 32-bit word
TILE_F = 2  # output channels per register tile
TILE_P = 2  # output pixels (matmul rows) per register tile
MAX_COL_BYTES = 8192  # im2col workspace of one kernel (tile pixels x K int16); larger: one pixel, then decline


# --------------------------------------------------------------------------------------------- intrinsic
def _llvm(name: str, *args: tirx.PrimExpr) -> tirx.PrimExpr:
    return tirx.call_llvm_pure_intrin("int32", name, *args)


def _ror8(x: tirx.PrimExpr) -> tirx.PrimExpr:
    """Rotate right by 8 (``llvm.fshr`` with both halves the same word): LLVM folds it into the ``ror #8``
    operand of ``SXTB16``/``UXTB16``, where a shift would cost one more instruction."""
    return _llvm("llvm.fshr.i32", x, x, tirx.const(8, "int32"))


def dot4(acc: tirx.PrimExpr, a_word: tirx.PrimExpr, w_word: tirx.PrimExpr) -> tirx.PrimExpr:
    """``acc + Σ_{i<4} u8(a_word.byte[i]) · s8(w_word.byte[i])``: UXTB16/SXTB16 on bytes 0,2 and (rotated) 1,3,
    then two SMLAD."""
    lo = _llvm("llvm.arm.smlad", _llvm("llvm.arm.uxtb16", a_word), _llvm("llvm.arm.sxtb16", w_word), acc)
    return _llvm("llvm.arm.smlad", _llvm("llvm.arm.uxtb16", _ror8(a_word)), _llvm("llvm.arm.sxtb16", _ror8(w_word)),
                 lo)


def dot4_i16(acc: tirx.PrimExpr, a_lo: tirx.PrimExpr, a_hi: tirx.PrimExpr, w_word: tirx.PrimExpr) -> tirx.PrimExpr:
    """``acc + a0·w0 + a1·w1 + a2·w2 + a3·w3`` for int16 pairs ``a_lo = (a0, a1)``, ``a_hi = (a2, a3)`` and a
    weight word stored interleaved ``[w0, w2, w1, w3]`` (SXTB16 takes bytes 0,2: (w0, w1); rotated: (w2, w3)):
    two SXTB16 and two SMLAD, CMSIS-NN's ``read_and_pad_reordered``."""
    lo = _llvm("llvm.arm.smlad", a_lo, _llvm("llvm.arm.sxtb16", w_word), acc)
    return _llvm("llvm.arm.smlad", a_hi, _llvm("llvm.arm.sxtb16", _ror8(w_word)), lo)


def _perm(k: tirx.PrimExpr) -> tirx.PrimExpr:
    """Position of reduction element ``k`` (0..3) in an interleaved weight word: 0, 2, 1, 3 (an involution)."""
    return k % 2 * 2 + k // 2


INTERLEAVE = (0, 2, 1, 3)  # numpy form of _perm


@T.prim_func(s_tir=True)
def _u8_desc(a: T.handle, b: T.handle, c: T.handle) -> None:
    A = T.match_buffer(a, (4,), "uint8", offset_factor=1)
    B = T.match_buffer(b, (4,), "int8", offset_factor=1)
    C = T.match_buffer(c, (1,), "int32", offset_factor=1, scope="local")
    with T.sblock("root"):
        T.reads(C[0], A[0:4], B[0:4])
        T.writes(C[0])
        for k in T.serial(0, 4):
            with T.sblock("update"):
                vk = T.axis.remap("R", [k])
                C[0] = C[0] + T.Cast("int32", A[vk]) * T.Cast("int32", B[vk])


@T.prim_func(s_tir=True)
def _u8_impl(a: T.handle, b: T.handle, c: T.handle) -> None:
    A = T.match_buffer(a, (4,), "uint8", offset_factor=1)
    B = T.match_buffer(b, (4,), "int8", offset_factor=1)
    C = T.match_buffer(c, (1,), "int32", offset_factor=1, scope="local")
    with T.sblock("root"):
        T.reads(C[0], A[0:4], B[0:4])
        T.writes(C[0])
        C[0] = dot4(C[0], T.reinterpret(A.vload([0], "uint8x4"), dtype="int32"),
                    T.reinterpret(B.vload([0], "int8x4"), dtype="int32"))


@T.prim_func(s_tir=True)
def _i16_desc(a: T.handle, b: T.handle, c: T.handle) -> None:
    A = T.match_buffer(a, (4,), "int16", offset_factor=1)
    B = T.match_buffer(b, (4,), "int8", offset_factor=1)
    C = T.match_buffer(c, (1,), "int32", offset_factor=1, scope="local")
    with T.sblock("root"):
        T.reads(C[0], A[0:4], B[0:4])
        T.writes(C[0])
        for k in T.serial(0, 4):
            with T.sblock("update"):
                vk = T.axis.remap("R", [k])
                C[0] = C[0] + T.Cast("int32", A[vk]) * T.Cast("int32", B[_perm(vk)])


@T.prim_func(s_tir=True)
def _i16_impl(a: T.handle, b: T.handle, c: T.handle) -> None:
    A = T.match_buffer(a, (4,), "int16", offset_factor=1)
    B = T.match_buffer(b, (4,), "int8", offset_factor=1)
    C = T.match_buffer(c, (1,), "int32", offset_factor=1, scope="local")
    with T.sblock("root"):
        T.reads(C[0], A[0:4], B[0:4])
        T.writes(C[0])
        C[0] = dot4_i16(C[0], T.reinterpret(A.vload([0], "int16x2"), dtype="int32"),
                        T.reinterpret(A.vload([2], "int16x2"), dtype="int32"),
                        T.reinterpret(B.vload([0], "int8x4"), dtype="int32"))


DSP_INTRIN_I16 = DSP_INTRIN + "_i16"


@functools.cache
def _ensure_intrin(i16: bool) -> str:
    """Register the intrinsic once (``TensorIntrin`` is a process-wide table): u8 activations in place
    (:data:`DSP_INTRIN`) or int16 im2col activations with interleaved weights (:data:`DSP_INTRIN_I16`)."""
    if i16:
        TensorIntrin.register(DSP_INTRIN_I16, _i16_desc, _i16_impl, override=True)
        return DSP_INTRIN_I16
    TensorIntrin.register(DSP_INTRIN, _u8_desc, _u8_impl, override=True)
    return DSP_INTRIN


def target_has_dsp(target: tvm.target.Target) -> bool:
    """True for an LLVM Arm target whose CPU has the DSP extension (Cortex-M4/M7/M33...)."""
    if target.kind.name != "llvm" or "arm" not in str(target.attrs.get("mtriple", "")) and \
            "thumb" not in str(target.attrs.get("mtriple", "")):
        return False
    try:
        return bool(codegen.llvm_cpu_has_features(["dsp"], target))
    except Exception as exc:  # noqa: BLE001 - a TVM without the query: no DSP kernels, never an error
        logger.debug("dsp feature query failed for %s: %s", target, exc)
        return False
