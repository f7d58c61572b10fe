"""The specified float arithmetic of :mod:`qcompile.floatspec` in TIR, for every TVM target.

:func:`legalize_pass` legalizes float32 ``exp``, ``log``, ``sin``, ``cos``, ``sigmoid``, ``tanh``, ``softmax``,
``log_softmax``, ``layer_norm`` and ``power(x, e)`` (e a multiple of 1/4 up to 8) into TE computes that perform the
reference's float32 operations one for one (:func:`exp`, the same Cody-Waite reduction, Horner polynomial and
exponent-bit scaling); every other op keeps TVM's legalization (its float sums and matmuls are TE reductions in
index order). The softmax keeps TOPI's four blocks and their names, so the CPU row-loop rebuild (:mod:`.softmax`)
still recognizes it. On GPUs,
:func:`in_order_float_reduction` schedules every kernel with a float reduction before dlight's cross-thread rules
could reorder its sum: float matmuls tiled by dlight's Matmul rule (per-thread accumulators, k in order), every
other one an output per thread with its reduction loop serial.

Whether the operations are then rounded one by one is the code generator's business: OpenCL kernels are compiled
with ``FP_CONTRACT OFF``, CUDA with ``--fmad=false``. TVM 0.27's LLVM back end fuses a float multiply and the add
after it into one FMA on every CPU that has one (``AllowFPOpFusion = Fast``, not a target option), so the CPU
targets' schedules end with :func:`separate_multiply_add_pass`: every float product behind LLVM's
``arithmetic.fence``, which no instruction selection fuses across and which costs no instruction. Not on Hexagon,
whose LLVM back end hangs on a vector fence (:func:`~..pipeline.hexagon_phases`): its float regions may still be a
last bit off.
"""
from __future__ import annotations

import logging

from tvm import te, tirx, topi

from qcompile import floatspec as spec

logger = logging.getLogger(__name__)


def _c(v) -> tirx.PrimExpr:
    return tirx.const(float(v), "float32")


def exp(x: tirx.PrimExpr) -> tirx.PrimExpr:
    """float32 ``exp(x)`` as :func:`qcompile.floatspec.exp` computes it."""
    xv = tirx.Var("x_e", "float32")
    xc = tirx.Var("xc_e", "float32")
    k = tirx.Var("k_e", "float32")
    r = tirx.Var("r_e", "float32")
    p = _c(spec.COEFFS[spec.TAYLOR])
    for c in spec.COEFFS[spec.TAYLOR - 1::-1]:
        p = p * r + _c(c)
    bits = tirx.shift_left(tirx.Cast("int32", k) + tirx.const(126, "int32"), tirx.const(23, "int32"))
    y = (p * tirx.reinterpret("float32", bits)) * _c(2.0)
    body = tirx.Select(tirx.isnan(xv), xv, tirx.Select(xv < _c(spec.EXP_LO), _c(0.0),
                                                       tirx.Select(xv > _c(spec.EXP_HI), _c(float("inf")), y)))
    clamp = tirx.Select(xv < _c(spec.EXP_LO), _c(spec.EXP_LO), tirx.Select(xv > _c(spec.EXP_HI), _c(spec.EXP_HI), xv))
    return tirx.Let(xv, x, tirx.Let(xc, clamp, tirx.Let(
        k, tirx.floor(xc * _c(spec.LOG2E) + _c(0.5)), tirx.Let(
            r, (xc - k * _c(spec.LN2_HI)) - k * _c(spec.LN2_LO), body))))


