"""Static C executor for TVM-compiled Relax models: no TVM runtime, no malloc.

A Relax module is lowered (LegalizeOps -> FuseOps -> FuseTIR -> RewriteDataflowReshape) to a fixed
list of steps ``kernel(in..., out...)`` over named tensor views. Each view points into one storage
buffer: a model input or output (user memory), a constant (``static const`` array), or an
intermediate placed in ONE static arena by a greedy best-fit planner (TFLM GreedyMemoryPlanner
style). Reshapes that ``RewriteDataflowReshape`` turns into ``R.reshape`` are aliases (a second
view on the same buffer); the others stay copy kernels.

The kernels are TVM's own LLVM output for the target triple (``kernels.o``); each PrimFunc is
exported with TVM's packed ABI as ``__tvm_ffi_<symbol>(self, TVMFFIAny *args, n, result)`` where
every argument is a ``DLTensor*`` (type index 7). ``runtime/qc_runtime.c`` supplies the few symbols
the kernels call (error setters, ``TVMBackendAllocWorkspace`` as a LIFO bump allocator in a static
buffer sized from the lowered TIR). Every data pointer must be ``ALIGN`` (64) aligned: TVM's
codegen declares its buffer pointers ``align 64``.
"""
from __future__ import annotations

import json
import logging
import platform
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from qcompile.errors import TargetError
from qcompile.ir import atomic_write

logger = logging.getLogger(__name__)

ALIGN = 64
KERNEL_PREFIX = "qcm_"
FFI_SYMBOL_PREFIX = "__tvm_ffi_"
RUNTIME_DIR = Path(__file__).parent / "runtime"
DL_CODES = {"int": 0, "uint": 1, "float": 2, "bfloat": 4, "bool": 6}
# LLVM opt level for the kernels unless the target names an "opt-level". TVM's default (3) fully
# unrolls every small constant-trip loop; a fused kernel (matmul + a dozen elementwise stages, each
# a loop nest over its own intermediate) then becomes one straight-line function of ~40k IR
# instructions, and the backend (scheduling, register allocation) is superlinear in that: the ViT's
# fused MLP kernels took 10-14 s each for aarch64. At 2 the loops stay loops (still vectorized),
# the whole ViT builds in ~2 s and the object is half the size (zoo CNN/ViT outputs bit-identical
# to the opt-level 3 build: neither level reassociates floats).
KERNEL_OPT_LEVEL = 2


def _align(n: int, a: int = ALIGN) -> int:
    return (n + a - 1) // a * a


@dataclass(frozen=True)
class View:
    """One DLTensor: a shape/dtype view on a storage buffer."""

    name: str
    buffer: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


@dataclass
class Buffer:
    """Storage: kind is 'input', 'output', 'const' or 'arena'; index is the I/O position."""

    name: str
    nbytes: int
    kind: str
    index: int = -1
    value: np.ndarray | None = None


@dataclass(frozen=True)
class Step:
    """``kind='kernel'``: call ``symbol(*args)`` (inputs then outputs); ``'copy'``: args = (src, dst)."""

    kind: str
    symbol: str
    args: tuple[str, ...]
    n_out: int = 1


@dataclass(frozen=True)
class ArenaPlan:
    offsets: dict[str, int]
    arena_bytes: int
    lower_bound: int
    align: int


@dataclass
class StaticProgram:
    tir_mod: object  # tvm.IRModule of PrimFuncs, global_symbol = Step.symbol
    views: dict[str, View]
    buffers: dict[str, Buffer]
    steps: list[Step]
    inputs: list[str]  # view names, model order
    outputs: list[str]
    input_names: list[str]
    output_names: list[str]
    plan: ArenaPlan = field(default_factory=lambda: ArenaPlan({}, 0, 0, ALIGN))


# ----------------------------------------------------------------------------------- arena plan
def workspace_buffer(step: int) -> str:
    return f"__ws{step}"


def plan_with_workspace(program: StaticProgram, per_kernel: dict[str, int]) -> ArenaPlan:
    """Arena plan where each kernel's workspace is one more buffer, live during its step only."""
    sizes = {b.name: b.nbytes for b in program.buffers.values() if b.kind == "arena"}
    spans = lifetimes(program)
    for i, step in enumerate(program.steps):
        if step.kind == "kernel" and per_kernel.get(step.symbol, 0) > 0:
            sizes[workspace_buffer(i)] = per_kernel[step.symbol]
            spans[workspace_buffer(i)] = (i, i)
    return plan_arena(sizes, spans)


