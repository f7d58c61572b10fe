"""Matching a fused int8 conv2d / matmul kernel (``epilogue(sum u8(A) * s8(W))``) and rebuilding it on the DSP
intrinsics: weights repacked at compile time, a register tile of 2 channels x 2 pixels, the epilogue grafted after."""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import tvm
import tvm_ffi
from tvm import s_tir, te, tirx
from tvm.s_tir import dlight as dl

from qcompile.targets.tvm.kernels.arm_dsp.intrin import (
    _RED,
    INTERLEAVE,
    MAX_COL_BYTES,
    TILE_F,
    TILE_P,
    _ensure_intrin,
    _perm,
)
from qcompile.targets.tvm.schedules.compute_at import reverse_compute_at_whole

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------ match
@dataclass(frozen=True)
class _Pattern:
    """A fused kernel ``out = epilogue(Σ_R cast(A(P, R)) · cast(W(F, R)))`` after inlining (:func:`_pattern`)."""

    func: tirx.PrimFunc  # normalized, injective blocks inlined
    red: s_tir.SBlock
    epi: s_tir.SBlock
    acc: tirx.Buffer
    act: tirx.PrimExpr  # the uint8 activation operand (reads params only)
    weight: tirx.Buffer  # the int8 param
    w_index: tuple  # W's indices: IntImm or iter var
    spatial: tuple  # S iter vars, block order
    reduce: tuple  # R iter vars
    f_var: tirx.Var  # the one spatial var W depends on (output channel / column)
    p_vars: tuple  # spatial vars A depends on, block order


_Load = tvm.ir.expr.TensorLoad  # a buffer read (``source`` is the buffer, itself a Var)


def _dtype(e: tirx.PrimExpr) -> str:
    return str(e.ty.dtype)


def _strip_cast(e: tirx.PrimExpr, dtype: str) -> tirx.PrimExpr | None:
    if isinstance(e, tirx.Cast) and _dtype(e) == "int32" and _dtype(e.value) == dtype:
        return e.value
    return None


def _loads(e: object) -> list:
    found: list = []
    tvm_ffi.structural_walk(e, [(_Load, found.append)])
    return found


def _vars(e: object) -> list:
    found: list = []
    tvm_ffi.structural_walk(e, [(tirx.Var, found.append)])
    return found


def _is_zero(e: object) -> bool:
    return isinstance(e, tirx.IntImm) and e.value == 0


def _index_vars(indices) -> list | None:
    """The iter vars of an access whose every index is one var or the constant 0 (unit dims); else None."""
    out = []
    for i in indices:
        if isinstance(i, tirx.Var):
            out.append(i)
        elif not _is_zero(i):
            return None
    return None if _dups(out) else out


def _dups(vs: list) -> bool:
    return any(a.same_as(b) for k, a in enumerate(vs) for b in vs[k + 1:])


def _has(vs, v) -> bool:
    return any(v.same_as(x) for x in vs)


