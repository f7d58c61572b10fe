"""Hand-scheduled int8 kernels for x86 AVX512-VNNI (``vpdpbusd``), no tuning required.

:func:`vnni_transform` rewrites the true-integer linear ops that qcompile emits in Relax::

    R.nn.conv2d(x: u8[N,C,H,W], w: const i8[O,C,KH,KW], groups=1, NCHW/OIHW, out_dtype="int32")
    R.matmul(x: u8[..., M, K], w: const i8[K, N], out_dtype="int32")

into ``R.call_tir`` of PrimFuncs that are tiled, register-blocked and tensorized with a
16x4 u8·s8→i32 dot-product intrinsic (one ``vpdpbusd zmm`` per 16 output channels × 4
reduction elements). Everything else (depthwise/grouped conv, float ops, non-constant
weights, dynamic shapes, other layouts) is left untouched for the default lowering.

Where to call it
    On the Relax module *before* legalization, i.e. before ``tvm.compile`` /
    ``relax.build`` (whose default pipeline starts with ``LegalizeOps``)::

        mod = vnni_transform(mod, target)
        ex = tvm.compile(mod, target)

    After ``LegalizeOps`` the ops are already ``call_tir`` of generic TIR and nothing
    matches any more. Weights must be visible as constants (``relax.Constant`` or a var
    bound to one in the same function); run ``relax.transform.FoldConstant()`` first if
    they are computed from constants (e.g. a transposed initializer).

Weight packing
    Done once at compile time, in numpy, and re-embedded as a new constant:
    matmul ``[K, N] → [ceil(N/16), ceil(K/4), 16, 4]``, conv
    ``[O, C, KH, KW] → [ceil(O/16), ceil(C/4), KH, KW, 16, 4]``. Nothing is repacked per
    inference.

Shapes that do not divide
    Handled by zero-padding, never by falling back: the weight is zero-padded at compile
    time (N / O up to a multiple of 16, K / C up to a multiple of 4); the activation is
    zero-padded inside the kernel only when needed (matmul: K % 4 != 0 or M not a multiple
    of the row tile; conv: always, see below); results for padded rows/channels are
    computed into a small per-tile accumulator and simply not stored.

Conv2d strategy: NCHW[4c] blocked direct convolution (not implicit GEMM)
    The kernel first packs the u8 NCHW activation into ``[N, C/4, Hp, Wp, 4]`` (zero
    padded: channels to a multiple of 4, spatially for the conv's own ``padding`` and for
    the output-width tile), so the 4 reduction bytes of a pixel are contiguous and can be
    broadcast with one load. It then accumulates ``[ocb×16 channels] × [owb pixels]`` in
    registers over (C/4, KH, KW) and writes the tile straight back to NCHW int32. The
    pack is O(input) and needs no im2col buffer (which for 3x3 convs is 9× the input);
    the output stays NCHW so the surrounding Relax graph does not change.

    Two kernels, chosen per conv by :func:`rows_kernel_pays`: *channel lanes*
    (:func:`conv2d_vnni_primfunc`, 16 output channels per ``vpdpbusd``, one broadcast pixel
    quadruple) stores each output value to its own NCHW plane, one scalar at a time; *position
    lanes* (:func:`conv2d_vnni_rows_primfunc`, 16 output positions per ``vpdpbusd``, one
    broadcast weight quadruple; strided convs read phase planes of the input) stores 16
    neighbouring outputs with one vector store. Measured on this repository's models
    (tools/tvm_bench.py): 1x1 convs 4-5x faster with position lanes (MobileNetV2-digits'
    kernels 0.108 -> 0.059 ms), ResNet-18's 7x7/2 stem 1.6 -> 0.9 ms; 3x3 convs on 7x7, 14x14
    and 28x28 maps stay faster with channel lanes (7x7: 0.53 vs 0.67 ms, 49 positions fill 64 lanes).

    Both kernels, and the matmul, are ``kOutEWiseFusable``: the requantize chain after them is fused into
    the same PrimFunc and runs inside the output-tile loop (:mod:`.vnni_epilogue`).

Bit-exactness
    ``vpdpbusd`` accumulates u8·s8 products in int32 without intermediate saturation, so
    results equal numpy's int32 reference (TVM's ``dot_16x4_avx512`` fallback, built on
    ``vpmaddubsw``, saturates to int16 and is *not* used here).

LLVM note
    LLVM ≥ 22 changed ``llvm.x86.avx512.vpdpbusd.512`` to take ``<64 x i8>`` operands;
    TVM 0.27's registered ``dot_16x4_vnni`` still passes ``<16 x i32>`` and fails LLVM
    module verification. This module registers its own intrinsic and picks the operand
    form by probing the bundled LLVM once.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import tvm
from tvm import relax, te, tirx
from tvm.s_tir import Schedule, TensorIntrin
from tvm.script import tirx as T
from tvm.target import codegen

logger = logging.getLogger(__name__)

__all__ = [
    "VNNI_INTRIN",
    "ConvTile",
    "RowsGeometry",
    "RowsTile",
    "conv2d_vnni_rows_primfunc",
    "pack_conv2d_rows_weight",
    "MatmulTile",
    "conv2d_vnni_primfunc",
    "host_mcpu",
    "matmul_vnni_primfunc",
    "pack_conv2d_weight",
    "pack_matmul_weight",
    "target_has_vnni",
    "vnni_transform",
]

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
# the certified-erf rebuild (schedule.py) applies
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


def pack_matmul_weight(w: np.ndarray) -> np.ndarray:
    """int8 ``[K, N]`` → ``[ceil(N/16), ceil(K/4), 16, 4]``, zero padded."""
    k, n = w.shape
    nb, k4 = -(-n // _LANES), -(-k // _RED)
    padded = np.zeros((nb * _LANES, k4 * _RED), dtype=np.int8)
    padded[:n, :k] = w.T
    return np.ascontiguousarray(padded.reshape(nb, _LANES, k4, _RED).transpose(0, 2, 1, 3))


def pack_conv2d_weight(w: np.ndarray) -> np.ndarray:
    """int8 OIHW ``[O, C, KH, KW]`` → ``[ceil(O/16), ceil(C/4), KH, KW, 16, 4]``, zero padded."""
    o, c, kh, kw = w.shape
    ob, c4 = -(-o // _LANES), -(-c // _RED)
    padded = np.zeros((ob * _LANES, c4 * _RED, kh, kw), dtype=np.int8)
    padded[:o, :c] = w
    blocked = padded.reshape(ob, _LANES, c4, _RED, kh, kw)
    return np.ascontiguousarray(blocked.transpose(0, 2, 4, 5, 1, 3))


# --------------------------------------------------------------------------- tile choice


@dataclass(frozen=True)
class MatmulTile:
    """Register tile: ``rows`` activation rows × ``col_blocks`` blocks of 16 outputs."""

    rows: int
    col_blocks: int


@dataclass(frozen=True)
class ConvTile:
    """Register tile: ``oc_blocks`` blocks of 16 output channels × ``ow`` output pixels."""

    oc_blocks: int
    ow: int


def _matmul_tile(m: int, nb: int) -> MatmulTile:
    col_blocks = next(c for c in (4, 3, 2, 1) if nb % c == 0)  # never pads N blocks
    best: tuple[float, int] | None = None
    for rows in range(1, min(m, _ACC_BUDGET // col_blocks) + 1):
        tiles = -(-m // rows)
        # vpdpbusd + weight loads + broadcasts, per row tile
        cost = tiles * (rows * col_blocks + col_blocks + rows)
        if best is None or cost < best[0] or (cost == best[0] and rows > best[1]):
            best = (cost, rows)
    assert best is not None
    return MatmulTile(rows=best[1], col_blocks=col_blocks)


def _conv_tile(ow: int, ob: int) -> ConvTile:
    oc_blocks = 2 if ob % 2 == 0 else 1
    best: tuple[float, int] | None = None
    for w in range(1, min(ow, _ACC_BUDGET // oc_blocks) + 1):
        tiles = -(-ow // w)
        cost = tiles * (w * oc_blocks + oc_blocks + w)
        if best is None or cost < best[0] or (cost == best[0] and w > best[1]):
            best = (cost, w)
    assert best is not None
    return ConvTile(oc_blocks=oc_blocks, ow=best[1])


# --------------------------------------------------------------------------- kernels


def vector_rows(sch: Schedule, loop, extent: int, lanes: int = _LANES) -> None:
    """Vectorize an output row: ``lanes``-wide pieces where ``lanes`` divides it, the whole row as one vector up
    to ``4 * lanes`` (LLVM splits it into registers), else left to LLVM's loop vectorizer."""
    if extent % lanes == 0 and extent > lanes:
        sch.vectorize(sch.split(loop, [None, lanes])[1])
    elif 1 < extent <= 4 * lanes:
        sch.vectorize(loop)