def lifetimes(program: StaticProgram) -> dict[str, tuple[int, int]]:
    """First (producing) and last (reading) step index of every arena buffer."""
    spans: dict[str, list[int]] = {}
    for i, step in enumerate(program.steps):
        for name in step.args:
            buf = program.views[name].buffer
            if program.buffers[buf].kind == "arena":
                spans.setdefault(buf, []).append(i)
    return {b: (min(s), max(s)) for b, s in spans.items()}


RANDOM_ORDERS = 400  # extra seeded random orders tried when the greedy orders miss the liveness bound


def _place(order: list[str], sizes: dict[str, int], spans: dict[str, tuple[int, int]], align: int) -> dict[str, int]:
    """Best-fit placement in `order`: each buffer takes the smallest gap among lifetime-overlapping placed ones."""
    offsets: dict[str, int] = {}
    for buf in order:
        need = _align(sizes[buf], align)
        lo, hi = spans[buf]
        live = sorted(
            (offsets[o], _align(sizes[o], align)) for o in offsets if spans[o][0] <= hi and lo <= spans[o][1]
        )
        best, cur = None, 0
        for off, size in live:
            gap = off - cur
            if gap >= need and (best is None or gap < best[1]):
                best = (cur, gap)
            cur = max(cur, off + size)
        offsets[buf] = best[0] if best is not None else cur
    return offsets


def plan_arena(sizes: dict[str, int], spans: dict[str, tuple[int, int]], align: int = ALIGN) -> ArenaPlan:
    """Greedy best-fit (TFLM's GreedyMemoryPlanner) under a few orders: by size (TFLM's), by size x lifetime, by
    first use, by lifetime length, then seeded random orders while above the liveness bound; the smallest arena
    wins (ties: the first found). Deterministic."""
    def dur(b: str) -> int:
        return spans[b][1] - spans[b][0] + 1
    keys = [lambda b: (-_align(sizes[b], align), spans[b][0], b),
            lambda b: (-_align(sizes[b], align) * dur(b), spans[b][0], b),
            lambda b: (spans[b][0], -sizes[b], b),
            lambda b: (-dur(b), -sizes[b], b)]
    best: dict[str, int] | None = None
    arena = 0
    for key in keys:
        offsets = _place(sorted(sizes, key=key), sizes, spans, align)
        total = max((offsets[b] + _align(sizes[b], align) for b in offsets), default=0)
        if best is None or total < arena:
            best, arena = offsets, total
    steps = max((hi for _, hi in spans.values()), default=-1) + 1
    bound = max(
        (sum(_align(sizes[b], align) for b, (lo, hi) in spans.items() if lo <= s <= hi) for s in range(steps)),
        default=0,
    )
    rng = np.random.default_rng(0)  # seeded: the same model always gets the same plan
    names = sorted(sizes)
    for _ in range(RANDOM_ORDERS if arena > bound and len(names) <= 512 else 0):
        offsets = _place([names[i] for i in rng.permutation(len(names))], sizes, spans, align)
        total = max((offsets[b] + _align(sizes[b], align) for b in offsets), default=0)
        if total < arena:
            best, arena = offsets, total
            if arena == bound:
                break
    return ArenaPlan(best or {}, arena, bound, align)


# ------------------------------------------------------------------------------------ lowering
def lower_static(mod, target: dict, *, output_names: list[str] | None = None, schedule: list | None = None,
                 fast_math: bool = False) -> StaticProgram:
    """Lower a static-shape Relax module to kernel steps over planned buffers.

    ``output_names`` names the flattened outputs (Relax keeps none); default ``output``/``output<i>``.
    ``schedule``: the passes that schedule the fused kernels (default: the :class:`~.schedule.Epilogue` rule
    without parallel loops); they run after the fusion passes that :func:`~.schedule.fusion_passes` shares
    with the hosted pipeline, so tuning records and target-specific rules see the same kernels everywhere.
    ``fast_math``: TVM's fast exp/erf/tanh in float regions.
    """
    import tvm
    from tvm import relax

    from qcompile.targets.tvm.schedule import fusion_passes, schedule_pass

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
            if op == "relax.reshape":
                src = self.resolve(value.args[0])
                shape, dtype = _static_shape(b.var.ty, f"reshape {b.var.name}")
                self.env[b.var] = self.new_view(self.program.views[src].buffer, shape, dtype, b.var.name)
                return
            raise TargetError(f"static C: unsupported call {op} in main (packed/extern calls are not supported)")
        if isinstance(value, tvm.ir.Call):
            raise TargetError(f"static C: unsupported call to {value.op} in main")
        self.env[b.var] = self.resolve(value)


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


