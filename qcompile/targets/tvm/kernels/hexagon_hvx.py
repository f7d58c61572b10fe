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


def legal_vector_extent(extent: int, lanes: int = _LANES) -> bool:
    """Whether a TIR vector loop of ``extent`` lanes is one HVX code computes right: a power of two or a multiple of
    ``lanes``. Others (48, 80, 112 lanes: 16 past a whole vector) gave wrong lanes in LLVM's HVX code for int64
    arithmetic (a conv's requantization ``int32((a·M0 + K) >> 32)``: lanes 32-47 of 48 wrong, every value; 24, 40, 56
    lanes happened to be right, not relied on)."""
    return extent > 0 and (extent & (extent - 1) == 0 or extent % lanes == 0)


def serial_loop(loop):
    """``loop`` with the same variable, bounds and body, run serially."""
    from tvm import tirx

    return tirx.For(loop.loop_var, loop.min, loop.extent, tirx.ForKind.SERIAL, loop.body, loop.thread_binding,
                    loop.annotations)


def _split_vector_loop(loop, lanes: int = _LANES):
    """``loop`` (vectorized, constant extent not :func:`legal_vector_extent`) as a serial loop over vectors of the
    largest power of two (at most ``lanes``) dividing its extent; a serial loop where that is under 4 lanes (LLVM's
    own vectorizer then picks legal vectors and a scalar tail)."""
    import tvm_ffi
    from tvm import tirx

    extent = int(loop.extent.value)
    width = min(extent & -extent, lanes)
    if width < 4:
        return serial_loop(loop)
    dtype = loop.loop_var.ty
    outer, inner = tirx.Var(f"{loop.loop_var.name}_o", dtype), tirx.Var(f"{loop.loop_var.name}_v", dtype)
    index = loop.min + outer * tirx.const(width, dtype) + inner
    body = tvm_ffi.structural_map(loop.body, [(tvm.ir.expr.Var, lambda v: index if v.same_as(loop.loop_var) else v)])
    vec = tirx.For(inner, tirx.const(0, dtype), tirx.const(width, dtype), tirx.ForKind.VECTORIZED, body)
    return tirx.For(outer, tirx.const(0, dtype), tirx.const(extent // width, dtype), tirx.ForKind.SERIAL, vec,
                    loop.thread_binding, loop.annotations)


def legal_vector_loops_pass() -> tvm.transform.Pass:
    """HVX: every vector loop of a kernel on :func:`legal_vector_extent` lanes (:func:`_split_vector_loop`)."""
    from tvm import tirx

    def legal(loop):
        if int(loop.kind) != int(tirx.ForKind.VECTORIZED) or not isinstance(loop.extent, tirx.IntImm) \
                or legal_vector_extent(int(loop.extent.value)):
            return loop
        return _split_vector_loop(loop)

    @tvm.transform.module_pass(opt_level=0, name="QcompileHexagonLegalVectors")
    def _pass(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        import tvm_ffi

        for gv, func in list(mod.functions.items()):
            if isinstance(func, tvm.tirx.PrimFunc):
                new = tvm_ffi.structural_map(func, [(tirx.For, legal)])
                if not tvm_ffi.structural_equal(new, func):
                    logger.debug("hexagon: %s: vector loops split to legal widths", gv.name_hint)
                    mod[gv] = new
        return mod
    return _pass


def _float_products(stmt) -> list:
    import tvm_ffi
    from tvm import tirx

    found = []
    tvm_ffi.structural_walk(stmt, [(tirx.Mul, lambda e: found.append(e) if str(e.ty) == "float32" else None)])
    return found


def separate_float_products_pass() -> tvm.transform.Pass:
    """Every float32 product of a kernel rounded before it is added, as the reference rounds it
    (:mod:`qcompile.floatspec`): the product becomes Hexagon's own multiply, ``llvm.hexagon.F2.sfmpy`` (the
    ``sfmpy`` instruction LLVM emits for a plain ``fmul``), which LLVM never contracts with an add into ``sffma``; its
    loop runs serially (v66's HVX has no float lanes: LLVM scalarized these vectors anyway). The CPU targets' fence
    (:func:`~.floatspec.separate_multiply_add_pass`) is not an option here: LLVM's Hexagon back end never finishes a
    kernel with ``llvm.arithmetic.fence`` (one multiply-add, over 5 minutes). Without it, a float pooling or head
    was a few ulp off (Keras ResNet50V2's global average pool: every later integer tensor shifted)."""
    from tvm import tirx

    def serial(loop):
        if int(loop.kind) != int(tirx.ForKind.VECTORIZED) or not _float_products(loop.body):
            return loop
        return serial_loop(loop)

    def sfmpy(e):
        if str(e.ty) != "float32":
            return e
        return tirx.call_llvm_pure_intrin(e.ty, "llvm.hexagon.F2.sfmpy", e.a, e.b)

    @tvm.transform.module_pass(opt_level=0, name="QcompileHexagonSeparateFloatProducts")
    def _pass(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        import tvm_ffi

        for gv, func in list(mod.functions.items()):
            if isinstance(func, tvm.tirx.PrimFunc) and _float_products(func.body):
                mod[gv] = tvm_ffi.structural_map(tvm_ffi.structural_map(func, [(tirx.For, serial)]),
                                                 [(tirx.Mul, sfmpy)])
        return mod
    return _pass