def log(x: tirx.PrimExpr) -> tirx.PrimExpr:
    """float32 ``log(x)`` as :func:`qcompile.floatspec.log` computes it."""
    def i32(v: int) -> tirx.PrimExpr:
        return tirx.const(v, "int32")

    xv, xs = tirx.Var("x_l", "float32"), tirx.Var("xs_l", "float32")
    bits, mant, i = tirx.Var("b_l", "int32"), tirx.Var("mant_l", "int32"), tirx.Var("i_l", "int32")
    f, s, z, w = (tirx.Var(n, "float32") for n in ("f_l", "s_l", "z_l", "w_l"))
    hfsq, dk = tirx.Var("hfsq_l", "float32"), tirx.Var("dk_l", "float32")
    sub = xv < _c(spec.LOG_TINY)
    m = tirx.reinterpret("float32", tirx.bitwise_or(mant, tirx.bitwise_xor(i, i32(0x3F800000))))
    k = ((tirx.shift_right(bits, i32(23)) - i32(127)) + tirx.shift_right(i, i32(23))) - tirx.Select(sub, i32(25),
                                                                                                     i32(0))
    lg = [_c(c) for c in spec.LOG_LG]
    r = z * (lg[0] + w * lg[2]) + w * (lg[1] + w * lg[3])
    y = dk * _c(spec.LOG_LN2_HI) - ((hfsq - (s * (hfsq + r) + dk * _c(spec.LOG_LN2_LO))) - f)
    body = tirx.Select(tirx.any(xv < _c(0.0), tirx.isnan(xv)), _c(float("nan")),
                       tirx.Select(xv == _c(0.0), _c(float("-inf")), tirx.Select(xv == _c(float("inf")), xv, y)))
    lets = [(xs, tirx.Select(sub, xv * _c(2.0 ** 25), xv)), (bits, tirx.reinterpret("int32", xs)),
            (mant, tirx.bitwise_and(bits, i32(0x007FFFFF))),
            (i, tirx.bitwise_and(mant + i32(0x4AFB20), i32(0x00800000))),
            (f, m - _c(1.0)), (s, f / (_c(2.0) + f)), (z, s * s), (w, z * z), (hfsq, (_c(0.5) * f) * f),
            (dk, tirx.Cast("float32", k))]
    for var, value in reversed(lets):
        body = tirx.Let(var, value, body)
    return tirx.Let(xv, x, body)


def _trig(x: tirx.PrimExpr, pick) -> tirx.PrimExpr:
    """``pick(q, sin r, cos r)`` for ``x = k·π/2 + r`` as :func:`qcompile.floatspec.sin` reduces it."""
    xv, k, q, r, z, sv, cv = (tirx.Var(n, "float32") for n in ("x_t", "k_t", "q_t", "r_t", "z_t", "s_t", "c_t"))
    s0, s1, s2 = (_c(v) for v in spec.SIN_COEFFS)
    c0, c1, c2 = (_c(v) for v in spec.COS_COEFFS)
    reduced = xv
    for part in spec.PIO2_PARTS:
        reduced = reduced - k * _c(part)
    lets = [(xv, x), (k, tirx.floor(xv * _c(spec.TWO_OVER_PI) + _c(0.5))), (r, reduced),
            (q, k - _c(4.0) * tirx.floor(k * _c(0.25))), (z, r * r),
            (sv, r + (r * z) * ((s2 * z + s1) * z + s0)),
            (cv, ((((c2 * z + c1) * z + c0) * z) * z - _c(0.5) * z) + _c(1.0))]
    body = pick(xv, q, sv, cv)
    for var, value in reversed(lets):
        body = tirx.Let(var, value, body)
    return body


def sin(x: tirx.PrimExpr) -> tirx.PrimExpr:
    """float32 ``sin(x)`` as :func:`qcompile.floatspec.sin` computes it."""
    def pick(xv, q, s, c):
        y = tirx.Select(q == _c(0.0), s, tirx.Select(q == _c(1.0), c, tirx.Select(q == _c(2.0), -s, -c)))
        return tirx.Select(xv == _c(0.0), xv, y)
    return _trig(x, pick)


def cos(x: tirx.PrimExpr) -> tirx.PrimExpr:
    """float32 ``cos(x)`` as :func:`qcompile.floatspec.cos` computes it."""
    return _trig(x, lambda _, q, s, c: tirx.Select(q == _c(0.0), c, tirx.Select(q == _c(1.0), -s, tirx.Select(
        q == _c(2.0), -c, s))))