# ------------------------------------------------------------------------------------- kernels
def _canonical_triple(target: dict) -> dict:
    """``arch-none-eabi`` -> ``arch-unknown-none-eabi`` (LLVM's normalized form) for the kernel codegen.

    TVM hands ``mtriple`` to LLVM unnormalized, and LLVM parses the short bare-metal spelling positionally
    (vendor "none", OS "eabi", no environment): the target is then not AEABI, so soft-float helpers get their
    GNU names (``__floatdisf``, ``__muldf3``) and, under ``mfloat-abi=hard``, the VFP calling convention. libgcc
    implements those helpers with the base AAPCS (result in r0) even in its hard-float multilib, so e.g. an
    int64 -> float32 cast read its result from s0: the Cortex-M4 logits came out as zeros. Normalized, LLVM
    calls ``__aeabi_l2f`` & co. with the base AAPCS, as the run-time ABI requires.
    """
    parts = str(target.get("mtriple", "")).split("-")
    if len(parts) == 3 and parts[1] == "none":
        return {**target, "mtriple": f"{parts[0]}-unknown-none-{parts[2]}"}
    return target


def build_kernels(program: StaticProgram, target: dict, obj_path: Path, *, allow_parallel: bool = False) -> dict:
    """TVM TIR pipeline + LLVM codegen for ``target``; writes an object file, returns TIR facts.

    Mirrors ``tvm.tirx.build`` step by step so the lowered host TIR can be inspected for
    workspace allocations (sized statically here) and parallel loops (rejected unless ``allow_parallel``:
    hosted builds, where ``qc_runtime.c`` runs a parallel loop as one task).
    """
    import tvm
    import tvm_ffi
    from tvm.tirx.build import codegen_build, split_host_device_mods

    if isinstance(target, dict):
        target = _canonical_triple(target)
    tgt = tvm.target.Target(target)
    if tgt.kind.name != "llvm":
        raise TargetError(f"static C: target kind must be 'llvm', got {tgt.kind.name!r}")
    if "opt-level" not in tgt.attrs:
        tgt = tvm.target.Target({**target, "opt-level": KERNEL_OPT_LEVEL} if isinstance(target, dict)
                                else {**tgt.export(), "opt-level": KERNEL_OPT_LEVEL})
    # Bare metal: drop the packed-API argument asserts (type/shape/stride checks of every DLTensor, ~7 KB per kernel
    # on Thumb): the generated call sequence passes exactly the descriptors each kernel was compiled for.
    bare = "-none-" in str(target.get("mtriple", "") if isinstance(target, dict) else tgt.attrs.get("mtriple", ""))
    try:
        with tvm.transform.PassContext(config={"tirx.disable_assert": bare}):
            mod = tvm.tirx.transform.BindTarget(tgt.with_host(tgt))(program.tir_mod)
            pipeline, finalize_host, _ = tvm.tirx.get_default_tir_pipeline(tgt)
            host, devices = split_host_device_mods(pipeline(mod))
            if any(len(m.functions) for m in devices.values()):
                raise TargetError("static C: kernels need a device module; only CPU targets are supported")
            host = finalize_host()(host)
            rt_mod = codegen_build(host, tgt)
    except TargetError:
        raise
    except Exception as exc:
        raise TargetError(f"static C: TIR lowering/codegen failed for {target}: {exc}") from exc
    workspace: dict[str, int] = {}
    problems: list[str] = []
    for gv, func in host.functions.items():
        total = [0]

        def on_call(node, _name=gv.name_hint, _total=total) -> None:
            op = getattr(getattr(node, "op", None), "name", "")
            if op == "tirx.TVMBackendAllocWorkspace":
                size = node.args[2]
                if not hasattr(size, "value"):
                    problems.append(f"{_name}: workspace of dynamic size {size}")
                else:
                    _total[0] += _align(int(size.value))
            elif op in ("tirx.tvm_call_packed_lowered", "tirx.tvm_call_cpacked_lowered"):
                problems.append(f"{_name}: packed call {node.args[0]}")

        def on_for(node, _name=gv.name_hint) -> None:
            if not allow_parallel and int(node.kind) == int(tvm.tirx.ForKind.PARALLEL):
                problems.append(f"{_name}: parallel loop (needs TVMBackendParallelLaunch)")

        tvm_ffi.structural_walk(func, [(tvm.ir.Call, on_call), (tvm.tirx.For, on_for)])
        workspace[gv.name_hint] = total[0]
    if problems:
        raise TargetError("static C: unsupported kernel features: " + "; ".join(sorted(set(problems))))
    atomic_write(obj_path, lambda p: rt_mod.write_to_file(str(p)))
    # A kernel that synchronizes its tasks needs all of them running at once (qc_runtime.c: QC_TASKS_PER_THREAD).
    barrier = b"__TVMBackendParallelBarrier" in obj_path.read_bytes()
    return {"workspace_bytes": max(workspace.values(), default=0), "workspace_per_kernel": workspace,
            "parallel_barrier": barrier}


