"""Cortex-M DSP-extension kernels: the int8 conv2d / matmul reductions as ``SMLAD`` on ``SXTB16`` pairs.

LLVM never forms ``SMLAD`` from TVM's scalar reductions: it emits one ``SMLABB`` per multiply-accumulate plus a byte
load per operand, ~3 instructions per MAC. This module applies CMSIS-NN's recipe inside TVM, as the Relax pass list
:func:`dsp_schedule` for :func:`~.static_c.lower_static`'s ``schedule``. It runs after fusion, so it sees the fused
kernels ``epilogue(Σ_R u8(A) · s8(W))`` and rebuilds each matching one (:func:`build_kernel`):

- the weight constant is repacked at compile time into ``[O, K]`` rows, ``K`` being the whole reduction (C·KH·KW
  for a conv, whose OIHW order already is that; a ``[K, N]`` matmul weight is transposed), zero-padded to whole
  32-bit words (``K % 4``, so there is no scalar tail loop) and to the 2-channel register tile;
- conv activations are made reduction-contiguous by an im2col of one register tile (2 output pixels × K, int16,
  CMSIS-NN's ``arm_nn_mat_mult_kernel_s8_s16`` layout): each int16 word then is a ready SMLAD operand, and each
  weight word (stored interleaved ``[w0, w2, w1, w3]``) becomes two operands with one ``SXTB16`` plain and one
  rotated by 8. The buffer is ``4·K`` bytes: on the stack below 1 KiB, else kernel workspace that static C plans
  into the arena (capped at :data:`MAX_COL_BYTES`);
- a matmul whose rows are contiguous reads its u8 activations in place: one 32-bit load, ``UXTB16`` plain and
  rotated unpack bytes 0,2 and 1,3 (weights the same way with ``SXTB16``, natural order);
- the reduction is tensorized (:data:`DSP_INTRIN_I16` / :data:`DSP_INTRIN`) under a 2 channels × 2 pixels tile:
  four accumulators in registers, each unpacked word used twice (~1.2 instructions per MAC); the fused kernel's
  requantization epilogue is grafted unchanged after each tile.

Integer results are bit-exact: products are u8 × s8 (|p| < 2^15) summed in int32 without saturation (``SMLAD`` only
sets the Q flag), equal to the reference in any summation order; padded weights are zeros.

Kernels that do not match keep :func:`~.schedule.schedule_pass`: depthwise / grouped convs (every output channel
reduces over its own 9 inputs, so an im2col is not shared across channels and costs more than the scalar MACs it
saves), float reductions, non-constant weights.
"""
from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass

import numpy as np
import tvm
import tvm_ffi
from tvm import relax, s_tir, te, tirx
from tvm.s_tir import TensorIntrin
from tvm.s_tir import dlight as dl
from tvm.script import tirx as T
from tvm.target import codegen

from qcompile.targets.tvm.schedule import schedule_pass

logger = logging.getLogger(__name__)

__all__ = ["DSP_INTRIN", "DSP_INTRIN_I16", "DspKernel", "build_kernel", "dsp_schedule", "dsp_transform",
           "target_has_dsp"]

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
    return _Pattern(func, red, epi, acc, act, weight.source, tuple(weight.indices), spatial, reduce, f_vars[0],
                    p_vars)


# ------------------------------------------------------------------------------------------------ build
def _i64(n: int) -> tirx.PrimExpr:
    return tirx.const(int(n), "int64")


def _convert(expr: tirx.PrimExpr, subst: list[tuple[tirx.Var, tirx.PrimExpr]], loads) -> tirx.PrimExpr:
    """``expr`` with iter vars replaced (``subst``) and buffer reads turned into te reads (``loads(load)``)."""
    def on_var(v: tirx.Var) -> tirx.PrimExpr:
        for old, new in subst:
            if v.same_as(old):
                return new
        return v

    def on_load(ld: _Load) -> tirx.PrimExpr:
        return loads(ld)

    return tvm_ffi.structural_map(expr, [(_Load, on_load), (tirx.Var, on_var)])


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
    sch.reverse_compute_at(sch.get_sblock("out"), f_o)
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