def sigmoid(x: tirx.PrimExpr) -> tirx.PrimExpr:
    xv, e = tirx.Var("x_s", "float32"), tirx.Var("e_s", "float32")
    d = _c(1.0) + e
    return tirx.Let(xv, x, tirx.Let(e, exp(-tirx.abs(xv)), tirx.Select(xv >= _c(0.0), _c(1.0) / d, e / d)))


def tanh(x: tirx.PrimExpr) -> tirx.PrimExpr:
    xv, e = tirx.Var("x_t", "float32"), tirx.Var("e_t", "float32")
    t = (_c(1.0) - e) / (_c(1.0) + e)
    return tirx.Let(xv, x, tirx.Let(e, exp(_c(-2.0) * tirx.abs(xv)), tirx.Select(xv < _c(0.0), -t, t)))


def _elementwise(fn, name: str):
    def compute(x: te.Tensor) -> te.Tensor:
        return te.compute(x.shape, lambda *i: fn(x(*i)), name=name, tag="elemwise")
    return compute


def _exp_sum(x: te.Tensor, axis: int, prefix: str):
    """The stages softmax and log-softmax share: the row max, ``e = exp(x − max)``, ``Σe`` in index order (TOPI's
    blocks and names under ``prefix``); returns them with the index helper that drops ``axis``."""
    shape = x.shape
    k1 = te.reduce_axis((0, shape[axis]), name="k")
    k2 = te.reduce_axis((0, shape[axis]), name="k")

    def put(idx, r):
        return idx[:axis] + (r,) + idx[axis:]

    def rest(idx):
        return tuple(v for i, v in enumerate(idx) if i != axis)

    reduced = tuple(d for i, d in enumerate(shape) if i != axis)
    mx = te.compute(reduced, lambda *i: te.max(x[put(i, k1)], axis=k1), name=f"{prefix}_maxelem")
    e = te.compute(shape, lambda *i: exp(x[i] - mx[rest(i)]), name=f"{prefix}_exp")
    s = te.compute(reduced, lambda *i: te.sum(e[put(i, k2)], axis=k2), name=f"{prefix}_expsum")
    return mx, e, s, rest


def softmax(x: te.Tensor, axis: int) -> te.Tensor:
    """TOPI's softmax (same four blocks, same names, the norm block's ``axis`` attribute) with :func:`exp`."""
    axis = axis % len(x.shape)
    _, e, s, rest = _exp_sum(x, axis, "T_softmax")
    return te.compute(x.shape, lambda *i: e[i] / s[rest(i)], name="T_softmax_norm", attrs={"axis": axis})


def log_softmax(x: te.Tensor, axis: int) -> te.Tensor:
    """:func:`qcompile.floatspec.log_softmax`: ``(x − max) − log(Σ exp(x − max))`` (TOPI's order) with :func:`exp`
    and :func:`log` (TOPI's calls libm's, which a DSP does not link)."""
    axis = axis % len(x.shape)
    mx, _, s, rest = _exp_sum(x, axis, "T_log_softmax")
    return te.compute(x.shape, lambda *i: (x[i] - mx[rest(i)]) - log(s[rest(i)]), name="T_log_softmax_norm")


