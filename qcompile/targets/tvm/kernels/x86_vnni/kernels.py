"""VNNI matmul and conv2d PrimFuncs: weights pre-packed to the intrinsic's [N/16, K/4, 16, 4] form, register tiles
chosen from the output shape, the reduction tensorized."""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from tvm import te, tirx
from tvm.s_tir import Schedule

from qcompile.targets.tvm.kernels.x86_vnni.intrin import (
    _ACC_BUDGET,
    _LANES,
    _OP_PATTERN_OUT_ELEMWISE,
    VNNI,
    DotIsa,
)


def pack_matmul_weight(w: np.ndarray, isa: DotIsa = VNNI) -> np.ndarray:
    """int8 ``[K, N]`` → ``[ceil(N/16), ceil(K/4), 16, 4]``, zero padded."""
    k, n = w.shape
    nb, k4 = -(-n // isa.lanes), -(-k // isa.red)
    padded = np.zeros((nb * isa.lanes, k4 * isa.red), dtype=np.int8)
    padded[:n, :k] = w.T
    return np.ascontiguousarray(padded.reshape(nb, isa.lanes, k4, isa.red).transpose(0, 2, 1, 3))


def pack_conv2d_weight(w: np.ndarray, isa: DotIsa = VNNI) -> np.ndarray:
    """int8 OIHW ``[O, C, KH, KW]`` → ``[ceil(O/16), ceil(C/4), KH, KW, 16, 4]``, zero padded."""
    o, c, kh, kw = w.shape
    ob, c4 = -(-o // isa.lanes), -(-c // isa.red)
    padded = np.zeros((ob * isa.lanes, c4 * isa.red, kh, kw), dtype=np.int8)
    padded[:o, :c] = w
    blocked = padded.reshape(ob, isa.lanes, c4, isa.red, kh, kw)
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


def _matmul_tile(m: int, nb: int, budget: int = _ACC_BUDGET) -> MatmulTile:
    col_blocks = next(c for c in (4, 3, 2, 1) if nb % c == 0)  # never pads N blocks
    best: tuple[float, int] | None = None
    for rows in range(1, min(m, budget // col_blocks) + 1):
        tiles = -(-m // rows)
        # vpdpbusd + weight loads + broadcasts, per row tile
        cost = tiles * (rows * col_blocks + col_blocks + rows)
        if best is None or cost < best[0] or (cost == best[0] and rows > best[1]):
            best = (cost, rows)
    assert best is not None
    return MatmulTile(rows=best[1], col_blocks=col_blocks)


def _conv_tile(ow: int, ob: int, budget: int = _ACC_BUDGET) -> ConvTile:
    oc_blocks = 2 if ob % 2 == 0 else 1
    best: tuple[float, int] | None = None
    for w in range(1, min(ow, budget // oc_blocks) + 1):
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
    rows_shape: Sequence[int] | None = None, isa: DotIsa = VNNI,
) -> tirx.PrimFunc:
    """Scheduled PrimFunc ``(A: u8[m, k], Wp: i8[packed], out: i32[*rows_shape, n])``.

    ``Wp`` is :func:`pack_matmul_weight` of the ``[k, n]`` weight. ``rows_shape`` (default ``(m,)``) shapes the
    ``m`` output rows, e.g. ``(1, 128)`` for a ``[1, 128, k]`` activation, so that no reshape separates the kernel
    from its epilogue; at most one of its dims may exceed 1.
    """
    intrin = isa.intrin()
    k4, nb = -(-k // isa.red), -(-n // isa.lanes)
    tile = tile or _matmul_tile(m, nb, isa.acc_budget)
    if nb % tile.col_blocks:
        raise ValueError(f"col_blocks={tile.col_blocks} must divide ceil(n/16)={nb}")
    m_pad = -(-m // tile.rows) * tile.rows
    a = te.placeholder((m, k), "uint8", name="A")
    w = te.placeholder((nb, k4, isa.lanes, isa.red), "int8", name="Wp")
    a_in = a
    if m_pad != m or k4 * isa.red != k:
        a_in = te.compute(
            (m_pad, k4 * isa.red),
            lambda i, j: tirx.if_then_else(
                tirx.all(i < m, j < k), a[i, j], tirx.const(0, "uint8")
            ),
            name="A_pad",
        )
    rk4 = te.reduce_axis((0, k4), "rk4")
    rki = te.reduce_axis((0, isa.red), "rki")
    acc = te.compute(
        (m_pad, nb, isa.lanes),
        lambda i, b, l: te.sum(
            a_in[i, rk4 * isa.red + rki].astype("int32") * w[b, rk4, l, rki].astype("int32"),
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
        return acc[idx[row_dim], j // isa.lanes, j % isa.lanes]

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
    isa: DotIsa = VNNI,
) -> tirx.PrimFunc:
    """Scheduled PrimFunc ``(X: u8[N,C,H,W], Wp: i8[packed], out: i32[N,O,OH,OW])``.

    ``Wp`` is :func:`pack_conv2d_weight` of the OIHW weight; groups must be 1;
    ``padding`` is (top, left, bottom, right), filled with ``pad_value`` (qcompile pads with the input's zero
    point; the packing pass writes it, so no separate pad op runs).
    """
    intrin = isa.intrin()
    n, c, h, w = (int(v) for v in data_shape)
    o, c_w, kh, kw = (int(v) for v in weight_shape)
    if c_w != c:
        raise ValueError(f"conv2d_vnni_primfunc needs groups == 1 (C={c}, weight C={c_w})")
    (sh, sw), (dh, dw) = strides, dilation
    pt, pl = padding[0], padding[1]
    oh, ow = conv2d_out_hw((h, w), (kh, kw), strides, padding, dilation)
    c4, ob = -(-c // isa.red), -(-o // isa.lanes)
    tile = tile or _conv_tile(ow, ob, isa.acc_budget)
    if ob % tile.oc_blocks:
        raise ValueError(f"oc_blocks={tile.oc_blocks} must divide ceil(O/16)={ob}")
    ow_pad = -(-ow // tile.ow) * tile.ow
    hp = (oh - 1) * sh + (kh - 1) * dh + 1
    wp = (ow_pad - 1) * sw + (kw - 1) * dw + 1

    x = te.placeholder((n, c, h, w), "uint8", name="X")
    wt = te.placeholder((ob, c4, kh, kw, isa.lanes, isa.red), "int8", name="Wp")
    pad_u8 = tirx.const(int(pad_value), "uint8")

    def _pack(b, q, y, z, r):  # channels beyond C meet zero weights: any value works there
        ch, yy, zz = q * isa.red + r, y - pt, z - pl
        inside = tirx.all(ch < c, yy >= 0, yy < h, zz >= 0, zz < w)
        return tirx.if_then_else(inside, x[b, ch, yy, zz], pad_u8)

    xp = te.compute((n, c4, hp, wp, isa.red), _pack, name="X_pack")
    rc4 = te.reduce_axis((0, c4), "rc4")
    rkh = te.reduce_axis((0, kh), "rkh")
    rkw = te.reduce_axis((0, kw), "rkw")
    rci = te.reduce_axis((0, isa.red), "rci")
    acc = te.compute(
        (n, ob, oh, ow_pad, isa.lanes),
        lambda b, q, y, z, l: te.sum(
            xp[b, rc4, y * sh + rkh * dh, z * sw + rkw * dw, rci].astype("int32")
            * wt[q, rc4, rkh, rkw, l, rci].astype("int32"),
            axis=[rc4, rkh, rkw, rci],
        ),
        name="acc",
    )
    out = te.compute(
        _i64(n, o, oh, ow), lambda b, q, y, z: acc[b, q // isa.lanes, y, z, q % isa.lanes], name="out"
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
