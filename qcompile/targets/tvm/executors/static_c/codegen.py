"""Kernels: TVM's TIR pipeline and LLVM codegen into one object file, with the workspace each kernel allocates
(sized statically) and the features the static runtime cannot serve (dynamic workspaces, packed calls)."""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from qcompile.errors import TargetError
from qcompile.ir import atomic_write
from qcompile.targets.tvm.executors.static_c.program import (
    KERNEL_OPT_LEVEL,
    StaticProgram,
    align_up,
)

logger = logging.getLogger(__name__)


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


def _serial_parallel_loops(mod):
    """``mod`` with every parallel loop run serially, for a runtime without a thread pool (firmware, the DSP): the
    schedules never write one there, but kernels TVM builds without them (TOPI's ScatterElements, from its IR
    builder) do. A loop whose tasks meet at a barrier stays parallel (and is rejected: it needs every task at once)."""
    import tvm
    import tvm_ffi

    from qcompile.targets.tvm.kernels.hexagon_hvx import serial_loop

    def barrier(loop) -> bool:  # CodeGenCPU calls TVMBackendParallelBarrier at this pragma
        found = []
        tvm_ffi.structural_walk(loop.body, [(tvm.tirx.AttrStmt, lambda a: found.append(
            "parallel_barrier" in str(a.attr_key)))])
        return any(found)

    def visit(loop):
        if int(loop.kind) == int(tvm.tirx.ForKind.PARALLEL) and not barrier(loop):
            return serial_loop(loop)
        return loop

    return tvm.IRModule({gv: tvm_ffi.structural_map(f, [(tvm.tirx.For, visit)]) if isinstance(f, tvm.tirx.PrimFunc)
                         else f for gv, f in mod.functions.items()}, attrs=mod.attrs)


def build_kernels(program: StaticProgram, target: dict, obj_path: Path, *, allow_parallel: bool = False) -> dict:
    """TVM TIR pipeline + LLVM codegen for ``target``; writes an object file, returns TIR facts.

    Mirrors ``tvm.tirx.build`` step by step so the lowered host TIR can be inspected for
    workspace allocations (sized statically here) and parallel loops (rejected unless ``allow_parallel``:
    hosted builds, where ``qc_runtime.c`` runs a parallel loop as one task).
    """
    import tvm
    import tvm_ffi
    from tvm.tirx.build import codegen_build, split_host_device_mods

    from qcompile.targets.tvm.kernels.let_buffers import let_buffers_pass

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
            host = let_buffers_pass()(finalize_host()(host))
            if not allow_parallel:
                host = _serial_parallel_loops(host)
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
                    _total[0] += align_up(int(size.value))
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


# ------------------------------------------------------------------------------------- kernels shared by builds
@dataclasses.dataclass(frozen=True)
class BuiltKernels:
    """The kernels one build compiled: its module, its object file and their facts (``emit``'s, workspaces already
    sized for its threads). A later build of the same model (the probe after main: most kernels are the same, as
    the probe only keeps more intermediates) links this object instead of compiling them again."""

    mod: object
    obj: Path
    facts: dict


def _unnamed(func):
    return func.without_attr("global_symbol")


def share_kernels(program: StaticProgram, built: BuiltKernels) -> list[str]:
    """Points ``program``'s steps at ``built``'s kernels wherever the same kernel (structurally equal but for its
    name) is there, and leaves in ``program.tir_mod`` only the others, renamed where their name is taken in
    ``built``. Returns the symbols of ``built`` the program calls."""
    import tvm
    import tvm_ffi

    theirs: dict[int, list[tuple[str, object]]] = {}
    for gv, f in built.mod.functions.items():
        g = _unnamed(f)
        theirs.setdefault(tvm_ffi.structural_hash(g), []).append((gv.name_hint, g))
    taken = {gv.name_hint for gv in built.mod.functions}
    rename: dict[str, str] = {}
    own = {}
    for gv, f in program.tir_mod.functions.items():
        g = _unnamed(f)
        same = [name for name, h in theirs.get(tvm_ffi.structural_hash(g), []) if tvm_ffi.structural_equal(g, h)]
        if same:
            rename[gv.name_hint] = same[0]
            continue
        name = gv.name_hint
        while name in taken:
            name += "_probe"
        taken.add(name)
        rename[gv.name_hint] = name
        own[name] = f.with_attr("global_symbol", name)
    program.tir_mod = tvm.IRModule({tvm.ir.GlobalVar(n): f for n, f in own.items()})
    program.steps = [dataclasses.replace(s, symbol=rename.get(s.symbol, s.symbol)) if s.kind == "kernel" else s
                     for s in program.steps]
    return sorted({s.symbol for s in program.steps if s.kind == "kernel"} - set(own))