def layer_norm(x: te.Tensor, gamma: te.Tensor | None, beta: te.Tensor | None, axes, epsilon: float, *,
               divide: bool = False) -> te.Tensor:
    """:func:`qcompile.floatspec.layer_norm`: two in-order means over ``axes``, ``D·(1/sqrt(var + ε))·γ + β``;
    ``divide``: ``D / sqrt(var + ε)`` (:func:`qcompile.floatspec.group_norm`'s form, which takes no γ, β here)."""
    shape = x.shape
    axes = sorted(int(a) % len(shape) for a in axes)
    count = 1
    for a in axes:
        count *= int(shape[a])
    kshape = tuple(1 if i in axes else d for i, d in enumerate(shape))

    def reduce_idx(idx, ks):
        it = iter(ks)
        return tuple(next(it) if i in axes else v for i, v in enumerate(idx))

    def row(idx):
        return tuple(tirx.const(0, "int64") if i in axes else v for i, v in enumerate(idx))

    def mean_of(t, name):
        ks = [te.reduce_axis((0, shape[a]), name=f"k{a}") for a in axes]
        s = te.compute(kshape, lambda *i: te.sum(t[reduce_idx(i, ks)], axis=ks), name=f"{name}_sum")
        return te.compute(kshape, lambda *i: s(*i) / _c(count), name=name)

    mean = mean_of(x, "T_ln_mean")
    d = te.compute(shape, lambda *i: x(*i) - mean(*row(i)), name="T_ln_centered")
    var = mean_of(te.compute(shape, lambda *i: d(*i) * d(*i), name="T_ln_square"), "T_ln_var")
    inv = te.compute(kshape, lambda *i: (tirx.sqrt(var(*i) + _c(epsilon)) if divide else
                                         _c(1.0) / tirx.sqrt(var(*i) + _c(epsilon))), name="T_ln_inv")

    def out(*i):
        y = d(*i) / inv(*row(i)) if divide else d(*i) * inv(*row(i))
        g = tuple(i[a] for a in axes)
        if gamma is not None:
            y = y * gamma(*g)
        return y + beta(*g) if beta is not None else y

    return te.compute(shape, out, name="T_layer_norm")


def _f32(expr) -> bool:
    return getattr(getattr(expr, "ty", None), "dtype", None) == "float32"


def _scalar_const(expr) -> float | None:
    import tvm

    if isinstance(expr, tvm.ir.GenericConst) and expr.value.numpy().size == 1:
        return float(expr.value.numpy().reshape(()))
    return None


