"""Integer max pooling (NCHW, dilation 1) as two passes over each plane: rows, then columns.

TVM's legalized ``max_pool2d`` reads the whole ``KH x KW`` window per output; with a stride the reads are strided
gathers, and the :class:`~..schedules.rules.Epilogue` rule could only move a row of outputs innermost (ResNet-18's 3x3/2
pool on 64 x 112 x 112: 0.23 ms on one thread, ONNX Runtime's NHWC pool 0.09 ms). Max is separable: each plane
first takes the max of ``KH`` padded input rows per output row (contiguous rows, vector code), then the max of
``KW`` neighbours per output column of that one row (strided, but within a row in L1). The padding never wins a
max: it is the dtype's minimum. The plane is the unit of work: planes run in parallel where threads exist.
"""
from __future__ import annotations

from collections.abc import Sequence

from tvm import te, tirx
from tvm.s_tir import Schedule

POOL_DTYPES = ("uint8", "int8")


def max_pool2d_primfunc(data_shape: Sequence[int], dtype: str, pool_size: Sequence[int], strides: Sequence[int],
                        padding: Sequence[int], parallel: bool = True) -> tirx.PrimFunc:
    """Scheduled PrimFunc ``(X: dtype[N,C,H,W], out: dtype[N,C,OH,OW])``, ``padding = (top, left, bottom, right)``
    (floor mode: the output sizes ``max_pool2d`` gives with ``ceil_mode=False``)."""
    if dtype not in POOL_DTYPES:
        raise ValueError(f"max_pool2d_primfunc: {dtype} (integer pools only: {POOL_DTYPES})")
    n, c, h, w = (int(v) for v in data_shape)
    kh, kw = (int(v) for v in pool_size)
    sh, sw = (int(v) for v in strides)
    pt, pl, pb, pr = (int(v) for v in padding)
    oh, ow = (h + pt + pb - kh) // sh + 1, (w + pl + pr - kw) // sw + 1
    wp = (ow - 1) * sw + kw  # the padded columns the outputs read
    lowest = tirx.min_value(dtype)
    x = te.placeholder((n, c, h, w), dtype, name="X")
    rkh = te.reduce_axis((0, kh), "rkh")

    def _rows(b, q, y, xx):  # max over the window's rows, for every padded column
        yy, col = y * sh + rkh - pt, xx - pl
        inside = tirx.all(yy >= 0, yy < h, col >= 0, col < w)
        return te.max(tirx.if_then_else(inside, x[b, q, tirx.max(tirx.min(yy, h - 1), 0),
                                                  tirx.max(tirx.min(col, w - 1), 0)], lowest), axis=rkh)

    rows = te.compute((n, c, oh, wp), _rows, name="pool_rows")
    rkw = te.reduce_axis((0, kw), "rkw")
    out = te.compute((n, c, oh, ow), lambda b, q, y, xo: te.max(rows[b, q, y, xo * sw + rkw], axis=rkw),
                     name="pool")
    sch = Schedule(te.create_prim_func([x, out], index_dtype_override="int64"))
    pool = sch.get_sblock("pool")
    b, q, y, xo, r = sch.get_loops(pool)
    plane = sch.fuse(b, q)
    sch.compute_at(sch.get_sblock("pool_rows"), y)  # one row of row-maxima per output row, in L1
    sch.unroll(sch.get_loops(sch.get_sblock("pool_rows"))[-1])  # the window's rows: KH loads per column
    if parallel:
        sch.parallel(plane)
    # the window's columns unrolled inside the row loop: LLVM sees r[s*x], r[s*x + 1], ... in one body, an
    # interleaved group it loads with whole vectors and shuffles (a loop per column would gather)
    sch.unroll(r)
    func = sch.mod["main"].without_attr("global_symbol")
    return func.with_attr("tirx.is_scheduled", True)


__all__ = ["POOL_DTYPES", "max_pool2d_primfunc"]
