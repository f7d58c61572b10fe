"""Relax rewrites as module passes (:func:`relax_rewrite`), and the one the GPU targets run before legalization.

Scalar constants as one-element tensors (:func:`scalar_constants_as_tensors`), for the GPU targets: Relax's
legalization inlines a 0-d constant operand of an elementwise op into the kernel as an immediate, and a quantized
model's requantize epilogues are full of them
(multipliers, shifts, zero points, scales): every layer's kernels then differ by their constants alone and nothing
dedupes. As ``[1]`` tensors they stay kernel arguments, so the layers of a transformer share their kernels (SmolLM2:
159 kernels -> 21, each lowered by TVM, compiled by nvcc or the OpenCL driver once instead of per layer), and no float
constant reaches the OpenCL source as a printed literal. Only operands of ops whose result has a rank of one or more
are lifted, where broadcasting a ``[1]`` operand gives the result the same shape a 0-d one gives."""
from __future__ import annotations

import tvm
from tvm import relax

# elementwise ops with broadcasting: a [1] operand and a 0-d one give the same result when the result has rank >= 1
BROADCASTING = frozenset(f"relax.{op}" for op in (
    "add", "subtract", "multiply", "divide", "floor_divide", "power", "maximum", "minimum", "right_shift",
    "left_shift", "bitwise_and", "bitwise_or", "bitwise_xor", "equal", "not_equal", "less", "less_equal", "greater",
    "greater_equal", "where"))