def _legalize_map() -> dict:
    def default(bb, call):
        return call.op.get_attr("FLegalize")(bb, call)

    def unary(fn, name):
        compute = _elementwise(fn, name)

        def legalize(bb, call):
            if not _f32(call.args[0]):
                return default(bb, call)
            return bb.call_te(compute, call.args[0], primfunc_name_hint=name)
        return legalize

    def rowwise(fn, name):
        return lambda bb, call: (bb.call_te(fn, call.args[0], int(call.attrs.axis), primfunc_name_hint=name)
                                 if _f32(call.args[0]) else default(bb, call))

    def power(bb, call):
        y = _scalar_const(call.args[1])
        e = spec.pow_exponent(y) if _f32(call.args[0]) and y is not None else None
        if e is None:
            return default(bb, call)
        name = {2.0: "square", 0.5: "sqrt", -0.5: "rsqrt"}.get(e, f"power{e:g}".replace("-", "_neg").replace(
            ".", "_"))
        return bb.call_te(lambda x: te.compute(x.shape, lambda *i: spec.pow_specified(x(*i), e, te.sqrt, _c(1)),
                                               name="T_power"), call.args[0], primfunc_name_hint=name)

    def norm(bb, call):
        x, gamma, beta = call.args
        if not (_f32(x) and _f32(gamma) and _f32(beta)):
            return default(bb, call)
        a = call.attrs
        return bb.call_te(lambda t, g, b: layer_norm(t, g if a.scale else None, b if a.center else None,
                                                     [int(v) for v in a.axes], float(a.epsilon)),
                          x, gamma, beta, primfunc_name_hint="layer_norm")

    def group(bb, call):
        """As the GroupNorm export computes it: a reshape to (N, groups, rest), the normalization over the last axis
        (one kernel, a thread per group on a GPU), the reshape back, ``· γ + β`` per channel."""
        x, gamma, beta = call.args
        a = call.attrs
        shape = [int(d) if isinstance(d, tirx.IntImm) else None for d in getattr(x.ty, "shape", None) or []]
        groups = int(a.num_groups)
        if (not (_f32(x) and _f32(gamma) and _f32(beta)) or len(shape) < 3 or None in shape
                or int(a.channel_axis) % len(shape) != 1 or shape[1] % groups
                or sorted(int(v) % len(shape) for v in a.axes) != list(range(2, len(shape)))):
            return default(bb, call)
        rest = 1
        for d in shape[1:]:
            rest *= d
        rows = bb.emit(bb.call_te(topi.reshape, x, [shape[0], groups, rest // groups], primfunc_name_hint="reshape"))
        normed = bb.emit(bb.call_te(lambda t: layer_norm(t, None, None, [-1], float(a.epsilon), divide=True), rows,
                                    primfunc_name_hint="group_norm"))
        y = bb.call_te(topi.reshape, normed, shape, primfunc_name_hint="reshape")
        if not (a.scale or a.center):
            return y
        y = bb.emit(y)

        def affine(t, g, b):
            def at(*i):
                v = t(*i) * g(i[1]) if a.scale else t(*i)
                return v + b(i[1]) if a.center else v
            return te.compute(t.shape, at, name="T_gn_affine")
        return bb.call_te(affine, y, gamma, beta, primfunc_name_hint="group_norm_affine")

    return {"relax.exp": unary(exp, "exp"), "relax.log": unary(log, "log"), "relax.sin": unary(sin, "sin"),
            "relax.cos": unary(cos, "cos"),
            "relax.sigmoid": unary(sigmoid, "sigmoid"), "relax.tanh": unary(tanh, "tanh"),
            "relax.nn.softmax": rowwise(softmax, "softmax"),
            "relax.nn.log_softmax": rowwise(log_softmax, "log_softmax"),
            "relax.power": power, "relax.nn.layer_norm": norm, "relax.nn.group_norm": group}


def _fenced(product: tirx.PrimExpr) -> tirx.PrimExpr:
    dtype = str(getattr(product.ty, "dtype", product.ty))
    if not dtype.startswith(("float", "bfloat")):
        return product
    return tirx.call_llvm_pure_intrin(product.ty, "llvm.arithmetic.fence", product)


def separate_multiply_add_pass():
    """For LLVM (CPU) targets, after scheduling: every float ``a * b`` of every kernel becomes
    ``llvm.arithmetic.fence(a * b)``, so the product is rounded before any add that uses it, as the reference
    (numpy) rounds it. Without it, LLVM fused ``x * s + b`` (a BatchNorm that tf2onnx wrote as Mul and Add after a
    Concat: Keras' DenseNet) into one FMA: a fifth of such outputs one bit off, and a QuantizeLinear after them
    flipped at ties. Integer arithmetic is untouched; the vectorizer widens the fence with the product."""
    import tvm
    import tvm_ffi

    @tvm.tirx.transform.prim_func_pass(opt_level=0, name="QcompileSeparateMultiplyAdd")
    def _pass(func: tirx.PrimFunc, _mod, _ctx) -> tirx.PrimFunc:
        return tvm_ffi.structural_map(func, [(tirx.Mul, _fenced)])
    return _pass


def legalize_pass():
    """Relax LegalizeOps with the specified float ops (every other op: TVM's own legalization)."""
    from tvm import relax

    return relax.transform.LegalizeOps(_legalize_map())


def has_float_reduction(func: tirx.PrimFunc) -> bool:
    """Whether a kernel has a block that reduces into a float buffer (a sum, a mean, a float matmul, a max). (A
    reduction over one element never gets here: :func:`~..schedules.rewrite.unit_reductions_as_spatial` made it an
    elementwise block.)"""
    from tvm import s_tir
    from tvm.s_tir import dlight as dl

    sch = s_tir.Schedule(func)
    infos = dl.normalize_prim_func(sch)
    if infos is None:
        return False
    return any("R" in i.dom_kind() and any(str(w.source.dtype).startswith(("float", "bfloat"))
                                           for w in sch.get(i.block_rv).writes) for i in infos)


THREADS = 64


def in_order_schedule(func: tirx.PrimFunc):
    """One thread per output of the first float reduction's spatial loops, its reduction loops serial in index
    order, and every later block (a second reduction, the epilogue) under that thread: softmax, RMSNorm's mean and
    scaling, a float matmul with its epilogue run as one kernel, intermediates in registers. None when the kernel
    does not have that shape (a block left before the reduction, an opaque loop)."""
    from tvm import s_tir
    from tvm.s_tir import dlight as dl
    from tvm.s_tir.dlight.base import try_inline

    from qcompile.targets.tvm.schedules.compute_at import reverse_compute_at_whole

    sch = s_tir.Schedule(func)
    infos = dl.normalize_prim_func(sch)
    if infos is None:
        return None
    infos = try_inline(sch, infos)
    anchor = infos[0]
    kinds = anchor.dom_kind()
    if "R" not in kinds or "O" in kinds:
        return None
    loops = sch.get_loops(anchor.block_rv)
    s_loops = [lp for lp, k in zip(loops, kinds) if k == "S"]
    r_loops = [lp for lp, k in zip(loops, kinds) if k == "R"]
    sch.reorder(*s_loops, *r_loops)
    fused = sch.fuse(*s_loops) if s_loops else sch.add_unit_loop(anchor.block_rv)
    # no more threads than outputs: a reduction over the whole tensor (InstanceNormalization of one group, as
    # GroupNorm(1) exports) has one output, and the later blocks that read it (the normalized tensor) do not depend
    # on the thread index, so nothing predicates them: every idle thread ran them on its own uninitialized sum and
    # wrote the same outputs, a race (PoolFormer's outputs were NaN)
    extent = sch.get(fused).extent
    threads = min(THREADS, int(extent)) if isinstance(extent, tirx.IntImm) else THREADS
    bx, tx = sch.split(fused, factors=[None, threads])
    sch.bind(bx, "blockIdx.x")
    sch.bind(tx, "threadIdx.x")
    for later in infos[1:]:  # (raises where a later block would lose points: the next rule gets the kernel)
        reverse_compute_at_whole(sch, later.block_rv, tx, preserve_unit_loops=True)
    params = list(func.params)
    for b in infos:  # intermediates (the row maximum, the sum) live in the thread's registers: every buffer a
        # block writes (an argmax reduces into two, index and value; the value's left in global scope was a kernel
        # variable OpenCL C refuses: "function scope variable cannot be declared in global address space")
        for i, w in enumerate(sch.get(b.block_rv).writes):
            if not any(w.source.same_as(p) for p in params):
                sch.set_scope(b.block_rv, i, "local")
    return sch


def keeps_order(sch) -> bool:
    """Whether a schedule adds every float reduction in one thread, in index order: no rfactor block, no
    cross-thread reduction (dlight's Matmul tiles k into an outer and an inner loop around per-thread
    accumulators, which keeps the order; its GEMV and Reduction rules split the sum across threads)."""
    script = sch.mod.script()
    return not any(m in script for m in ('_rf"', "_rf_", "cross_thread", "allreduce", "red_buf"))


def in_order_float_reduction():
    """A dlight rule for GPUs: a kernel with a float reduction gets dlight's Matmul schedule where that applies and
    keeps each output's sum in order (:func:`keeps_order`: tiles of outputs per thread, k in order), else
    :func:`in_order_schedule`, else dlight's Fallback (also one output per thread, each reduction loop serial in
    index order, as the reference adds); any other kernel: None, for the rules after it."""
    from tvm.s_tir import dlight as dl

    class InOrderFloatReduction(dl.gpu.Fallback):
        def apply(self, func, target, tunable):  # noqa: D102 - dlight hook
            if not isinstance(func, tirx.PrimFunc) or not has_float_reduction(func):
                return None
            try:
                sch = dl.gpu.Matmul().apply(func, target, tunable)
                if sch is not None and not isinstance(sch, list) and keeps_order(sch):
                    return sch
                sch = in_order_schedule(func)
            except Exception as exc:  # noqa: BLE001 - a shape neither schedule takes
                logger.debug("in-order schedule declined: %s", exc)
                sch = None
            return sch if sch is not None else super().apply(func, target, tunable)

    return InOrderFloatReduction()


__all__ = ["cos", "exp", "has_float_reduction", "in_order_float_reduction", "in_order_schedule", "keeps_order",
           "layer_norm", "legalize_pass", "log", "log_softmax", "separate_multiply_add_pass", "sigmoid", "sin",
           "softmax", "tanh"]