def _pattern(func: tirx.PrimFunc) -> _Pattern | None:
    """Match ``out = epilogue(Σ_R cast(A(P, R)) · cast(W[F, R]))`` with one output-channel var F that W and not A
    depends on (conv2d with groups=1, matmul); ``None`` for anything else (depthwise conv: A depends on F too)."""
    sch = s_tir.Schedule(func)
    infos = dl.normalize_prim_func(sch)
    if infos is None:
        return None
    rest = dl.try_inline(sch, list(infos))
    if len(rest) != 2 or rest[0].is_injective() or not rest[1].is_injective():
        return None
    func = sch.mod["main"]
    red, epi = sch.get(rest[0].block_rv), sch.get(rest[1].block_rv)
    params = list(func.params)
    store, init = red.body, red.init
    if not isinstance(store, tirx.BufferStore) or str(store.buffer.dtype) != "int32" \
            or not isinstance(init, tirx.BufferStore) or not _is_zero(init.value):
        return None
    acc, val = store.buffer, store.value
    if _has(params, acc) or not isinstance(val, tirx.Add) or not isinstance(val.a, _Load) \
            or not val.a.source.same_as(acc) or not isinstance(val.b, tirx.Mul):
        return None
    act = weight = None
    for x, y in ((val.b.a, val.b.b), (val.b.b, val.b.a)):
        a, w = _strip_cast(x, "uint8"), _strip_cast(y, "int8")
        if a is not None and isinstance(w, _Load) and _has(params, w.source):
            act, weight = a, w
    if act is None or any(not _has(params, ld.source) or ld.source.same_as(weight.source) for ld in _loads(act)):
        return None
    spatial = tuple(iv.var for iv in red.iter_vars if int(iv.iter_type) == tirx.IterVar.DataPar)
    reduce = tuple(iv.var for iv in red.iter_vars if int(iv.iter_type) == tirx.IterVar.CommReduce)
    if len(spatial) + len(reduce) != len(red.iter_vars) or not reduce or not spatial:
        return None
    if any(not isinstance(iv.dom.extent, tirx.IntImm) or not _is_zero(iv.dom.min) for iv in red.iter_vars):
        return None
    acc_vars, w_vars = _index_vars(store.indices), _index_vars(weight.indices)
    if acc_vars is None or w_vars is None or len(acc_vars) != len(spatial) \
            or any(not a.same_as(b) for a, b in zip(acc_vars, spatial)):
        return None
    f_vars = [v for v in w_vars if _has(spatial, v)]
    a_vars = _vars(act)
    if len(f_vars) != 1 or any(not _has(w_vars, r) or not _has(a_vars, r) for r in reduce) \
            or _has(a_vars, f_vars[0]):
        return None
    p_vars = tuple(v for v in spatial if _has(a_vars, v))
    if len(p_vars) + 1 != len(spatial):
        return None
    # the epilogue: out[...] = g(acc[S], params), every other buffer inlined
    e_store = epi.body
    if not isinstance(e_store, tirx.BufferStore) or not e_store.buffer.same_as(params[-1]) \
            or _index_vars(e_store.indices) is None:
        return None
    out_vars = _index_vars(e_store.indices)
    for ld in _loads(e_store.value):
        if not (ld.source.same_as(acc) or _has(params[:-1], ld.source)) or ld.source.same_as(weight.source):
            return None
        # the epilogue reads the accumulator at its own output point only: it then runs right after each tile
        at = _index_vars(ld.indices) if ld.source.same_as(acc) else out_vars
        if at is None or len(at) != len(out_vars) or any(not a.same_as(b) for a, b in zip(at, out_vars)):
            return None
    # and writes exactly the accumulator's points: an epilogue ending in the next conv's zero-point pad has more, and
    # run after each tile its border would never be written (the main build's outputs were wrong; the rule runs it
    # as a loop nest of its own, schedules.rules.reverse_compute_at_whole)
    if [int(d) for d in e_store.buffer.shape] != [int(d) for d in acc.shape]:
        return None
    return _Pattern(func, red, epi, acc, act, weight.source, tuple(weight.indices), spatial, reduce, f_vars[0],
                    p_vars)


# ------------------------------------------------------------------------------------------------ build
def _i64(n: int) -> tirx.PrimExpr:
    return tirx.const(int(n), "int64")


def _convert(expr: tirx.PrimExpr, subst: list[tuple[tirx.Var, tirx.PrimExpr]], loads) -> tirx.PrimExpr:
    """``expr`` with iter vars replaced (``subst``), buffer reads turned into te reads (``loads(load)``) and every
    ``Let`` binding a variable of its own: an epilogue that inlined the same float sigmoid twice (a swish's requantize
    chain, EfficientNet's and MobileNetV3's convs) holds two ``Let`` nodes of one variable once copied here, which TIR
    rejects as ill-formed ("multiple definitions of variable x_s"), and the conv kept the default schedule."""
    def on_var(v: tirx.Var) -> tirx.PrimExpr:
        for old, new in subst:
            if v.same_as(old):
                return new
        return v

    def on_load(ld: _Load) -> tirx.PrimExpr:
        return loads(ld)

    def on_let(let: tirx.Let) -> tirx.PrimExpr:
        own = tirx.Var(let.var.name, let.var.ty)
        body = tvm_ffi.structural_map(let.body, [(tirx.Var, lambda v: own if v.same_as(let.var) else v)])
        return tirx.Let(own, let.value, body)

    return tvm_ffi.structural_map(expr, [(_Load, on_load), (tirx.Var, on_var), (tirx.Let, on_let)])


def _unravel(k: tirx.PrimExpr, exts: list[int]) -> list[tirx.PrimExpr]:
    """Row-major digits of ``k`` over ``exts`` (the reduction vars of the flattened K axis)."""
    out = []
    for j, e in enumerate(exts):
        inner = math.prod(exts[j + 1:])
        v = tirx.floordiv(k, _i64(inner)) if inner > 1 else k
        out.append(tirx.floormod(v, _i64(e)) if j > 0 else v)
    return out


