"""Hexagon HVX int8 kernels: the conv2d / matmul reductions on ``vrmpy`` (128-byte vectors, HVX v66).

``Vx.w += vrmpy(Vu.ub, Vv.b)`` adds to each of 32 int32 lanes the dot product of 4 u8 x s8 byte pairs. It has the
operand form of x86's ``vpdpbusd`` at twice the width, so the VNNI kernels serve it unchanged
(:mod:`.x86_vnni.kernels`, :class:`~.x86_vnni.intrin.DotIsa`): weights packed at compile time to
``[O/32, C/4, KH, KW, 32, 4]`` (conv) or ``[N/32, K/4, 32, 4]`` (matmul), the 4 activation bytes of one reduction
step splatted to every lane, one ``vrmpy`` per 32 output channels x 4 reduction elements. LLVM never forms it from a
plain reduction (measured: 0 ``vrmpy`` and 14.5x the packets of the tensorized kernel on a 4x64x64 matmul).

Integer results are bit-exact: u8 x s8 products summed in int32 without saturation, equal to the reference in any
order; padded channels meet zero weights.
"""
from __future__ import annotations

import functools
import logging

import tvm
from tvm.s_tir import TensorIntrin
from tvm.script import tirx as T

from qcompile.targets.tvm.kernels.x86_vnni.intrin import DotIsa
from qcompile.targets.tvm.kernels.x86_vnni.rewrite import vnni_transform

logger = logging.getLogger(__name__)

VRMPY_INTRIN = "qcompile_dot_32x4_vrmpy"
_LANES = 32  # int32 lanes of a 128-byte HVX vector
_RED = 4
_ACC_BUDGET = 16  # of 32 HVX vector registers: accumulators, the rest weights, splats, addresses


@T.prim_func(s_tir=True)
def _dot_32x4_desc(
    A: T.Buffer((4,), "uint8", offset_factor=1),
    B: T.Buffer((32, 4), "int8", offset_factor=1),
    C: T.Buffer((32,), "int32", offset_factor=1),
) -> None:
    with T.sblock("root"):
        T.reads(C[0:32], A[0:4], B[0:32, 0:4])
        T.writes(C[0:32])
        for i in T.serial(0, 32):
            for k in T.serial(0, 4):
                with T.sblock("update"):
                    vi, vk = T.axis.remap("SR", [i, k])
                    C[vi] = C[vi] + T.cast(A[vk], "int32") * T.cast(B[vi, vk], "int32")


@T.prim_func(s_tir=True)
def _dot_32x4_impl(
    A: T.Buffer((4,), "uint8", offset_factor=1),
    B: T.Buffer((32, 4), "int8", offset_factor=1),
    C: T.Buffer((32,), "int32", offset_factor=1),
) -> None:
    with T.sblock("root"):
        T.reads(C[0:32], A[0:4], B[0:32, 0:4])
        T.writes(C[0:32])
        a_i32 = T.reinterpret(A.vload([0], "uint8x4"), dtype="int32")
        C[T.ramp(T.int32(0), 1, 32)] = T.call_llvm_pure_intrin(
            "int32x32", "llvm.hexagon.V6.vrmpybusv.acc.128B",
            C.vload([0], dtype="int32x32"),
            T.broadcast(a_i32, 32),
            T.reinterpret(B.vload([0, 0], dtype="int8x128"), dtype="int32x32"),
        )


@functools.cache
def _ensure_intrin() -> str:
    TensorIntrin.register(VRMPY_INTRIN, _dot_32x4_desc, _dot_32x4_impl, override=True)
    return VRMPY_INTRIN


def target_has_hvx(target: tvm.target.Target) -> bool:
    """An LLVM Hexagon target with 128-byte HVX vectors (``+hvx-length128b`` and an ``+hvxvNN``)."""
    if target.kind.name != "llvm" or not str(target.attrs.get("mtriple", "")).startswith("hexagon"):
        return False
    mattr = [str(a) for a in target.attrs.get("mattr", [])]
    return "+hvx-length128b" in mattr and any(a.startswith("+hvxv") for a in mattr)


HVX = DotIsa("hvx", _LANES, _RED, _ACC_BUDGET, _ensure_intrin, target_has_hvx)


def hvx_transform(mod: tvm.IRModule, target: tvm.target.Target, stats: dict | None = None) -> tvm.IRModule:
    """u8 x s8 -> i32 conv2d (groups=1) / matmul with constant weights -> ``vrmpy`` kernels (serial loops: one
    hardware thread); unchanged when ``target`` has no 128-byte HVX."""
    return vnni_transform(mod, target, parallel=False, stats=stats, isa=HVX)
