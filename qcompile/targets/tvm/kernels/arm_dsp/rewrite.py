"""The module rewrite: every fused kernel :func:`~.kernel.build_kernel` matches is replaced by its DSP version."""
from __future__ import annotations

import logging

import tvm
from tvm import relax, tirx

from qcompile.targets.tvm.kernels.arm_dsp.kernel import DspKernel, build_kernel

logger = logging.getLogger(__name__)


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