def _write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda p: p.write_text(text))


# ------------------------------------------------------------------------------------ C source
def _c_str(s: str) -> str:
    return json.dumps(s, ensure_ascii=True)


def _dl_dtype(dtype: str) -> str:
    import tvm_ffi

    d = tvm_ffi.dtype(dtype)
    return f"{{{int(d.type_code)}, {int(d.bits)}, {int(d.lanes)}}}"


def _io_tables(prog: StaticProgram, which: str) -> list[str]:
    views = prog.inputs if which == "input" else prog.outputs
    names = prog.input_names if which == "input" else prog.output_names
    lines = []
    for i, v in enumerate(views):
        dims = ", ".join(str(d) for d in prog.views[v].shape) or "0"
        lines.append(f"static const int64_t qc_{which}_shape_{i}[] = {{{dims}}};")
    n = max(len(views), 1)
    join = lambda xs: ", ".join(xs) or "0"  # noqa: E731
    lines += [
        f"const char *const qc_{which}_names[{n}] = {{{join(_c_str(x) for x in names)}}};",
        f"const char *const qc_{which}_dtypes[{n}] = {{{join(_c_str(prog.views[v].dtype) for v in views)}}};",
        f"const uint32_t qc_{which}_nbytes[{n}] = {{{join(str(prog.views[v].nbytes) for v in views)}}};",
        f"const int32_t qc_{which}_ndim[{n}] = {{{join(str(len(prog.views[v].shape)) for v in views)}}};",
        f"const int64_t *const qc_{which}_shapes[{n}] = "
        f"{{{join(f'qc_{which}_shape_{i}' for i in range(len(views)))}}};",
    ]
    return lines


def model_h(prog: StaticProgram, workspace_bytes: int) -> str:
    total = lambda vs: sum(_align(prog.views[v].nbytes) for v in vs)  # noqa: E731
    decl = []
    for which in ("input", "output"):
        decl += [
            f"extern const char *const qc_{which}_names[];",
            f"extern const char *const qc_{which}_dtypes[];",
            f"extern const uint32_t qc_{which}_nbytes[];",
            f"extern const int32_t qc_{which}_ndim[];",
            f"extern const int64_t *const qc_{which}_shapes[];",
        ]
    return "\n".join([
        "/* Generated by qcompile (static C executor). Do not edit. */",
        "#ifndef QC_MODEL_H_", "#define QC_MODEL_H_", "#include <stdint.h>", "",
        f"#define QC_NUM_INPUTS {len(prog.inputs)}",
        f"#define QC_NUM_OUTPUTS {len(prog.outputs)}",
        f"#define QC_ALIGN {ALIGN} /* every input/output pointer must be QC_ALIGN-byte aligned */",
        f"#define QC_ARENA_BYTES {prog.plan.arena_bytes}u",
        f"#define QC_WORKSPACE_BYTES {workspace_bytes}u",
        f"#define QC_INPUTS_TOTAL_BYTES {total(prog.inputs)}u",
        f"#define QC_OUTPUTS_TOTAL_BYTES {total(prog.outputs)}u", "",
        *decl, "",
        "/* Runs the model once. Returns 0, or 1 + the index of the failing step. */",
        "int qc_model_run(const void *const *inputs, void *const *outputs);",
        "const char *qc_model_last_error(void);",
        "uint32_t qc_model_workspace_peak(void);",
        "#endif", "",
    ])