def relax_rewrite(name: str, mutator_cls) -> tvm.transform.Pass:
    """Module pass: every Relax function of the module through ``mutator_cls`` (a ``relax.PyExprMutator`` made with
    ``@relax.expr_functor.mutator``, constructed with the module)."""
    @tvm.transform.module_pass(opt_level=0, name=name)
    def _pass(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        m = mutator_cls(mod)
        for gv, func in mod.functions_items():
            if isinstance(func, relax.Function):
                m.builder_.update_func(gv, m.visit_expr(func))
        return m.builder_.get()
    return _pass


def scalar_constants_as_tensors() -> tvm.transform.Pass:
    """Relax module pass (before legalization): every 0-d constant operand of a :data:`BROADCASTING` op whose result
    has rank >= 1 -> the same value as a ``[1]`` constant."""
    from tvm.relax import PyExprMutator, expr_functor

    @expr_functor.mutator
    class _Lift(PyExprMutator):
        def visit_call_(self, call):  # noqa: D102 - mutator hook
            call = super().visit_call_(call)
            if not (isinstance(call.op, tvm.ir.Op) and call.op.name in BROADCASTING):
                return call
            if getattr(call.ty, "ndim", -1) < 1:
                return call
            lifted = [relax.const(a.value.numpy().reshape(1), str(a.ty.dtype))
                      if isinstance(a, tvm.ir.GenericConst) and a.ty.ndim == 0 else a for a in call.args]
            if all(x.same_as(a) for x, a in zip(lifted, call.args)):
                return call
            return relax.Call(call.op, lifted, call.attrs, call.ty_args)

    return relax_rewrite("QcompileScalarConstantsAsTensors", _Lift)


def _cumsum_te(x, axis: int, dtype: str):
    """Zeros added for k > j rather than a reduction predicate (``where=``), which dlight's GPU rules drop."""
    from tvm import te, tirx

    n = x.shape[axis]
    k = te.reduce_axis((0, n), "k")

    def value(*idx):
        src = list(idx)
        src[axis] = k
        return te.sum(tirx.if_then_else(k <= idx[axis], x(*src).astype(dtype), tirx.const(0, dtype)), axis=k)
    return te.compute(x.shape, value, name="cumsum")


def cumsum_as_reduction() -> tvm.transform.Pass:
    """Relax module pass (GPU targets, before TVM's sort/scan dispatch): an inclusive ``relax.cumsum`` as one
    reduction kernel, ``y[.., j, ..] = sum(x[.., k, ..] for k <= j)``. TVM's GPU scan allocates a workspace and loops
    over launches on the host, which the generated host program does not do; the scans models hold are short
    (RoBERTa's position ids: a cumsum of the attention mask over the sequence). Each output is one reduction in
    index order, so a float sum adds what the reference's sequential scan adds, in the same order, then zeros."""
    from tvm.relax import PyExprMutator, expr_functor

    @expr_functor.mutator
    class _Scan(PyExprMutator):
        def visit_call_(self, call):  # noqa: D102 - mutator hook
            call = super().visit_call_(call)
            if not (isinstance(call.op, tvm.ir.Op) and call.op.name == "relax.cumsum") or call.attrs.exclusive:
                return call
            x = call.args[0]
            if x.ty.shape is None or call.attrs.axis is None:
                return call
            axis = int(call.attrs.axis) % x.ty.ndim
            dtype = str(call.attrs.dtype or x.ty.dtype) or str(x.ty.dtype)
            return self.builder_.call_te(_cumsum_te, x, axis, dtype, primfunc_name_hint="cumsum")

    return relax_rewrite("QcompileCumsumAsReduction", _Scan)


def _topk_rank_te(x, axis: int, largest: bool):
    """``rank[i] = #{r : x[r] before x[i]}``, ties to the lower index (ONNX's order, the reference's): a permutation of
    ``0..n-1`` along ``axis``. Zeros added under ``if_then_else`` rather than a reduction predicate, which dlight's GPU
    rules drop."""
    from tvm import te, tirx

    r = te.reduce_axis((0, x.shape[axis]), "r")
    one, zero = tirx.const(1, "int32"), tirx.const(0, "int32")

    def rank(*idx):
        src = list(idx)
        src[axis] = r
        xi, xr = x(*idx), x(*src)
        ahead = xr > xi if largest else xr < xi
        return te.sum(tirx.if_then_else(tirx.Or(ahead, tirx.And(xr == xi, r < idx[axis])), one, zero), axis=r)
    return te.compute(x.shape, rank, name="topk_rank")


def _topk_index_te(ranks, k: int, axis: int, dtype: str):
    """``index[j]``: the ``i`` with ``rank[i] = j`` (a sum over ``i`` with one non-zero term), for ``j < k``."""
    from tvm import te, tirx

    i = te.reduce_axis((0, ranks.shape[axis]), "i")
    shape = [k if d == axis else ranks.shape[d] for d in range(len(ranks.shape))]

    def index(*idx):
        src = list(idx)
        src[axis] = i
        return te.sum(tirx.if_then_else(ranks(*src) == idx[axis], i.astype(dtype), tirx.const(0, dtype)), axis=i)
    return te.compute(shape, index, name="topk_index")


def topk_as_ranks() -> tvm.transform.Pass:
    """Relax module pass (every TVM target, before TVM's sort/scan dispatch): ``relax.topk`` with a static extent
    along its axis as two reductions (:func:`_topk_rank_te`, :func:`_topk_index_te`) and Relax's ``gather_elements``,
    three kernels.
    TVM's GPU TopK sorts in a host loop of kernel launches over workspaces it allocates, which the generated host
    program does not run (RT-DETR's choice of encoder proposals was declined on tvm-opencl and tvm-cuda); its CPU
    TopK calls a sort in TVM's C++ runtime, which firmware and the static executor do not have (declined on the
    MCUs, tvm-aarch64 and tvm-hexagon; tvm-x86 fell back to the Relax VM). ``O(n^2)`` comparisons, every one
    independent: meant for the few thousand candidates per row a detector ranks, not for sorting a long axis."""
    from tvm.relax import PyExprMutator, expr_functor

    @expr_functor.mutator
    class _TopK(PyExprMutator):
        def visit_call_(self, call):  # noqa: D102 - mutator hook
            call = super().visit_call_(call)
            if not (isinstance(call.op, tvm.ir.Op) and call.op.name == "relax.topk"):
                return call
            x = call.args[0]
            shape = getattr(x.ty, "shape", None)
            if shape is None or x.ty.ndim < 1:
                return call
            axis = int(call.attrs.axis) % x.ty.ndim
            n, k = shape[axis], int(call.attrs.k)
            if not isinstance(n, tvm.tirx.IntImm) or not 0 < k <= int(n):
                return call
            # three kernels: an intermediate inside one would be a workspace the host program does not allocate
            ranks = self.builder_.emit(self.builder_.call_te(_topk_rank_te, x, axis, bool(call.attrs.largest),
                                                             primfunc_name_hint="topk_rank"))
            indices = self.builder_.emit(self.builder_.call_te(_topk_index_te, ranks, k, axis,
                                                               str(call.attrs.dtype), primfunc_name_hint="topk_index"))
            ret = str(call.attrs.ret_type)
            if ret == "indices":
                return indices
            values = relax.op.gather_elements(x, indices, axis)
            return values if ret == "values" else relax.Tuple([self.builder_.emit(values), indices])

    return relax_rewrite("QcompileTopkAsRanks", _TopK)


def _unit_reduction_as_spatial(block):
    """``block`` unchanged, or, where it is a reduction whose reduction iterators all have extent 1, the same
    computation as a spatial block: its update with the read of its own output replaced by the init value (``max(init,
    x)``, ``init + x``: exactly what the init and the one update store), no init, the reduction iterators data-parallel
    (still bound to their unit loops)."""
    import tvm_ffi
    from tvm import tirx
    from tvm.s_tir.stmt import SBlock

    init, body = block.init, block.body
    reduce = [iv for iv in block.iter_vars if iv.iter_type == tirx.IterVar.CommReduce]
    if (init is None or not reduce or not isinstance(init, tirx.BufferStore) or not isinstance(body, tirx.BufferStore)
            or not init.buffer.same_as(body.buffer)
            or any(not isinstance(iv.dom.extent, tirx.IntImm) or int(iv.dom.extent) != 1 for iv in reduce)):
        return block
    out = body.buffer

    def own_read(load):
        if load.source.same_as(out) and len(load.indices) == len(body.indices) and all(
                tvm_ffi.structural_equal(a, b) for a, b in zip(load.indices, body.indices)):
            return init.value
        return load

    value = tvm_ffi.structural_map(body.value, [(tvm.ir.expr.TensorLoad, own_read)])
    iter_vars = [tirx.IterVar(iv.dom, iv.var, tirx.IterVar.DataPar) if iv.iter_type == tirx.IterVar.CommReduce
                 else iv for iv in block.iter_vars]
    reads = [r for r in block.reads if not r.source.same_as(out)]
    annotations = {k: v for k, v in block.annotations.items() if k != "schedule_rule"}  # e.g. a pooling rule's
    return SBlock(iter_vars, reads, block.writes, block.name_hint, tirx.BufferStore(out, value, body.indices),
                  None, block.alloc_buffers, block.match_buffers, annotations)


def unit_reductions_as_spatial() -> tvm.transform.Pass:
    """TIR pass (on the fused kernels, before scheduling): every reduction block whose reduction iterators all have
    extent 1 (a 1x1 max pool with stride 2: Keras' ResNetV2 shortcut; a mean, a sum or a softmax over a unit axis)
    becomes a spatial block computing the same values. dlight's normalisation reports such a block as spatial while
    it keeps its init, and its inlining then moved the epilogue after a 1x1 pool into the pool's init and update:
    the update read its own uint8 output as the running max (ResNet50V2 on tvm-x86: 42 % of the tensors after the
    first such pool wrong, by up to 122 steps, every integer op still exact). As a spatial block every rule
    schedules it as the elementwise kernel it is."""
    import tvm_ffi
    from tvm.s_tir.stmt import SBlock

    @tvm.tirx.transform.prim_func_pass(opt_level=0, name="QcompileUnitReductionsAsSpatial")
    def _pass(func, _mod, _ctx):
        return tvm_ffi.structural_map(func, [(SBlock, _unit_reduction_as_spatial)])
    return _pass


__all__ = ["BROADCASTING", "cumsum_as_reduction", "relax_rewrite", "scalar_constants_as_tensors",
           "unit_reductions_as_spatial"]
