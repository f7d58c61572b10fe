"""The row-packed VNNI conv2d: input rows packed once per phase plane so a strided or small-channel conv reads
contiguous bytes; chosen over the channel-lane kernel where it pays (:func:`rows_kernel_pays`)."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from tvm import te, tirx
from tvm.s_tir import Schedule

from qcompile.targets.tvm.kernels.x86_vnni.intrin import (
    _ACC_BUDGET,
    _LANES,
    _RED,
    VNNI_ROWS_INTRIN,
    _ensure_intrin,
)
from qcompile.targets.tvm.kernels.x86_vnni.kernels import (
    _conv_tile,
    _finish,
    _i64,
    vector_rows,
)


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
    ``reverse_compute_at`` (:mod:`~..x86_epilogue`) cannot see through."""
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
    OW columns of every row to ``out`` (or, fused, runs the requantize epilogue on them: :mod:`~..x86_epilogue`).

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