def _const_array(name: str, value: np.ndarray) -> str:
    data = np.ascontiguousarray(value).tobytes() or b"\0"
    rows = [",".join(map(str, data[i:i + 32])) for i in range(0, len(data), 32)]
    body = ",\n  ".join(rows)
    return f"static const uint8_t qc_{name}[{len(data)}] __attribute__((aligned({ALIGN}))) = {{\n  {body}}};"


def model_c(prog: StaticProgram, workspace: dict[str, int]) -> str:
    """model.c: tensors, constants, step tables and ``qc_model_run``; ``workspace`` is bytes per kernel."""
    out = ["/* Generated by qcompile (static C executor). Do not edit. */",
           "#include <string.h>", '#include "qc_runtime.h"', '#include "model.h"', ""]
    for symbol in sorted({s.symbol for s in prog.steps if s.kind == "kernel"}):
        out.append(f"int {FFI_SYMBOL_PREFIX}{symbol}(void *, const TVMFFIAny *, int32_t, TVMFFIAny *);")
    arena = max(prog.plan.arena_bytes, 1)
    out += ["", f"static uint8_t qc_arena[{arena}] __attribute__((aligned({ALIGN})));"]
    out += [_const_array(b.name, b.value) for b in prog.buffers.values() if b.kind == "const"]
    io_views: dict[tuple[str, int], list[str]] = {}
    for v in prog.views.values():
        buf = prog.buffers[v.buffer]
        dims = ", ".join(str(d) for d in v.shape) or "1"
        out.append(f"static int64_t qc_shape_{v.name}[] = {{{dims}}};")
        if buf.kind == "arena":
            data = f"(void *)(qc_arena + {prog.plan.offsets[buf.name]})"
        elif buf.kind == "const":
            data = f"(void *)qc_{buf.name}"
        else:
            data = "NULL"
            io_views.setdefault((buf.kind, buf.index), []).append(v.name)
        out.append(f"static DLTensor qc_t_{v.name} = {{{data}, {{1, 0}}, {len(v.shape)}, "
                   f"{_dl_dtype(v.dtype)}, qc_shape_{v.name}, NULL, 0}};")
    for i, step in enumerate(prog.steps):
        refs = ", ".join(f"&qc_t_{a}" for a in step.args)
        out.append(f"static DLTensor *const qc_step_{i}[] = {{{refs}}};")
    out += [""] + _io_tables(prog, "input") + _io_tables(prog, "output")
    out += ["#ifdef QC_PROFILE", f"static uint64_t qc_profile_ns[{max(len(prog.steps), 1)}];", "#endif"]
    out += ["", "const char *qc_model_last_error(void) { return qc_last_error(); }",
            "uint32_t qc_model_workspace_peak(void) { return qc_workspace_peak(); }", "",
            "int qc_model_run(const void *const *inputs, void *const *outputs) {"]
    for (kind, idx), names in sorted(io_views.items()):
        src = f"(void *)inputs[{idx}]" if kind == "input" else f"outputs[{idx}]"
        out += [f"  qc_t_{n}.data = {src};" for n in names]
    for i, step in enumerate(prog.steps):
        if step.kind == "copy":
            src, dst = step.args
            out.append(f"  memcpy(qc_t_{dst}.data, qc_t_{src}.data, {prog.views[dst].nbytes});")
        else:
            ws = workspace_buffer(i)
            if ws in prog.plan.offsets:
                size = _align(workspace[step.symbol])
                out.append(f"  qc_workspace_reset(qc_arena + {prog.plan.offsets[ws]}, {size});")
            else:
                out.append("  qc_workspace_reset(NULL, 0);")
            out.append(f"  {{ QC_PROF_BEGIN(); if (qc_call_kernel({FFI_SYMBOL_PREFIX}{step.symbol}, qc_step_{i}, "
                       f"{len(step.args)}) != 0) return {i + 1}; QC_PROF_END({i}); }}")
    out += ["  return 0;", "}", "",
            "#ifdef QC_PROFILE",
            f"const uint32_t qc_num_steps = {len(prog.steps)};",
            "const uint64_t *qc_model_profile_ns(void) { return qc_profile_ns; }",
            "#endif", ""]
    return "\n".join(out)