def _i64(*dims: int) -> tuple:
    """An output shape as Relax's legalized ops write it (int64 extents), so FuseTIR can fuse epilogues."""
    return tuple(tirx.IntImm("int64", int(d)) for d in dims)


def _finish(sch: Schedule) -> tirx.PrimFunc:
    # no global_symbol: the Relax module (AttachGlobalSymbol) names it when it is added
    func = sch.mod["main"].without_attr("global_symbol")
    return func.with_attr("tirx.is_scheduled", True).with_attr("op_pattern", _OP_PATTERN_OUT_ELEMWISE)


def matmul_vnni_primfunc(
    m: int, k: int, n: int, tile: MatmulTile | None = None, parallel: bool = True,
    rows_shape: Sequence[int] | None = None,
) -> tirx.PrimFunc:
    """Scheduled PrimFunc ``(A: u8[m, k], Wp: i8[packed], out: i32[*rows_shape, n])``.

    ``Wp`` is :func:`pack_matmul_weight` of the ``[k, n]`` weight. ``rows_shape`` (default ``(m,)``) shapes the
    ``m`` output rows, e.g. ``(1, 128)`` for a ``[1, 128, k]`` activation, so that no reshape separates the kernel
    from its epilogue; at most one of its dims may exceed 1.
    """
    intrin = _ensure_intrin()
    k4, nb = -(-k // _RED), -(-n // _LANES)
    tile = tile or _matmul_tile(m, nb)
    if nb % tile.col_blocks:
        raise ValueError(f"col_blocks={tile.col_blocks} must divide ceil(n/16)={nb}")
    m_pad = -(-m // tile.rows) * tile.rows
    a = te.placeholder((m, k), "uint8", name="A")
    w = te.placeholder((nb, k4, _LANES, _RED), "int8", name="Wp")
    a_in = a
    if m_pad != m or k4 * _RED != k:
        a_in = te.compute(
            (m_pad, k4 * _RED),
            lambda i, j: tirx.if_then_else(
                tirx.all(i < m, j < k), a[i, j], tirx.const(0, "uint8")
            ),
            name="A_pad",
        )
    rk4 = te.reduce_axis((0, k4), "rk4")
    rki = te.reduce_axis((0, _RED), "rki")
    acc = te.compute(
        (m_pad, nb, _LANES),
        lambda i, b, l: te.sum(
            a_in[i, rk4 * _RED + rki].astype("int32") * w[b, rk4, l, rki].astype("int32"),
            axis=[rk4, rki],
        ),
        name="acc",
    )
    rows_shape = tuple(int(d) for d in rows_shape) if rows_shape is not None else (m,)
    if math.prod(rows_shape) != m or sum(d > 1 for d in rows_shape) > 1:
        raise ValueError(f"rows_shape {rows_shape} must hold {m} rows along one dim")
    row_dim = next((a for a, d in enumerate(rows_shape) if d > 1), 0)

    def _out(*idx):
        j = idx[-1]
        return acc[idx[row_dim], j // _LANES, j % _LANES]

    out = te.compute(_i64(*rows_shape, n), _out, name="out")
    sch = Schedule(te.create_prim_func([a, w, out], index_dtype_override="int64"))
    blk = sch.get_sblock("acc")
    i, b, lane, r4, ri = sch.get_loops(blk)
    io, ii = sch.split(i, [None, tile.rows])
    bo, bi = sch.split(b, [None, tile.col_blocks])
    sch.reorder(bo, io, r4, ii, bi, lane, ri)
    sch.reverse_compute_at(sch.get_sblock("out"), io)
    if parallel:  # must precede decompose_reduction/tensorize
        sch.parallel(bo)
    sch.decompose_reduction(blk, r4)
    sch.tensorize(lane, intrin)
    sch.unroll(ii)
    sch.unroll(bi)
    return _finish(sch)


def conv2d_out_hw(
    hw: Sequence[int], khw: Sequence[int], strides: Sequence[int],
    padding: Sequence[int], dilation: Sequence[int],
) -> tuple[int, int]:
    """Output (OH, OW) of a conv with ``padding = (top, left, bottom, right)``."""
    (h, w), (kh, kw), (sh, sw), (dh, dw) = hw, khw, strides, dilation
    pt, pl, pb, pr = padding
    return (h + pt + pb - dh * (kh - 1) - 1) // sh + 1, (w + pl + pr - dw * (kw - 1) - 1) // sw + 1


def conv2d_vnni_primfunc(
    data_shape: Sequence[int],
    weight_shape: Sequence[int],
    strides: Sequence[int] = (1, 1),
    padding: Sequence[int] = (0, 0, 0, 0),
    dilation: Sequence[int] = (1, 1),
    tile: ConvTile | None = None,
    parallel: bool = True,
    pad_value: int = 0,
) -> tirx.PrimFunc:
    """Scheduled PrimFunc ``(X: u8[N,C,H,W], Wp: i8[packed], out: i32[N,O,OH,OW])``.

    ``Wp`` is :func:`pack_conv2d_weight` of the OIHW weight; groups must be 1;
    ``padding`` is (top, left, bottom, right), filled with ``pad_value`` (qcompile pads with the input's zero
    point; the packing pass writes it, so no separate pad op runs).
    """
    intrin = _ensure_intrin()
    n, c, h, w = (int(v) for v in data_shape)
    o, c_w, kh, kw = (int(v) for v in weight_shape)
    if c_w != c:
        raise ValueError(f"conv2d_vnni_primfunc needs groups == 1 (C={c}, weight C={c_w})")
    (sh, sw), (dh, dw) = strides, dilation
    pt, pl = padding[0], padding[1]
    oh, ow = conv2d_out_hw((h, w), (kh, kw), strides, padding, dilation)
    c4, ob = -(-c // _RED), -(-o // _LANES)
    tile = tile or _conv_tile(ow, ob)
    if ob % tile.oc_blocks:
        raise ValueError(f"oc_blocks={tile.oc_blocks} must divide ceil(O/16)={ob}")
    ow_pad = -(-ow // tile.ow) * tile.ow
    hp = (oh - 1) * sh + (kh - 1) * dh + 1
    wp = (ow_pad - 1) * sw + (kw - 1) * dw + 1

    x = te.placeholder((n, c, h, w), "uint8", name="X")
    wt = te.placeholder((ob, c4, kh, kw, _LANES, _RED), "int8", name="Wp")
    pad_u8 = tirx.const(int(pad_value), "uint8")

    def _pack(b, q, y, z, r):  # channels beyond C meet zero weights: any value works there
        ch, yy, zz = q * _RED + r, y - pt, z - pl
        inside = tirx.all(ch < c, yy >= 0, yy < h, zz >= 0, zz < w)
        return tirx.if_then_else(inside, x[b, ch, yy, zz], pad_u8)

    xp = te.compute((n, c4, hp, wp, _RED), _pack, name="X_pack")
    rc4 = te.reduce_axis((0, c4), "rc4")
    rkh = te.reduce_axis((0, kh), "rkh")
    rkw = te.reduce_axis((0, kw), "rkw")
    rci = te.reduce_axis((0, _RED), "rci")
    acc = te.compute(
        (n, ob, oh, ow_pad, _LANES),
        lambda b, q, y, z, l: te.sum(
            xp[b, rc4, y * sh + rkh * dh, z * sw + rkw * dw, rci].astype("int32")
            * wt[q, rc4, rkh, rkw, l, rci].astype("int32"),
            axis=[rc4, rkh, rkw, rci],
        ),
        name="acc",
    )
    out = te.compute(
        _i64(n, o, oh, ow), lambda b, q, y, z: acc[b, q // _LANES, y, z, q % _LANES], name="out"
    )
    sch = Schedule(te.create_prim_func([x, wt, out], index_dtype_override="int64"))
    blk = sch.get_sblock("acc")
    b, q, y, z, lane, r4, rh, rw, ri = sch.get_loops(blk)
    qo, qi = sch.split(q, [None, tile.oc_blocks])
    zo, zi = sch.split(z, [None, tile.ow])
    sch.reorder(b, qo, y, zo, r4, rh, rw, qi, zi, lane, ri)
    sch.reverse_compute_at(sch.get_sblock("out"), zo)
    if parallel:  # must precede decompose_reduction/tensorize
        sch.parallel(sch.fuse(b, qo, y))
        pb_, pq, py, _, _ = sch.get_loops(sch.get_sblock("X_pack"))
        sch.parallel(sch.fuse(pb_, pq, py))
    sch.decompose_reduction(blk, r4)
    sch.tensorize(lane, intrin)
    sch.unroll(qi)
    sch.unroll(zi)
    return _finish(sch)


def pack_conv2d_rows_weight(w: np.ndarray, o_pad: int) -> np.ndarray:
    """int8 OIHW ``[O, C, KH, KW]`` → ``[o_pad, ceil(C/4), KH, KW, 4]``, zero padded (one broadcast quadruple per
    output channel, reduction step and tap)."""
    o, c, kh, kw = w.shape
    c4 = -(-c // _RED)
    padded = np.zeros((o_pad, c4 * _RED, kh, kw), dtype=np.int8)
    padded[:o, :c] = w
    return np.ascontiguousarray(padded.reshape(o_pad, c4, _RED, kh, kw).transpose(0, 1, 3, 4, 2))


@dataclass(frozen=True)
class RowsTile:
    """Register tile of the pixel-lane conv: ``oc`` output channels × ``px_blocks`` blocks of 16 positions."""

    oc: int
    px_blocks: int


def _rows_tile(o: int, blocks: int) -> RowsTile:
    """Minimize loads + ``vpdpbusd`` over the padded problem (position padding costs real work). The channel
    tile divides O: the output copy's channel loop then splits without a predicate, which the epilogue's
    ``reverse_compute_at`` (:mod:`.vnni_epilogue`) cannot see through."""
    best: tuple[float, RowsTile] | None = None
    for oc in (d for d in range(1, 9) if o % d == 0):
        for pb in range(1, 9):
            if oc * pb > _ACC_BUDGET:
                continue
            tiles = -(-o // oc) * -(-blocks // pb)  # padded channels and position blocks are real work
            cost = tiles * (oc * pb + oc + pb)
            if best is None or cost < best[0]:
                best = (cost, RowsTile(oc, pb))
    assert best is not None
    return best[1]


@dataclass(frozen=True)
class RowsGeometry:
    """Sizes of the pixel-lane conv: the input split into ``sh * sw`` phase planes of ``hq x wq`` (stride 1: one
    plane, the padded image), outputs computed at ``p = y * wq + x`` for ``y < oh``, ``x < wq`` (``x >= ow``
    wrapped: computed, never stored)."""

    tile: RowsTile
    o_pad: int
    oh: int
    ow: int
    hq: int
    wq: int
    blocks_pad: int  # 16-position blocks computed (a multiple of tile.px_blocks)


def conv2d_rows_geometry(data_shape: Sequence[int], weight_shape: Sequence[int], padding: Sequence[int],
                         strides: Sequence[int] = (1, 1), tile: RowsTile | None = None) -> RowsGeometry:
    """The :class:`RowsGeometry` of :func:`conv2d_vnni_rows_primfunc`."""
    _, _, h, w = (int(v) for v in data_shape)
    o, _, kh, kw = (int(v) for v in weight_shape)
    sh, sw = (int(v) for v in strides)
    hp, wp = h + padding[0] + padding[2], w + padding[1] + padding[3]
    oh, ow = (hp - kh) // sh + 1, (wp - kw) // sw + 1
    hq, wq = -(-hp // sh), -(-wp // sw)
    blocks = -(-(oh * wq) // _LANES)
    tile = tile or _rows_tile(o, blocks)
    return RowsGeometry(tile, -(-o // tile.oc) * tile.oc, oh, ow, hq, wq, -(-blocks // tile.px_blocks) * tile.px_blocks)


def rows_kernel_pays(data_shape: Sequence[int], weight_shape: Sequence[int], strides: Sequence[int],
                     padding: Sequence[int], dilation: Sequence[int]) -> bool:
    """Whether the pixel-lane kernel is the better of the two for this conv (dilation 1): a 1x1 conv (the
    channel-lane kernel's scalar scatter to NCHW costs more than its arithmetic), or no more work than the
    channel-lane kernel (``vpdpbusd`` counted with each kernel's padding and wrapped columns, plus ~1 cycle per
    store: the channel-lane kernel stores every output as a scalar). Weight size does not enter: the channel-lane
    kernel keeps one output-channel tile's weights (C/4*KH*KW*128 bytes) cached across all output rows (measured:
    3x3 512->512 on 7x7 maps 0.53 vs 0.67 ms for pixel lanes, whose 49 positions fill 64 lanes)."""
    if tuple(dilation) != (1, 1):
        return False
    o, c, kh, kw = (int(v) for v in weight_shape)
    if kh * kw == 1:
        return True
    g = conv2d_rows_geometry(data_shape, weight_shape, padding, strides)
    rows = g.o_pad * g.blocks_pad
    ob = -(-o // _LANES)
    chan_tile = _conv_tile(g.ow, ob)
    chan = ob * g.oh * -(-g.ow // chan_tile.ow) * chan_tile.ow
    taps = -(-c // _RED) * kh * kw
    return rows * taps + o * g.oh * g.wq / _LANES <= chan * taps + o * g.oh * g.ow


def conv2d_vnni_rows_primfunc(
    data_shape: Sequence[int],
    weight_shape: Sequence[int],
    padding: Sequence[int] = (0, 0, 0, 0),
    tile: RowsTile | None = None,
    parallel: bool = True,
    pad_value: int = 0,
    strides: Sequence[int] = (1, 1),
) -> tirx.PrimFunc:
    """Conv ``(X: u8[N,C,H,W], Wq: i8[packed], out: i32[N,O,OH,OW])`` with output *positions* on the vector
    lanes: ``Wq`` is :func:`pack_conv2d_rows_weight`. The accumulators hold ``OH x Wq`` positions per channel
    (see :class:`RowsGeometry`; stride 1: ``Wq`` is the padded width); each output-channel tile copies its first
    OW columns of every row to ``out`` (or, fused, runs the requantize epilogue on them: :mod:`.vnni_epilogue`).

    The input is packed once into ``[N, C/4, P, L, 4]``: phase plane ``(a, b)`` holds padded pixels
    ``(SH*i + a, SW*j + b)`` flattened row by row (stride 1: the padded image itself); only the ``P`` planes
    some tap reads are packed (``a < min(SH, KH)``, ``b < min(SW, KW)``: one for a 1x1 stride-2 conv). Output position
    ``p = y * Wq + x`` of tap (kh, kw) then reads plane ``(kh % SH, kw % SW)`` at ``p + (kh // SH) * Wq + kw // SW``:
    16 consecutive quadruples, one 64-byte load for 16 lanes, against one broadcast weight quadruple. Output
    channels are registers, not lanes, so results go to NCHW with contiguous vector stores, a row at a
    time: the channel-lane kernel (:func:`conv2d_vnni_primfunc`) scatters every value to its own output plane.
    """
    _ensure_intrin()
    n, c, h, w = (int(v) for v in data_shape)
    o, c_w, kh, kw = (int(v) for v in weight_shape)
    if c_w != c:
        raise ValueError(f"conv2d_vnni_rows_primfunc needs groups == 1 (C={c}, weight C={c_w})")
    pt, pl = int(padding[0]), int(padding[1])
    sh, sw = (int(v) for v in strides)
    g = conv2d_rows_geometry(data_shape, weight_shape, padding, strides, tile)
    tile, wq, hq = g.tile, g.wq, g.hq
    length = g.blocks_pad * _LANES + ((kh - 1) // sh) * wq + (kw - 1) // sw
    length = -(-length // wq) * wq  # whole rows: the pack's row loop splits exactly (no division per byte)
    c4 = -(-c // _RED)

    x = te.placeholder((n, c, h, w), "uint8", name="X")
    wt = te.placeholder((g.o_pad, c4, kh, kw, _RED), "int8", name="Wq")
    pad_u8 = tirx.const(int(pad_value), "uint8")

    def _pack(b, q, ph, i, r):  # channels beyond C meet zero weights; positions past the image are never stored
        ch = q * _RED + r
        yy, xx = (i // wq) * sh + ph // pw - pt, (i % wq) * sw + ph % pw - pl
        inside = tirx.all(ch < c, i < hq * wq, yy >= 0, yy < h, xx >= 0, xx < w)
        return tirx.if_then_else(inside, x[b, tirx.min(ch, c - 1), tirx.max(tirx.min(yy, h - 1), 0),
                                            tirx.max(tirx.min(xx, w - 1), 0)], pad_u8)

    # only the phases some tap reads: a 1x1 stride-2 conv reads one plane of four
    planes_h, pw = min(sh, kh), min(sw, kw)  # row and column phases read
    xp = te.compute((n, c4, planes_h * pw, length, _RED), _pack, name="X_pack")
    rc4 = te.reduce_axis((0, c4), "rc4")
    rkh = te.reduce_axis((0, kh), "rkh")
    rkw = te.reduce_axis((0, kw), "rkw")
    rci = te.reduce_axis((0, _RED), "rci")
    acc = te.compute(
        (n, g.o_pad, g.blocks_pad * _LANES),
        lambda b, q, i: te.sum(
            xp[b, rc4, (rkh % sh) * pw + rkw % sw, i + (rkh // sh) * wq + rkw // sw, rci].astype("int32")
            * wt[q, rc4, rkh, rkw, rci].astype("int32"),
            axis=[rc4, rkh, rkw, rci],
        ),
        name="acc",
    )
    out = te.compute(_i64(n, o, g.oh, g.ow), lambda b, q, y, z: acc[b, q, y * wq + z], name="out")
    sch = Schedule(te.create_prim_func([x, wt, out], index_dtype_override="int64"))
    blk = sch.get_sblock("acc")
    b, q, i, r4, rh, rw, ri = sch.get_loops(blk)
    qo, qi = sch.split(q, [None, tile.oc])
    ko, ki, lane = sch.split(i, [None, tile.px_blocks, _LANES])
    sch.reorder(b, qo, ko, r4, rh, rw, qi, ki, lane, ri)
    # each output-channel tile copies its accumulators out (reverse_compute_at cannot invert `y * wq + z`): the
    # copy's own channel-tile loop merged with the accumulation's
    ob, oq, _, oz = sch.get_loops(sch.get_sblock("out"))
    oqo, _ = sch.split(oq, [None, tile.oc])
    tile_loop = sch.merge(sch.fuse(b, qo), sch.fuse(ob, oqo))
    # the pack walks the flat plane row by row: `i // wq`, `i % wq` simplify away (a division per byte cost
    # 80 us of ResNet-18's 56x56 convs), and the channel quadruple is unrolled
    pb, pq, pph, pi, pr = sch.get_loops(sch.get_sblock("X_pack"))
    prow, _ = sch.split(pi, [None, wq])
    sch.unroll(pr)
    if parallel:  # must precede decompose_reduction/tensorize
        sch.parallel(tile_loop)
        # every (channel quadruple, phase plane, row) is a task: a 3-channel stem has one quadruple
        sch.parallel(sch.fuse(pb, pq, pph, prow))
    sch.decompose_reduction(blk, r4)
    sch.tensorize(lane, VNNI_ROWS_INTRIN)
    sch.unroll(qi)
    sch.unroll(ki)
    vector_rows(sch, oz, g.ow)
    return _finish(sch)


# --------------------------------------------------------------------------- relax rewrite


def _static_shape(expr: relax.Expr) -> tuple[int, ...] | None:
    ty = expr.ty
    if not isinstance(ty, relax.TensorType) or ty.shape is None:
        return None
    dims = []
    for d in ty.shape:
        if not isinstance(d, tirx.IntImm):
            return None
        dims.append(int(d))
    return tuple(dims)


def _dtype(expr: relax.Expr) -> str:
    ty = expr.ty
    return str(ty.dtype) if isinstance(ty, relax.TensorType) else ""


def _ints(values: Sequence[object]) -> tuple[int, ...]:
    return tuple(int(v) for v in values)


@relax.expr_functor.mutator
class _VNNIRewriter(relax.PyExprMutator):
    """Replaces matching conv2d / matmul calls by ``call_tir`` of VNNI kernels."""

    def __init__(self, mod: tvm.IRModule, parallel: bool) -> None:
        super().__init__(mod)
        self._parallel = parallel
        self._conv2d = tvm.ir.Op.get("relax.nn.conv2d")
        self._matmul = tvm.ir.Op.get("relax.matmul")
        self._pad = tvm.ir.Op.get("relax.nn.pad")
        self._max_pool = tvm.ir.Op.get("relax.nn.max_pool2d")
        self._kernels: dict[tuple, relax.GlobalVar] = {}
        self._fusable = True
        self.erf_chains: set = set()  # conv2d / matmul calls whose elementwise consumers compute an erf
        self.rewritten = 0
        self.declined: list[str] = []  # int32-accumulating conv2d / matmul left to the generic schedules

    # ---- helpers
    def _const_weight(self, expr: relax.Expr) -> np.ndarray | None:
        while isinstance(expr, relax.Var):
            bound = self.lookup_binding(expr)
            if bound is None:
                return None
            expr = bound
        if isinstance(expr, tvm.ir.expr.Constant) and _dtype(expr) == "int8":
            return expr.value.numpy()
        return None

    def _kernel(self, key: tuple, make: object, name: str) -> relax.GlobalVar:
        key = (*key, self._fusable)
        if key not in self._kernels:
            func = make()  # type: ignore[operator]
            if not self._fusable:
                func = func.with_attr("op_pattern", _OP_PATTERN_OPAQUE)
            self._kernels[key] = self.builder_.add_func(func, name)
        return self._kernels[key]

    # ---- ops
    def _rewrite_conv2d(self, call: relax.Call) -> relax.Expr | None:
        attrs = call.attrs
        data, weight = call.args
        if (
            int(attrs.groups) != 1
            or str(attrs.data_layout) != "NCHW"
            or str(attrs.kernel_layout) != "OIHW"
            or str(attrs.out_layout) != "NCHW"
            or str(attrs.out_dtype) != "int32"
            or _dtype(data) != "uint8"
        ):
            return None
        strides, dilation, padding = _ints(attrs.strides), _ints(attrs.dilation), _ints(attrs.padding)
        pad_value = 0
        folded = self._spatial_pad(data) if not any(padding) else None
        if folded is not None:  # conv2d(pad(x, z)) -> one kernel whose packing pass pads with z
            data, padding, pad_value = folded
        dshape, w = _static_shape(data), self._const_weight(weight)
        if dshape is None or w is None or len(dshape) != 4 or w.ndim != 4 or w.shape[1] != dshape[1]:
            return None
        oh, ow = conv2d_out_hw(dshape[2:], w.shape[2:], strides, padding, dilation)
        if oh <= 0 or ow <= 0:
            return None
        if rows_kernel_pays(dshape, w.shape, strides, padding, dilation):
            return self._rows_conv2d(data, w, dshape, strides, padding, pad_value)
        key = ("conv2d", dshape, w.shape, strides, padding, dilation, pad_value)
        gvar = self._kernel(
            key,
            lambda: conv2d_vnni_primfunc(dshape, w.shape, strides, padding, dilation,
                                         parallel=self._parallel, pad_value=pad_value),
            "qc_vnni_conv2d",
        )
        packed = relax.const(pack_conv2d_weight(w))
        out_ty = relax.TensorType((dshape[0], w.shape[0], oh, ow), "int32")
        logger.debug("vnni conv2d %s x %s -> %s", dshape, w.shape, (oh, ow))
        return relax.call_tir(gvar, [data, packed], out_ty)

    def _rows_conv2d(self, data: relax.Expr, w: np.ndarray, dshape: tuple[int, ...], strides: tuple[int, ...],
                     padding: tuple[int, ...], pad_value: int) -> relax.Expr:
        """The pixel-lane kernel (it writes NCHW itself, wrapped columns dropped)."""
        g = conv2d_rows_geometry(dshape, w.shape, padding, strides)
        key = ("conv2d_rows", dshape, w.shape, strides, padding, pad_value)
        gvar = self._kernel(key, lambda: conv2d_vnni_rows_primfunc(dshape, w.shape, padding, tile=g.tile,
                                                                   parallel=self._parallel, pad_value=pad_value,
                                                                   strides=strides),
                            "qc_vnni_conv2d_rows")
        n, o = dshape[0], w.shape[0]
        logger.debug("vnni conv2d rows %s x %s /%s -> %s", dshape, w.shape, strides, (g.oh, g.ow))
        return relax.call_tir(gvar, [data, relax.const(pack_conv2d_rows_weight(w, g.o_pad))],
                              relax.TensorType((n, o, g.oh, g.ow), "int32"))

    def _spatial_pad(self, data: relax.Expr) -> tuple[relax.Expr, tuple[int, ...], int] | None:
        """``data`` bound to a constant-mode ``R.nn.pad`` of H/W only: (its input, conv padding, pad value)."""
        bound = self.lookup_binding(data) if isinstance(data, relax.Var) else None
        if not isinstance(bound, relax.Call) or not bound.op.same_as(self._pad):
            return None
        pw = _ints(bound.attrs.pad_width)
        value = float(bound.attrs.pad_value)
        if str(bound.attrs.pad_mode) != "constant" or len(pw) != 8 or any(pw[:4]) or not value.is_integer() \
                or not 0 <= value <= 255 or _dtype(bound.args[0]) != "uint8":
            return None
        return bound.args[0], (pw[4], pw[6], pw[5], pw[7]), int(value)

    def _rewrite_matmul(self, call: relax.Call) -> relax.Expr | None:
        data, weight = call.args
        if str(call.attrs.out_dtype) != "int32" or _dtype(data) != "uint8":
            return None
        dshape, w = _static_shape(data), self._const_weight(weight)
        if dshape is None or w is None or w.ndim != 2 or len(dshape) < 2 or dshape[-1] != w.shape[0]:
            return None
        k, n = w.shape
        m = math.prod(dshape[:-1])
        rows = tuple(dshape[:-1]) if sum(d > 1 for d in dshape[:-1]) <= 1 else (m,)
        key = ("matmul", rows, k, n)
        gvar = self._kernel(
            key, lambda: matmul_vnni_primfunc(m, k, n, parallel=self._parallel, rows_shape=rows), "qc_vnni_matmul"
        )
        flat = data if len(dshape) == 2 else self.builder_.emit(relax.op.reshape(data, (m, k)))
        # the kernel writes the activation's shape where it can: no reshape between it and its epilogue
        out = relax.call_tir(gvar, [flat, relax.const(pack_matmul_weight(w))], relax.TensorType((*rows, n), "int32"))
        if len(rows) == len(dshape) - 1:
            return out
        return relax.op.reshape(self.builder_.emit(out), (*dshape[:-1], n))

    def _rewrite_max_pool(self, call: relax.Call) -> relax.Expr | None:
        """An integer NCHW max pool (dilation 1, floor mode) -> the two-pass kernel of :mod:`.pool`."""
        from qcompile.targets.tvm.pool import POOL_DTYPES, max_pool2d_primfunc

        a = call.attrs
        data = call.args[0]
        dshape, dtype = _static_shape(data), _dtype(data)
        if (dshape is None or len(dshape) != 4 or dtype not in POOL_DTYPES or str(a.layout) != "NCHW"
                or str(a.out_layout) != "NCHW" or bool(a.ceil_mode) or _ints(a.dilation) != (1, 1)):
            return None
        size, strides, padding = _ints(a.pool_size), _ints(a.strides), _ints(a.padding)
        key = ("max_pool2d", dshape, dtype, size, strides, padding)
        gvar = self._kernel(key, lambda: max_pool2d_primfunc(dshape, dtype, size, strides, padding,
                                                             parallel=self._parallel)
                            .with_attr("op_pattern", _OP_PATTERN_OPAQUE), "qc_max_pool2d")
        return relax.call_tir(gvar, [data], call.ty)

    def visit_call_(self, call: relax.Call) -> relax.Expr:  # noqa: D102 - visitor hook
        self._fusable = call not in self.erf_chains
        call = super().visit_call_(call)
        new: relax.Expr | None = None
        if call.op.same_as(self._max_pool):
            pooled = self._rewrite_max_pool(call)
            return call if pooled is None else pooled
        if call.op.same_as(self._conv2d):
            new = self._rewrite_conv2d(call)
        elif call.op.same_as(self._matmul):
            new = self._rewrite_matmul(call)
        if new is None:
            if (call.op.same_as(self._conv2d) or call.op.same_as(self._matmul)) \
                    and str(call.attrs.out_dtype) == "int32":
                self.declined.append(_describe(call))
            return call
        self.rewritten += 1
        return new


# Relax ops that legalize to elementwise / broadcast kernels: the chain FuseOps fuses into a kOutEWiseFusable one
_ELEMENTWISE = frozenset(f"relax.{n}" for n in (
    "astype", "add", "subtract", "multiply", "divide", "floor_divide", "right_shift", "left_shift", "clip",
    "maximum", "minimum", "less", "less_equal", "greater", "greater_equal", "equal", "not_equal", "where",
    "round", "floor", "ceil", "erf", "exp", "tanh", "sigmoid", "nn.relu", "nn.gelu", "nn.silu", "power",
    "sqrt", "rsqrt", "negative", "abs", "log", "bitwise_and", "bitwise_or"))
_ERF = ("relax.erf", "relax.nn.gelu")


def _erf_chain_calls(func: relax.Function) -> set:
    """The conv2d / matmul calls of ``func`` whose elementwise consumers (the chain ``FuseOps`` would fuse into
    the kernel, followed up to :data:`_CHAIN_DEPTH` ops) compute an erf."""
    ops = (tvm.ir.Op.get("relax.nn.conv2d"), tvm.ir.Op.get("relax.matmul"))
    bindings = [b for blk in func.body.blocks for b in blk.bindings if isinstance(b, relax.VarBinding)]
    users: dict = {}
    for b in bindings:
        for v in relax.analysis.free_vars(b.value):
            users.setdefault(v, []).append(b)
    found = set()
    for b in bindings:
        call = b.value
        if not (isinstance(call, relax.Call) and any(call.op.same_as(op) for op in ops)):
            continue
        frontier, seen = [b.var], 0
        while frontier and seen < _CHAIN_DEPTH and call not in found:
            nxt = []
            for user in (u for v in frontier for u in users.get(v, [])):
                seen += 1
                op = getattr(user.value, "op", None)
                name = str(getattr(op, "name", ""))
                if name in _ERF:
                    found.add(call)
                elif name in _ELEMENTWISE:
                    nxt.append(user.var)
            frontier = nxt
    return found


def _describe(call: relax.Call) -> str:
    """One line for an integer conv2d / matmul the VNNI rewrite left alone: op, operand shapes, why it differs."""
    shapes = [_static_shape(a) for a in call.args]
    what = f"{call.op.name.split('.')[-1]} {' x '.join(str(list(s)) if s else '?' for s in shapes)}"
    if "conv2d" in call.op.name and int(call.attrs.groups) != 1:
        what += f" groups={int(call.attrs.groups)}"
    if _dtype(call.args[0]) != "uint8":
        what += f" ({_dtype(call.args[0])} data)"
    return what


def vnni_transform(
    mod: tvm.IRModule, target: tvm.target.Target, parallel: bool = True, stats: dict | None = None
) -> tvm.IRModule:
    """Rewrite u8×s8→i32 conv2d (groups=1) / matmul with constant weights to VNNI kernels.

    Call on the Relax module before ``tvm.compile`` / ``relax.build`` (i.e. before
    ``LegalizeOps``). Returns ``mod`` unchanged when ``target`` lacks AVX512-VNNI.
    ``parallel`` marks the outer kernel loops parallel (thread count is then set at run
    time by ``TVM_NUM_THREADS``). ``stats`` (if given) receives ``rewritten`` (count) and ``declined`` (one line
    per integer conv2d / matmul left to the generic schedules).
    """
    if not target_has_vnni(target):
        logger.info("target %s has no avx512vnni; vnni_transform is a no-op", target)
        if stats is not None:
            stats.update(rewritten=0, declined=["the target has no avx512vnni"])
        return mod
    rewriter = _VNNIRewriter(mod, parallel)
    counts: dict[str, tuple[int, list[str]]] = {}
    for gvar, func in list(mod.functions_items()):
        if isinstance(func, relax.Function):
            rewriter.rewritten, rewriter.declined = 0, []
            rewriter.erf_chains = _erf_chain_calls(func)
            rewriter.builder_.update_func(gvar, rewriter.visit_expr(func))
            counts[gvar.name_hint] = (rewriter.rewritten, rewriter.declined)
    new_mod = relax.transform.DeadCodeElimination()(rewriter.builder_.get())
    rewritten, declined = counts.get("main", next(iter(counts.values()), (0, [])))  # `probe` repeats `main`
    logger.info("vnni_transform: %d op(s) rewritten, %d integer op(s) left to generic schedules", rewritten,
                len(declined))
    if stats is not None:
        stats.update(rewritten=rewritten, declined=declined)
    return new_mod