@dataclass(frozen=True)
class DspKernel:
    """A fused kernel rebuilt for the DSP extension: ``func`` (scheduled PrimFunc, the same parameters with the
    weight at ``weight_arg`` replaced by its ``[O_pad, K]`` repacking) and how to repack the weight constant."""

    func: tirx.PrimFunc
    weight_arg: int
    weight_shape: tuple[int, ...]
    kind: str  # "im2col" (int16 activations through a small buffer) or "in-place" (u8 rows read directly)
    out_channels: int
    reduction: int
    weight_order: tuple[int, ...]  # the weight's var dims in (F, R...) order
    weight_fixed: tuple[int | None, ...]  # per weight dim: None (a var) or its constant index
    interleaved: bool = False  # words stored [w0, w2, w1, w3] (the int16 im2col kernels)

    def pack(self, w: np.ndarray) -> np.ndarray:
        """The int8 weight as ``[O_pad, K_pad]`` rows: output channel major, reduction in the kernel's K order,
        zero-padded to whole words (K) and register tiles (O, :data:`TILE_F`)."""
        if tuple(w.shape) != self.weight_shape or w.dtype != np.int8:
            raise ValueError(f"weight {w.dtype}{list(w.shape)} is not int8{list(self.weight_shape)}")
        w = w[tuple(slice(None) if f is None else f for f in self.weight_fixed)]
        rows = np.ascontiguousarray(w.transpose(self.weight_order)).reshape(self.out_channels, self.reduction)
        o_pad = -(-self.out_channels // TILE_F) * TILE_F
        out = np.zeros((o_pad, -(-self.reduction // _RED) * _RED), np.int8)
        out[:self.out_channels, :self.reduction] = rows
        if self.interleaved:
            out = np.ascontiguousarray(out.reshape(o_pad, -1, _RED)[:, :, list(INTERLEAVE)].reshape(o_pad, -1))
        return out


def build_kernel(func: tirx.PrimFunc) -> DspKernel | None:
    """The DSP version of a fused int8 conv2d (groups=1) / matmul kernel, or None when ``func`` is anything else."""
    pat = _pattern(func)
    if pat is None:
        return None
    params = list(pat.func.params)
    ext = [(iv.var, int(iv.dom.extent.value)) for iv in pat.red.iter_vars]
    e = lambda v: next(n for k, n in ext if k.same_as(v))  # noqa: E731
    r_ext = [e(r) for r in pat.reduce]
    k_len = math.prod(r_ext)
    k4 = -(-k_len // _RED)
    k_pad = k4 * _RED
    o, o_pad = e(pat.f_var), -(-e(pat.f_var) // TILE_F) * TILE_F
    act = pat.act
    # rows read in place: one reduction var, the innermost index of a plain load, whole words
    direct = (k_pad == k_len and len(pat.reduce) == 1 and isinstance(act, _Load)
              and act.indices[-1].same_as(pat.reduce[0])
              and all(not _has(_vars(i), pat.reduce[0]) for i in act.indices[:-1]))
    p_last = pat.p_vars[-1] if pat.p_vars else None
    pl = e(p_last) if p_last is not None else 1
    tile_p = (TILE_P if pl % TILE_P == 0 else 1) if direct else min(TILE_P, pl)
    if not direct and tile_p * k_pad * 2 > MAX_COL_BYTES:
        tile_p = 1
        if k_pad * 2 > MAX_COL_BYTES:
            logger.debug("dsp: im2col row of %d int16 is over %d B", k_pad, MAX_COL_BYTES)
            return None
    pl_pad = -(-pl // tile_p) * tile_p

    w_index = pat.w_index
    w_param = next(i for i, p in enumerate(params) if p.same_as(pat.weight))
    tensors: list[te.Tensor] = []
    for i, prm in enumerate(params[:-1]):
        if i == w_param:
            tensors.append(te.placeholder((_i64(o_pad), _i64(k_pad)), "int8", name="w_dsp"))
        else:
            tensors.append(te.placeholder(tuple(prm.shape), str(prm.dtype), name=str(prm.name)))
    wr = tensors[w_param]

    def te_load(ld: _Load) -> tirx.PrimExpr:
        for prm, t in zip(params, tensors):
            if ld.source.same_as(prm):
                return t(*ld.indices)
        raise ValueError(f"unexpected read of {ld.source}")

    def act_at(p_idx: list, k: tirx.PrimExpr) -> tirx.PrimExpr:
        subst = list(zip(pat.p_vars, p_idx)) + list(zip(pat.reduce, _unravel(k, r_ext)))
        return _convert(act, subst, te_load)

    col = None
    if not direct:
        p_shape = [_i64(e(p)) for p in pat.p_vars[:-1]] + ([_i64(pl_pad)] if pat.p_vars else [])

        def col_f(*idx):
            inside = [idx[-1] < _i64(k_len)] if k_pad != k_len else []
            if pl_pad != pl:
                inside.append(idx[-2] < _i64(pl))
            v = act_at(list(idx[:-1]), idx[-1])
            v = v.astype("int16")
            return tirx.if_then_else(tirx.all(*inside), v, tirx.const(0, "int16")) if inside else v
        col = te.compute((*p_shape, _i64(k_pad)), col_f, name="col")

    s_shape = []
    for s in pat.spatial:
        s_shape.append(_i64(o_pad if s.same_as(pat.f_var) else pl_pad if s.same_as(p_last) else e(s)))

    def product(idx, q: tirx.PrimExpr, i: tirx.PrimExpr) -> tirx.PrimExpr:
        """Element ``i`` of reduction word ``q`` at spatial point ``idx``."""
        f = next(v for s, v in zip(pat.spatial, idx) if s.same_as(pat.f_var))
        p_idx = [v for s, v in zip(pat.spatial, idx) if not s.same_as(pat.f_var)]
        k = q * _i64(_RED) + i
        if col is None:  # u8 rows in place, weights in natural order
            return act_at(p_idx, k).astype("int32") * wr(f, k).astype("int32")
        return col(*p_idx, k).astype("int32") * wr(f, q * _i64(_RED) + _perm(i)).astype("int32")

    def acc_f(*idx):
        rk4 = te.reduce_axis((_i64(0), _i64(k4)), "rk4")
        rki = te.reduce_axis((_i64(0), _i64(_RED)), "rki")
        return te.sum(product(idx, rk4, rki), axis=[rk4, rki])
    acc = te.compute(tuple(s_shape), acc_f, name="acc")

    e_store = pat.epi.body
    acc_dims = [d for d, i in enumerate(pat.red.body.indices) if not _is_zero(i)]

    def epi_load(ld: _Load) -> tirx.PrimExpr:
        if ld.source.same_as(pat.acc):
            idx = [ld.indices[d] for d in acc_dims]
            return acc(*idx)
        return te_load(ld)

    def out_f(*o_idx):
        subst = [(i, v) for i, v in zip(e_store.indices, o_idx) if isinstance(i, tirx.Var)]
        return _convert(e_store.value, subst, epi_load)
    out = te.compute(tuple(params[-1].shape), out_f, name="out")
    prim = te.create_prim_func([*tensors, out])

    sch = s_tir.Schedule(prim)
    blk = sch.get_sblock("acc")
    loops = sch.get_loops(blk)
    s_loops = loops[:len(pat.spatial)]
    rk4_l, rki_l = loops[len(pat.spatial):]
    by_var = list(zip(pat.spatial, s_loops))
    f_loop = next(lp for s, lp in by_var if s.same_as(pat.f_var))
    f_o, f_i = sch.split(f_loop, [None, TILE_F])
    outer, inner = [], [f_i]
    if p_last is not None:
        outer = [lp for s, lp in by_var if not s.same_as(pat.f_var) and not s.same_as(p_last)]
        p_o, p_i = sch.split(next(lp for s, lp in by_var if s.same_as(p_last)), [None, tile_p])
        outer.append(p_o)
        inner.append(p_i)
    sch.reorder(*outer, f_o, rk4_l, *inner, rki_l)
    reverse_compute_at_whole(sch, sch.get_sblock("out"), f_o)
    if col is not None and outer:
        cb = sch.get_sblock("col")
        sch.compute_at(cb, outer[-1])
        if k_pad != k_len or pl_pad != pl:  # zero the padding first, then copy the inside without conditions
            sch.decompose_padding(cb, sch.get_loops(cb)[-2])
        if len(r_ext) > 1:
            sch.split(sch.get_loops(cb)[-1], r_ext)
    # "local": TVM's CPU lowering gives the 2x2 accumulators a 16-byte workspace slot that LLVM keeps in registers
    # through the reduction loop; an alloca ("global") measured ~1% more instructions (more live SSA values)
    sch.set_scope(blk, 0, "local")
    sch.decompose_reduction(blk, rk4_l)
    sch.tensorize(rki_l, _ensure_intrin(col is not None))
    # unrolled tile loops: the accumulators stay in registers (constant indices), and the epilogue loads each
    # channel's requantization constants once per tile
    tile_root = sch.get(f_o).loop_var
    for b in (sch.get_sblock("acc_init"), sch.get_sblock("out")):
        loops = sch.get_loops(b)
        below = next(i for i, lp in enumerate(loops) if sch.get(lp).loop_var.same_as(tile_root)) + 1
        for lp in loops[below:]:
            sch.unroll(lp)
    for lp in inner:
        sch.unroll(lp)
    kern = sch.mod["main"].with_attr("tirx.is_scheduled", True)
    if kern.attrs is not None and "global_symbol" in kern.attrs:
        kern = kern.without_attr("global_symbol")
    # numpy repacking: drop the unit dims (constant indices), then put the dims in (F, R...) order
    kept = [d for d, i in enumerate(w_index) if isinstance(i, tirx.Var)]
    order = tuple(kept.index(next(d for d, i in enumerate(w_index) if i.same_as(v)))
                  for v in (pat.f_var, *pat.reduce))
    fixed = tuple(None if isinstance(i, tirx.Var) else int(i.value) for i in w_index)
    return DspKernel(kern, w_param, tuple(int(d) for d in pat.weight.shape), "in-place" if direct else "im2col", o,
                     k_len, order, fixed, not direct)