# ----------------------------------------------------------------------------------- emit / run
_DEBIAN_PACKAGES = {
    "aarch64-linux-gnu-gcc": "gcc-aarch64-linux-gnu",
    "arm-none-eabi-gcc": "gcc-arm-none-eabi libnewlib-arm-none-eabi",
    "qemu-aarch64": "qemu-user",
}


def _require_tool(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pkg = _DEBIAN_PACKAGES.get(Path(tool).name, "")
        hint = f" (Debian/Ubuntu: apt-get install {pkg})" if pkg else ""
        raise TargetError(f"static C: {tool!r} not found on PATH{hint}")
    return path


ENTRIES = {"runner": ("runner.c", "runner"), "bare": ("bare_main.c", "model.elf"), "shared": (None, "model.so")}


def emit(program: StaticProgram, out_dir: Path, target: dict, *, cc: list[str], entry: str = "runner",
         threads: int = 1) -> dict:
    """Write kernels.o, model.c/.h and the runtime; link ``entry`` with ``cc`` (skipped if empty).

    ``entry`` is ``"runner"`` (hosted batch runner -> ``out_dir/runner``), ``"bare"`` (bare-metal smoke
    main -> ``out_dir/model.elf``) or ``"shared"`` (a shared library with the C API of ``model.h`` ->
    ``out_dir/model.so``, loaded in-process by :class:`SharedModel`; ``cc`` must build position-independent
    code, its kernels may keep parallel loops: run as one task, or on ``threads`` pool threads when ``cc`` defines
    QC_THREADS; every kernel's workspace is then sized for ``threads`` tasks allocating at once).
    """
    if entry not in ENTRIES:
        raise TargetError(f"static C: entry must be one of {sorted(ENTRIES)}, got {entry!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    facts = build_kernels(program, target, out_dir / "kernels.o", allow_parallel=entry == "shared")
    if threads > 1:
        facts["workspace_per_kernel"] = {k: v * threads for k, v in facts["workspace_per_kernel"].items()}
        facts["workspace_bytes"] *= threads
    ws = facts["workspace_bytes"]
    program.plan = plan_with_workspace(program, facts["workspace_per_kernel"])
    entry_c, binary_name = ENTRIES[entry]
    for name in ("qc_runtime.h", "qc_runtime.c", *([entry_c] if entry_c else [])):
        _write_text(out_dir / name, (RUNTIME_DIR / name).read_text())
    _write_text(out_dir / "model.h", model_h(program, ws))
    _write_text(out_dir / "model.c", model_c(program, facts["workspace_per_kernel"]))
    triple = str(target.get("mtriple", ""))
    const_bytes = sum(b.nbytes for b in program.buffers.values() if b.kind == "const")
    info = {
        "triple": triple,
        "inputs": [_io_meta(program, n, v) for n, v in zip(program.input_names, program.inputs)],
        "outputs": [_io_meta(program, n, v) for n, v in zip(program.output_names, program.outputs)],
        "steps": len(program.steps),
        "step_symbols": [s.symbol for s in program.steps],
        "arena_bytes": program.plan.arena_bytes,
        "arena_lower_bound": program.plan.lower_bound,
        "align": ALIGN,
        "workspace_bytes": ws,
        "workspace_per_kernel": facts["workspace_per_kernel"],
        "const_bytes": const_bytes,
        "binary": None,
    }
    if cc:
        _require_tool(cc[0])
        binary = out_dir / binary_name
        flags = ("-DQC_TASKS_PER_THREAD=1",) if facts["parallel_barrier"] else ()
        _link(cc, out_dir, [entry_c] if entry_c else [], binary.name, flags)
        info["binary"] = binary.name
        logger.info("static C: built %s", binary)
    _write_text(out_dir / "program.json", json.dumps(info, indent=2))
    return {**info, "out_dir": str(out_dir)}


def _link(cc: list[str], out_dir: Path, extra_sources: list[str], output: str, flags: tuple[str, ...] = ()) -> None:
    """``cc`` on the generated model.c, the runtime and kernels.o (plus ``extra_sources``) in ``out_dir``."""
    cmd = [*cc, *flags, "-I.", "model.c", "qc_runtime.c", *extra_sources, "kernels.o", "-lm", "-o", output]
    res = subprocess.run(cmd, cwd=out_dir, capture_output=True, text=True)
    if res.returncode != 0:
        raise TargetError(f"static C: link failed: {' '.join(cmd)}\n{res.stderr[-4000:]}")


def _io_meta(program: StaticProgram, name: str, view: str) -> dict:
    v = program.views[view]
    return {"name": name, "shape": list(v.shape), "dtype": v.dtype, "nbytes": v.nbytes}


def _launcher(triple: str) -> list[str]:
    arch = triple.split("-")[0]
    host = platform.machine().lower()
    if arch == host or (arch, host) in {("x86_64", "amd64"), ("aarch64", "arm64")}:
        return []
    if arch == "aarch64":
        return [_require_tool("qemu-aarch64")]
    raise TargetError(
        f"static C: cannot run a {triple!r} build here; only hosted aarch64 (qemu-aarch64) is supported "
        "(Cortex-M needs firmware for qemu-system-arm)"
    )


def pack_inputs(inputs: list[dict], samples, who: str) -> bytes:
    """Every sample's inputs (``inputs``: name, shape, dtype) as little-endian bytes, sample after sample."""
    chunks = []
    for k, sample in enumerate(samples):
        for meta in inputs:
            arr = _checked_input(meta, sample, f"{who}: sample {k}")
            chunks.append(np.ascontiguousarray(arr, dtype=np.dtype(meta["dtype"]).newbyteorder("<")).tobytes())
    return b"".join(chunks)


def _checked_input(meta: dict, sample: dict[str, np.ndarray], who: str) -> np.ndarray:
    """``sample``'s value for the input ``meta`` (name, shape), or one clear error."""
    if meta["name"] not in sample:
        raise TargetError(f"{who} lacks input {meta['name']!r}")
    arr = np.asarray(sample[meta["name"]])
    if list(arr.shape) != list(meta["shape"]):
        raise TargetError(f"{who} input {meta['name']!r} has shape {arr.shape}, built for {tuple(meta['shape'])}")
    return arr


def unpack_outputs(raw: bytes, outputs: list[dict], n: int, who: str) -> list[dict[str, np.ndarray]]:
    """The inverse for ``n`` samples of outputs (name, shape, dtype, nbytes)."""
    per_sample = sum(m["nbytes"] for m in outputs)
    if len(raw) != per_sample * n:
        raise TargetError(f"{who} wrote {len(raw)} bytes, expected {per_sample * n}")
    results, pos = [], 0
    for _ in range(n):
        outs = {}
        for meta in outputs:
            dtype = np.dtype(meta["dtype"]).newbyteorder("<")
            outs[meta["name"]] = np.frombuffer(raw[pos:pos + meta["nbytes"]], dtype=dtype).reshape(meta["shape"]).copy()
            pos += meta["nbytes"]
        results.append(outs)
    return results


def run_static(
    out_dir: Path, samples: list[dict[str, np.ndarray]], *, timeout: float = 300.0
) -> list[dict[str, np.ndarray]]:
    """Run the built runner once over all ``samples``; returns one dict of outputs per sample."""
    out_dir = Path(out_dir)
    try:
        info = json.loads((out_dir / "program.json").read_text())
    except (OSError, ValueError) as exc:
        raise TargetError(f"static C: no readable program.json in {out_dir}: {exc}") from exc
    if info.get("binary") != "runner":
        raise TargetError(f"static C: {out_dir} has no hosted runner (emit with cc=... and entry='runner')")
    data = pack_inputs(info["inputs"], samples, "static C")
    cmd = [*_launcher(info["triple"]), str(out_dir / "runner"), "-", "-"]
    try:
        res = subprocess.run(cmd, input=data, capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise TargetError(f"static C: runner timed out after {timeout}s") from exc
    if res.returncode != 0:
        raise TargetError(f"static C: runner failed ({res.returncode}): {res.stderr.decode(errors='replace')[-2000:]}")
    logger.info("static C: %s", res.stderr.decode(errors="replace").strip())
    return unpack_outputs(res.stdout, info["outputs"], len(samples), "static C: runner")


def _aligned_bytes(nbytes: int) -> np.ndarray:
    """A zeroed uint8 array of ``nbytes`` whose data pointer is ALIGN-aligned (the kernels assume it)."""
    raw = np.zeros(nbytes + ALIGN, np.uint8)
    off = (-raw.ctypes.data) % ALIGN
    return raw[off:off + nbytes]


class SharedModel:
    """A ``model.so`` (``emit(..., entry="shared")``) loaded into this process: one C call per sample.

    No TVM runtime and no per-inference allocation: inputs are copied into ALIGN-aligned buffers made once,
    the model writes its outputs into buffers made once, every intermediate lives in the library's static
    arena. The arena makes a loaded model non-reentrant: calls are serialized by a lock.
    """

    def __init__(self, out_dir: Path, library: Path | None = None, threads: int = 1) -> None:
        import ctypes
        import threading

        out_dir = Path(out_dir)
        try:
            info = json.loads((out_dir / "program.json").read_text())
        except (OSError, ValueError) as exc:
            raise TargetError(f"static C: no readable program.json in {out_dir}: {exc}") from exc
        if info.get("binary") != ENTRIES["shared"][1]:
            raise TargetError(f"static C: {out_dir} has no shared library (emit with entry='shared')")
        path = Path(library) if library is not None else out_dir / info["binary"]
        try:
            self._lib = ctypes.CDLL(str(path.resolve()))
        except OSError as exc:
            raise TargetError(f"static C: cannot load {path}: {exc}") from exc
        set_threads = getattr(self._lib, "qc_set_num_threads", None)  # absent from builds before threads existed
        if (set_threads is None and threads != 1) or (set_threads is not None and set_threads(int(threads)) != 0):
            raise TargetError(f"static C: {path} cannot run on {threads} threads (built without QC_THREADS?)")
        self.step_symbols: list[str] = info.get("step_symbols", [])
        self._run = self._lib.qc_model_run
        self._run.restype = ctypes.c_int
        self._run.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
        self._err = self._lib.qc_model_last_error
        self._err.restype = ctypes.c_char_p
        self.inputs, self.outputs = info["inputs"], info["outputs"]
        self._in = [_aligned_bytes(m["nbytes"]) for m in self.inputs]
        self._out = [_aligned_bytes(m["nbytes"]) for m in self.outputs]
        ptrs = ctypes.c_void_p * max(len(self._in), 1)
        self._in_ptrs = ptrs(*[b.ctypes.data for b in self._in])
        self._out_ptrs = (ctypes.c_void_p * max(len(self._out), 1))(*[b.ctypes.data for b in self._out])
        self._lock = threading.Lock()

    def __call__(self, sample: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with self._lock:
            for meta, buf in zip(self.inputs, self._in):
                buf.view(meta["dtype"])[...] = _checked_input(meta, sample, "static C: sample").reshape(-1)
            rc = self._run(self._in_ptrs, self._out_ptrs)
            if rc != 0:
                raise TargetError(f"static C: step {rc - 1} failed: {self._err().decode(errors='replace')}")
            return {m["name"]: buf.view(m["dtype"]).reshape(m["shape"]).copy()
                    for m, buf in zip(self.outputs, self._out)}


def profile_shared(out_dir: Path, cc: list[str], sample: dict[str, np.ndarray], runs: int = 20, threads: int = 1
                   ) -> list[tuple[str, float, int]]:
    """Per-kernel time of a shared build: model.c recompiled with ``-DQC_PROFILE`` (every step timed with
    CLOCK_MONOTONIC) into a temporary library. Returns (kernel, ms per inference, calls per inference), slowest
    first; copies are listed as ``memcpy``."""
    import ctypes

    out_dir = Path(out_dir)
    with tempfile.TemporaryDirectory(prefix="qc-prof-") as tmp:
        lib = Path(tmp) / "model_profile.so"
        _link(cc, out_dir, [], str(lib), flags=("-DQC_PROFILE",))
        model = SharedModel(out_dir, library=lib, threads=threads)
        model(sample)  # warm up, then reset the counters
        n = int(ctypes.c_uint32.in_dll(model._lib, "qc_num_steps").value)
        fn = model._lib.qc_model_profile_ns
        fn.restype = ctypes.POINTER(ctypes.c_uint64)
        counters = fn()
        for i in range(n):
            counters[i] = 0
        for _ in range(runs):
            model(sample)
        per_step = [counters[i] for i in range(n)]
    totals: dict[str, list] = {}
    for symbol, ns in zip(model.step_symbols, per_step):
        name = symbol[len(KERNEL_PREFIX):] if symbol.startswith(KERNEL_PREFIX) else symbol
        t = totals.setdefault(name, [0.0, 0])
        t[0] += ns / runs / 1e6
        t[1] += 1
    return sorted(((k, v[0], v[1]) for k, v in totals.items()), key=lambda r: -r[1])
