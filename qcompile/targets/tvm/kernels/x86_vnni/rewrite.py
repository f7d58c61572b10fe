"""The Relax rewrite: every int8 conv2d / matmul / max_pool2d the lowering produces that a VNNI kernel serves becomes
a ``call_tir`` of it (weights packed as constants), op pattern chosen so its requantize epilogue fuses."""
from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import numpy as np
import tvm
from tvm import relax, tirx

from qcompile.targets.tvm.kernels.x86_vnni.intrin import (
    _CHAIN_DEPTH,
    _OP_PATTERN_OPAQUE,
    VNNI,
    DotIsa,
)
from qcompile.targets.tvm.kernels.x86_vnni.kernels import (
    conv2d_out_hw,
    conv2d_vnni_primfunc,
    matmul_vnni_primfunc,
    pack_conv2d_weight,
    pack_matmul_weight,
)
from qcompile.targets.tvm.kernels.x86_vnni.rows import (
    conv2d_rows_geometry,
    conv2d_vnni_rows_primfunc,
    pack_conv2d_rows_weight,
    rows_kernel_pays,
)

logger = logging.getLogger(__name__)



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

    def __init__(self, mod: tvm.IRModule, parallel: bool, isa: DotIsa = VNNI) -> None:
        super().__init__(mod)
        self._parallel = parallel
        self._isa = isa
        self._conv2d = tvm.ir.Op.get("relax.nn.conv2d")
        self._matmul = tvm.ir.Op.get("relax.matmul")
        self._pad = tvm.ir.Op.get("relax.nn.pad")
        self._max_pool = tvm.ir.Op.get("relax.nn.max_pool2d")
        self._kernels: dict[tuple, relax.GlobalVar] = {}
        self._fusable = True
        self._constant_vars: dict = {}  # var -> whether it is computed from constants only
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

    def _from_constants(self, expr: relax.Expr) -> bool:
        """Whether ``expr`` is computed from constants only (a learned query embedding tiled to the batch, say):
        ``FoldConstant`` evaluates such an op at build time on a generic host target, where a kernel built on this
        ISA's intrinsics does not compile (LLVM aborts on ``vpdpbusd`` without AVX-512). Left to the generic
        lowering, it is folded to a constant. Each bound var is decided once (iteratively: an embedding can pass
        through hundreds of ops)."""
        memo = self._constant_vars

        def reads(e: relax.Expr) -> tuple[list, bool]:  # the vars ``e`` reads; whether its other leaves are constant
            found, ok, todo = [], True, [e]
            while todo:
                x = todo.pop()
                if isinstance(x, relax.Var):
                    found.append(x)
                elif isinstance(x, relax.Tuple):
                    todo.extend(x.fields)
                elif isinstance(x, relax.Call) and isinstance(x.op, tvm.ir.Op):
                    todo.extend(x.args)
                elif not isinstance(x, (tvm.ir.expr.Constant, relax.ShapeExpr, relax.GlobalVar)):
                    ok = False
            return found, ok

        top, ok = reads(expr)
        if not ok:
            return False
        stack = list(top)
        while stack:
            v = stack[-1]
            if v in memo:
                stack.pop()
                continue
            bound = self.lookup_binding(v)
            deps, ok = reads(bound) if bound is not None else ([], False)
            pending = [d for d in deps if d not in memo] if ok else []
            if pending:
                stack.extend(pending)
                continue
            memo[v] = ok and all(memo[d] for d in deps)
            stack.pop()
        return all(memo[v] for v in top)

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
        if self._isa is VNNI and rows_kernel_pays(dshape, w.shape, strides, padding, dilation):
            return self._rows_conv2d(data, w, dshape, strides, padding, pad_value)
        key = ("conv2d", dshape, w.shape, strides, padding, dilation, pad_value)
        gvar = self._kernel(
            key,
            lambda: conv2d_vnni_primfunc(dshape, w.shape, strides, padding, dilation,
                                         parallel=self._parallel, pad_value=pad_value, isa=self._isa),
            f"qc_{self._isa.name}_conv2d",
        )
        packed = relax.const(pack_conv2d_weight(w, self._isa))
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
            key, lambda: matmul_vnni_primfunc(m, k, n, parallel=self._parallel, rows_shape=rows, isa=self._isa),
            f"qc_{self._isa.name}_matmul",
        )
        flat = data if len(dshape) == 2 else self.builder_.emit(relax.op.reshape(data, (m, k)))
        # the kernel writes the activation's shape where it can: no reshape between it and its epilogue
        out = relax.call_tir(gvar, [flat, relax.const(pack_matmul_weight(w, self._isa))],
                             relax.TensorType((*rows, n), "int32"))
        if len(rows) == len(dshape) - 1:
            return out
        return relax.op.reshape(self.builder_.emit(out), (*dshape[:-1], n))

    def _rewrite_max_pool(self, call: relax.Call) -> relax.Expr | None:
        """An integer NCHW max pool (dilation 1, floor mode) -> the two-pass kernel of :mod:`~..pool`."""
        from qcompile.targets.tvm.kernels.pool import POOL_DTYPES, max_pool2d_primfunc

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
        rewritable = (self._conv2d, self._matmul, self._max_pool)
        if any(call.op.same_as(op) for op in rewritable) and self._from_constants(call.args[0]):
            return call  # folded at build time, not a kernel
        if call.op.same_as(self._max_pool) and self._isa is VNNI:  # the separable pool is scheduled for x86
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
    mod: tvm.IRModule, target: tvm.target.Target, parallel: bool = True, stats: dict | None = None,
    isa: DotIsa = VNNI,
) -> tvm.IRModule:
    """Rewrite u8×s8→i32 conv2d (groups=1) / matmul with constant weights to VNNI kernels.

    Call on the Relax module before ``tvm.compile`` / ``relax.build`` (i.e. before
    ``LegalizeOps``). Returns ``mod`` unchanged when ``target`` lacks AVX512-VNNI.
    ``parallel`` marks the outer kernel loops parallel (thread count is then set at run
    time by ``TVM_NUM_THREADS``). ``stats`` (if given) receives ``rewritten`` (count) and ``declined`` (one line
    per integer conv2d / matmul left to the generic schedules). ``isa``: the dot-product instruction the kernels are
    built on (:data:`~.intrin.VNNI`, or another :class:`~.intrin.DotIsa` such as Hexagon's ``vrmpy``).
    """
    if not isa.available(target):
        logger.info("target %s has no %s; vnni_transform is a no-op", target, isa.name)
        if stats is not None:
            stats.update(rewritten=0, declined=[f"the target has no {isa.name}"])
        return mod
    rewriter = _VNNIRewriter(mod, parallel, isa)
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
