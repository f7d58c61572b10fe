"""Relax module -> static program: TVM's lowering to fused TIR kernels, then a walk over ``main`` that turns
every binding into a step over named views (reshapes become aliases)."""
from __future__ import annotations

import logging

import numpy as np
from qcompile.errors import TargetError
from qcompile.targets.tvm.executors.static_c.arena import lifetimes, plan_arena
from qcompile.targets.tvm.executors.static_c.program import (
    KERNEL_PREFIX,
    Buffer,
    StaticProgram,
    Step,
    View,
)

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------ lowering
def lower_static(mod, target: dict, *, output_names: list[str] | None = None, schedule: list | None = None,
                 fast_math: bool = False) -> StaticProgram:
    """Lower a static-shape Relax module to kernel steps over planned buffers.

    ``output_names`` names the flattened outputs (Relax keeps none); default ``output``/``output<i>``.
    ``schedule``: the passes that schedule the fused kernels (default: the :class:`~...schedules.rules.Epilogue` rule
    without parallel loops); they run after the fusion passes that :func:`~...schedules.rules.fusion_passes` shares
    with the hosted pipeline, so tuning records and target-specific rules see the same kernels everywhere.
    ``fast_math``: TVM's fast exp/erf/tanh in float regions.
    """
    import tvm
    from qcompile.targets.tvm.schedules.rules import fusion_passes, schedule_pass
    from tvm import relax

    if schedule is None:
        schedule = [schedule_pass(parallel=False)]
    tgt = tvm.target.Target(target)
    passes = [
        relax.transform.DecomposeOpsForInference(),
        *fusion_passes(tgt, fast_math),
        # inline epilogues: intermediates shrink, workspaces mostly vanish
        *schedule,
        relax.transform.RewriteDataflowReshape(),
        relax.transform.DeadCodeElimination(),
    ]
    try:
        with tgt:
            lowered = tvm.transform.Sequential(passes)(mod)
    except Exception as exc:  # TVM raises its own error types from C++
        raise TargetError(f"static C: Relax lowering failed: {exc}") from exc
    program = _walk_main(lowered)
    if output_names is not None:
        if len(output_names) != len(program.outputs):
            raise TargetError(f"static C: {len(output_names)} output names for {len(program.outputs)} outputs")
        program.output_names = list(output_names)
    sizes = {b.name: b.nbytes for b in program.buffers.values() if b.kind == "arena"}
    program.plan = plan_arena(sizes, lifetimes(program))
    logger.info(
        "static C: %d steps, arena %d B (lower bound %d B)",
        len(program.steps), program.plan.arena_bytes, program.plan.lower_bound,
    )
    return program


def _static_shape(ty, what: str) -> tuple[tuple[int, ...], str]:
    from tvm import relax

    if not isinstance(ty, relax.TensorType) or ty.shape is None or ty.dtype is None:
        raise TargetError(f"static C: {what} is not a tensor of known shape ({ty})")
    dims = []
    for d in getattr(ty.shape, "values", []) or []:
        if not hasattr(d, "value"):
            raise TargetError(f"static C: {what} has a dynamic shape {ty}; only static shapes are supported")
        dims.append(int(d.value))
    if len(dims) != ty.ndim:
        raise TargetError(f"static C: {what} has a dynamic shape {ty}")
    return tuple(dims), str(ty.dtype)