# ------------------------------------------------------------------------------------------- relax pass
@relax.expr_functor.mutator
class _Rewriter(relax.PyExprMutator):
    """``call_tir`` of a matched kernel with a constant weight -> ``call_tir`` of its DSP version with the
    repacked constant; calls whose weight is not a constant keep the original kernel."""

    def __init__(self, mod: tvm.IRModule, kernels: dict[str, DspKernel]) -> None:
        super().__init__(mod)
        self._call_tir = tvm.ir.Op.get("relax.call_tir")
        self._kernels = kernels
        self._added: dict[str, relax.GlobalVar] = {}
        self._packed: list[tuple[object, relax.Expr]] = []
        self.rewritten: dict[str, int] = {}

    def _pack(self, const: object, kern: DspKernel) -> relax.Expr:
        for c, packed in self._packed:
            if c.same_as(const):
                return packed
        packed = relax.const(kern.pack(const.value.numpy()))
        self._packed.append((const, packed))
        return packed

    def visit_call_(self, call: relax.Call) -> relax.Expr:  # noqa: D102 - visitor hook
        call = super().visit_call_(call)
        if not call.op.same_as(self._call_tir) or not isinstance(call.args[0], relax.GlobalVar):
            return call
        name = call.args[0].name_hint
        kern = self._kernels.get(name)
        args = call.args[1]
        if kern is None or not isinstance(args, relax.Tuple) or len(call.args) != 2:
            return call
        fields = list(args.fields)
        weight = fields[kern.weight_arg]
        if not isinstance(weight, tvm.ir.GenericConst) or str(weight.ty.dtype) != "int8" \
                or tuple(int(d) for d in weight.value.shape) != kern.weight_shape:
            return call
        if name not in self._added:
            self._added[name] = self.builder_.add_func(kern.func, f"{name}_dsp")
        fields[kern.weight_arg] = self._pack(weight, kern)
        self.rewritten[name] = self.rewritten.get(name, 0) + 1
        return relax.call_tir(self._added[name], relax.Tuple(fields), call.ty_args[0])


def dsp_transform(mod: tvm.IRModule) -> tvm.IRModule:
    """Replace every fused int8 conv2d (groups=1) / matmul kernel with a constant weight by its DSP version
    (:func:`build_kernel`); the other kernels are left for the default rule. Run after ``FuseTIR``."""
    kernels: dict[str, DspKernel] = {}
    for gv, func in mod.functions_items():
        if not isinstance(func, tirx.PrimFunc) or (func.attrs is not None and func.attrs.get("tirx.is_scheduled")):
            continue
        try:
            kern = build_kernel(func)
        except Exception as exc:  # noqa: BLE001 - a kernel we cannot rebuild keeps the default schedule
            logger.warning("dsp: %s keeps the default schedule: %s", gv.name_hint,
                           str(exc).strip().splitlines()[-1][:200] if str(exc).strip() else type(exc).__name__)
            continue
        if kern is not None:
            kernels[gv.name_hint] = kern
    if not kernels:
        return mod
    rewriter = _Rewriter(mod, kernels)
    for gv, func in list(mod.functions_items()):
        if isinstance(func, relax.Function):
            rewriter.builder_.update_func(gv, rewriter.visit_expr(func))
    new_mod = rewriter.builder_.get()
    for name, n in sorted(rewriter.rewritten.items()):
        k = kernels[name]
        logger.debug("dsp: %s (%s, O=%d, K=%d) x%d", name, k.kind, k.out_channels, k.reduction, n)
    logger.info("dsp: %d of %d kernels on SMLAD", len(rewriter.rewritten),
                sum(isinstance(f, tirx.PrimFunc) for f in mod.functions.values()))
    return new_mod


def dsp_schedule(target: dict | tvm.target.Target, vector_lanes: int = 0) -> list[tvm.transform.Pass]:
    """The ``schedule`` for :func:`~.static_c.lower_static` on a Cortex-M with the DSP extension: the DSP kernels
    (:func:`dsp_transform`), then the epilogue rule for everything else, by default without vector loops (the M4
    has no SIMD registers: LLVM only scalarizes vector code there). A target without DSP gets the rule alone."""
    tgt = target if isinstance(target, tvm.target.Target) else tvm.target.Target(target)
    rest = schedule_pass(parallel=False, vector_lanes=vector_lanes)
    if not target_has_dsp(tgt):
        logger.info("dsp: %s has no DSP extension; default schedule only", tgt)
        return [rest]

    @tvm.transform.module_pass(opt_level=0, name="QcompileDspKernels")
    def _dsp(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        return dsp_transform(mod)
    return [_dsp, rest]
