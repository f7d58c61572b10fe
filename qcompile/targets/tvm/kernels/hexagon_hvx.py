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


def _shifts_int64_off_the_high_word(func) -> bool:
    """Whether ``func`` shifts an int64 right by anything but 32 (the requantization's "left" and "mixed" forms,
    :func:`~..frontend.requant.mbqm_form`; the usual "right" form takes the high word: ``q >> 32``)."""
    import tvm_ffi
    from tvm.ir.prim.expr import RShift

    found = []

    def on_shift(e) -> None:
        amount = getattr(e.b, "value", None)
        if str(e.ty) == "int64" and amount != 32:
            found.append(e)

    tvm_ffi.structural_walk(func, [(RShift, on_shift)])
    return bool(found)


def _gathers_in_vector_loops(func) -> bool:
    """Whether a vectorized loop of ``func`` loads with its variable (or a block variable bound to it) under a
    division or modulo: a gather (the interleaving of a sub-pixel ConvTranspose's phases,
    ``acc[c·4 + (y % 2)·2 + x % 2, y // 2, x // 2]``)."""
    import tvm_ffi
    from tvm import s_tir, tirx
    from tvm.ir.prim.expr import FloorDiv, FloorMod

    found = []

    def on_for(loop) -> None:
        if int(loop.kind) != int(tirx.ForKind.VECTORIZED):
            return
        lanes = [loop.loop_var]

        def on_realize(realize) -> None:
            lanes.extend(iv.var for iv, value in zip(realize.block.iter_vars, realize.iter_values)
                         if _uses(value, loop.loop_var))

        def on_load(load) -> None:
            if str(load.ty) not in ("int32", "int64"):  # the accumulators: packed int8 weights load fine
                return

            def on_divmod(e) -> None:
                if any(_uses(e.a, v) for v in lanes):
                    found.append(load)
            for index in load.indices:
                tvm_ffi.structural_walk(index, [((FloorDiv, FloorMod), on_divmod)])
        tvm_ffi.structural_walk(loop.body, [(s_tir.stmt.SBlockRealize, on_realize)])
        tvm_ffi.structural_walk(loop.body, [(tvm.ir.expr.TensorLoad, on_load)])

    tvm_ffi.structural_walk(func, [(tirx.For, on_for)])
    return bool(found)


def _uses(expr, var) -> bool:
    import tvm_ffi

    hits = []
    tvm_ffi.structural_walk(expr, [(tvm.ir.expr.Var, lambda v: hits.append(v) if v.same_as(var) else None)])
    return bool(hits)


def serial_hvx_hazards_pass() -> tvm.transform.Pass:
    """HVX: the vector loops of a kernel that LLVM's Hexagon back end computes wrongly on 32-lane vectors run
    serially. Two shapes, each found on a Keras U-Net and exact without HVX and on every other target:
    ``int32((a·M0 + 2^30) >> 31)`` (a Concat's requantization at shift 0: every lane gave the zero point), and an
    int32 gather under the vector loop (a sub-pixel ConvTranspose's phase interleave: 11 % of the values equal).
    The vrmpy kernels, whose epilogues read their accumulators with such indices exactly, keep their vectors, as do
    the convs' high-word requantization (``q >> 32``) and every zoo model's kernels."""
    from tvm import tirx

    def serial(loop):
        if int(loop.kind) != int(tirx.ForKind.VECTORIZED):
            return loop
        return tirx.For(loop.loop_var, loop.min, loop.extent, tirx.ForKind.SERIAL, loop.body, loop.thread_binding,
                        loop.annotations)

    @tvm.transform.module_pass(opt_level=0, name="QcompileHexagonSerialHazards")
    def _pass(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        import tvm_ffi

        for gv, func in list(mod.functions.items()):
            if not isinstance(func, tvm.tirx.PrimFunc) or f"qc_{HVX.name}_" in gv.name_hint:
                continue  # the vrmpy kernels (their own schedules; every zoo model bit-exact on them)
            why = ("an int64 shift off the high word" if _shifts_int64_off_the_high_word(func) else
                   "an int32 gather in a vector loop" if _gathers_in_vector_loops(func) else "")
            if why:
                new = tvm_ffi.structural_map(func, [(tirx.For, serial)])
                if not tvm_ffi.structural_equal(new, func):
                    logger.info("hexagon: %s keeps its loops serial (%s)", gv.name_hint, why)
                    mod[gv] = new
        return mod
    return _pass