class _Walker:
    """Maps Relax values to views while walking ``main``'s bindings in order."""

    def __init__(self, mod) -> None:
        self.mod = mod
        self.program = StaticProgram(None, {}, {}, [], [], [], [], [])
        self.env: dict[object, object] = {}  # relax Var -> view name or list (tuple value)
        self.consts: list[tuple[object, str]] = []
        self.kernels: dict[str, object] = {}

    def new_view(self, buffer: str, shape, dtype: str, base: str) -> str:
        name = base
        k = 0
        while name in self.program.views:
            k += 1
            name = f"{base}_{k}"
        self.program.views[name] = View(name, buffer, tuple(shape), dtype)
        return name

    def new_buffer(self, base: str, shape, dtype: str, kind: str, value=None) -> str:
        name = base
        k = 0
        while name in self.program.buffers:
            k += 1
            name = f"{base}_{k}"
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        self.program.buffers[name] = Buffer(name, nbytes, kind, value=value)
        return self.new_view(name, shape, dtype, name)

    def resolve(self, expr):
        import tvm
        from tvm import relax

        if isinstance(expr, tvm.ir.GenericConst):
            for c, view in self.consts:
                if c.same_as(expr):
                    return view
            value = getattr(expr, "value", None)
            if not isinstance(value, tvm.runtime.Tensor):
                raise TargetError(f"static C: unsupported constant {expr}")
            arr = value.numpy()
            view = self.new_buffer(f"c{len(self.consts)}", arr.shape, str(arr.dtype), "const", arr)
            self.consts.append((expr, view))
            return view
        if isinstance(expr, relax.Tuple):
            return [self.resolve(f) for f in expr.fields]
        if isinstance(expr, relax.TupleGetItem):
            tup = self.resolve(expr.tuple_value)
            if not isinstance(tup, list):
                raise TargetError(f"static C: TupleGetItem on a non-tuple {expr}")
            return tup[int(expr.index)]
        if expr in self.env:
            return self.env[expr]
        raise TargetError(f"static C: unsupported expression {type(expr).__name__}: {expr}")

    def call_tir(self, var, call) -> object:
        from tvm import relax, tirx

        gv = call.args[0]
        func = self.mod[gv]
        if not isinstance(func, tirx.PrimFunc):
            raise TargetError(f"static C: call_tir target {gv.name_hint} is not a PrimFunc")
        if len(call.args) > 2:
            raise TargetError(f"static C: call_tir {gv.name_hint} passes symbolic tir_vars")
        ins = _flatten(self.resolve(call.args[1]))
        out_tys = list(var.ty.fields) if isinstance(var.ty, relax.TupleType) else [var.ty]
        outs = []
        for i, ty in enumerate(out_tys):
            shape, dtype = _static_shape(ty, f"output {i} of {gv.name_hint}")
            base = var.name if len(out_tys) == 1 else f"{var.name}_{i}"
            outs.append(self.new_buffer(base, shape, dtype, "arena"))
        symbol = KERNEL_PREFIX + gv.name_hint
        self.kernels[symbol] = func.with_attr("global_symbol", symbol)
        self.program.steps.append(Step("kernel", symbol, tuple(ins + outs), len(outs)))
        return outs if isinstance(var.ty, relax.TupleType) else outs[0]

    def binding(self, b) -> None:
        import tvm
        from tvm import relax

        value = b.value
        if isinstance(b, relax.MatchCast):
            raise TargetError(f"static C: match_cast is not supported ({b.var.name})")
        if isinstance(value, tvm.ir.Call) and isinstance(value.op, tvm.ir.Op):
            op = value.op.name
            if op == "relax.call_tir":
                self.env[b.var] = self.call_tir(b.var, value)
                return
            # TVM's GPU scan (DispatchSortScan: cumsum along the last axis, e.g. RoBERTa's position ids) reshapes
            # around its kernel with the VM's builtin: a view like relax.reshape
            if op == "relax.reshape" or (op == "relax.call_pure_packed" and _extern(value.args[0]) ==
                                         "vm.builtin.reshape"):
                src = self.resolve(value.args[0 if op == "relax.reshape" else 1])
                shape, dtype = _static_shape(b.var.ty, f"reshape {b.var.name}")
                self.env[b.var] = self.new_view(self.program.views[src].buffer, shape, dtype, b.var.name)
                return
            raise TargetError(f"static C: unsupported call {op} in main (packed/extern calls are not supported)")
        if isinstance(value, tvm.ir.Call):
            raise TargetError(f"static C: unsupported call to {value.op} in main")
        self.env[b.var] = self.resolve(value)


def _extern(func) -> str | None:
    """The symbol of an ``ExternFunc`` (a packed call's callee), else None."""
    from tvm import relax

    return str(func.global_symbol) if isinstance(func, relax.ExternFunc) else None


def _flatten(value) -> list[str]:
    if isinstance(value, list):
        return [v for item in value for v in _flatten(item)]
    return [value]


def _walk_main(mod) -> StaticProgram:
    from tvm import relax

    if "main" not in [gv.name_hint for gv in mod.functions]:
        raise TargetError("static C: module has no 'main' function")
    main = mod["main"]
    w = _Walker(mod)
    prog = w.program
    for i, param in enumerate(main.params):
        shape, dtype = _static_shape(param.ty, f"input {param.name}")
        view = w.new_buffer(f"in{i}", shape, dtype, "input")
        prog.buffers[prog.views[view].buffer].index = i
        w.env[param] = view
        prog.inputs.append(view)
        prog.input_names.append(param.name)
    body = main.body
    if not isinstance(body, relax.SeqExpr):
        raise TargetError("static C: main body is not a sequence of bindings")
    for block in body.blocks:
        for b in block.bindings:
            w.binding(b)
    outs = _flatten(w.resolve(body.body))
    for i, view_name in enumerate(outs):
        view = prog.views[view_name]
        buf = prog.buffers[view.buffer]
        if buf.kind == "arena" and buf.index < 0 and view.nbytes == buf.nbytes:
            buf.kind, buf.index = "output", i
            prog.outputs.append(view_name)
        else:  # output aliases an input, a constant or another output: copy it out
            dst = w.new_buffer(f"out{i}", view.shape, view.dtype, "output")
            prog.buffers[prog.views[dst].buffer].index = i
            prog.steps.append(Step("copy", "memcpy", (view_name, dst), 1))
            prog.outputs.append(dst)
        prog.output_names.append(f"output{i}" if len(outs) > 1 else "output")
    import tvm

    prog.tir_mod = tvm.IRModule({tvm.ir.GlobalVar(s): f for s, f in w.kernels.items()})
    return prog
