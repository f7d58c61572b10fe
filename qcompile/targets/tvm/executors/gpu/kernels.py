"""Device kernels for a static program: TVM's TIR pipeline for a GPU target (OpenCL, CUDA), the kernels' source,
and every launch each step makes (kernel, arguments, grid and block extents), read from the lowered host TIR.

TVM's own pipeline runs with its packed-API passes switched off: each step's host function then keeps its buffer
parameters, and its body is the sequence of ``call_ffi_kernel(name, buffer data..., extents..., launch_params)``
that TVM's runtime would execute. Our host program (:mod:`.opencl`, :mod:`.cuda`) makes those launches itself,
with the arguments bound to the static program's buffers: no TVM runtime on the device side.
"""
from __future__ import annotations

import logging
import math
import re
from collections import OrderedDict
from dataclasses import dataclass

from qcompile.errors import TargetError
from qcompile.targets.tvm.executors.static_c.program import KERNEL_PREFIX, StaticProgram

logger = logging.getLogger(__name__)

# passes of TVM's TIR pipeline that turn each step into a packed function (and two that require them)
PACKED_API_PASSES = ["tirx.MakePackedAPI", "tirx.BF16StorageLegalize", "tirx.FP8StorageLegalize"]
# RemoveNoOp only drops statements that do nothing, and on a matmul tile with a long fused epilogue (SmolLM2's
# SwiGLU gate/up kernel with its requantizes: 13 s of which 9.7 s in RemoveNoOp, per kernel, 30 of them) it is
# most of TVM's lowering time
SKIPPED_PASSES = PACKED_API_PASSES + ["tirx.RemoveNoOp"]
DEVICE_KERNEL_LAUNCH = 2  # CallingConv::kDeviceKernelLaunch
_AXES = {"x": 0, "y": 1, "z": 2}
SYMBOL_CHARS = 40
_FLOAT_LITERAL = re.compile(r"(?<![\w.])\d\.\d{6}e[+-]\d{2,3}f?(?![\w.])")  # unsigned: a sign stays as printed


@dataclass(frozen=True)
class Arg:
    """A kernel argument: ``param`` (the step's argument index, a buffer) or a scalar ``value`` of ``dtype``."""

    dtype: str
    param: int = -1
    value: int | float = 0


@dataclass(frozen=True)
class Launch:
    kernel: str
    args: tuple[Arg, ...]
    grid: tuple[int, int, int]
    block: tuple[int, int, int]


@dataclass
class DeviceKernels:
    source: str                                 # the device module's source (OpenCL C or CUDA C)
    launches: dict[str, list[Launch]]           # step symbol -> its launches, in order
    kernel_params: dict[str, list[str]]         # kernel -> parameter dtypes ("handle" for pointers)

    @property
    def kernels(self) -> list[str]:
        return sorted(self.kernel_params)


def lower_kernels(program: StaticProgram, target: dict) -> DeviceKernels:
    """Run TVM's TIR pipeline for the GPU ``target`` (with its ``host``) on the program's scheduled kernels."""
    import tvm
    import tvm_ffi

    tgt = tvm.target.Target(target)
    # Short symbols named by content: TVM names a kernel after its fused ops (often > 255 characters, and an OpenCL
    # implementation may derive file names from it: POCL's kernel cache then fails to link it); equal kernels of
    # the main and probe builds get equal symbols, so the second build reuses the first one's lowering.
    short = {gv.name_hint: f"k{tvm_ffi.structural_hash(f) & 0xFFFFFFFF:08x}_"
                           f"{gv.name_hint[len(KERNEL_PREFIX):][:SYMBOL_CHARS]}"
             for gv, f in program.tir_mod.functions.items()}
    if len(set(short.values())) != len(short):  # two different kernels under one symbol: a 32-bit hash collision
        short = {name: f"{sym}_{i}" for i, (name, sym) in enumerate(short.items())}
    try:
        pipeline, _finalize_host, finalize_device = tvm.tirx.get_default_tir_pipeline(tgt)
        lowered_funcs: dict = {}
        for gv, f in program.tir_mod.functions.items():
            lowered_funcs.update(_lower_one(short[gv.name_hint], f, tgt, pipeline))
        lowered = tvm.IRModule(lowered_funcs)
        device = {gv: f for gv, f in lowered.functions.items()
                  if int(f.attrs.get("calling_conv", 0)) == DEVICE_KERNEL_LAUNCH}
        host = {gv.name_hint: f for gv, f in lowered.functions.items() if gv not in device}
        dev_target = tvm.target.Target({k: v for k, v in tgt.export().items() if k != "host"})
        dev_mod = finalize_device()(tvm.IRModule(device))
        source = tvm.target.codegen.build_module(dev_mod, dev_target).inspect_source()
        if tgt.kind.name == "opencl":
            source = exact_float_literals(source, _float_constants(dev_mod))
            # a * b + c rounded twice, as the reference computes it (qcompile.floatspec): OpenCL C lets a compiler
            # fuse it into one fma by default (POCL does, on CPUs with FMA)
            source = "#pragma OPENCL FP_CONTRACT OFF\n" + source
    except TargetError:
        raise
    except Exception as exc:  # TVM's own error types from C++ (e.g. a kernel left without thread bindings)
        raise TargetError(f"{tgt.kind.name}: TIR lowering/codegen failed: {exc}") from exc
    params = {gv.name_hint: [_param_dtype(p) for p in f.params] for gv, f in dev_mod.functions.items()}
    launches = {name: _launches(sym, host[sym], params) for name, sym in short.items() if sym in host}
    missing = sorted({s.symbol for s in program.steps if s.kind == "kernel"} - set(launches))
    if missing:
        raise TargetError(f"{tgt.kind.name}: no host function for steps {missing}")
    return DeviceKernels(source, launches, params)


_LOWERED: OrderedDict = OrderedDict()  # (target, symbol) -> (PrimFunc, its lowered functions), most recent last
_LOWERED_MAX = 1024


def _lower_one(symbol: str, func, tgt, pipeline) -> dict:
    """TVM's TIR pipeline (packed-API passes off) on one scheduled kernel: its host function and device kernels by
    GlobalVar; a kernel lowered before for the same target (structurally equal) is taken from the cache."""
    import tvm
    import tvm_ffi

    key = (str(tgt), symbol)
    hit = _LOWERED.get(key)
    if hit is not None and tvm_ffi.structural_equal(hit[0], func):
        _LOWERED.move_to_end(key)
        return hit[1]
    mod = tvm.tirx.transform.BindTarget(tgt)(tvm.IRModule({tvm.ir.GlobalVar(symbol):
                                                               func.with_attr("global_symbol", symbol)}))
    with tvm.transform.PassContext(disabled_pass=SKIPPED_PASSES):
        out = dict(pipeline(mod).functions.items())
    _LOWERED[key] = (func, out)
    while len(_LOWERED) > _LOWERED_MAX:
        _LOWERED.popitem(last=False)
    return out


def _float_constants(mod) -> set[tuple[str, float]]:
    import tvm
    import tvm_ffi

    found: set[tuple[str, float]] = set()
    for _gv, f in mod.functions.items():
        tvm_ffi.structural_walk(f, [(tvm.tirx.FloatImm, lambda n: found.add((str(n.ty), float(n.value))))])
    return found


def exact_float_literals(source: str, constants: set[tuple[str, float]]) -> str:
    """TVM's OpenCL codegen prints float constants as C++ ``std::scientific`` does, with six digits after the point:
    ``x / 3.921568e-03f`` for a quantization scale of 0.0039215683937072754 divides by another float, and inputs
    then round to other integers than the reference's. Every printed literal of a constant of the kernels is put
    back exactly, as a hexadecimal float literal (C99, OpenCL C); two constants that print alike are an error."""
    exact: dict[str, str] = {}
    for dtype, v in constants:
        if dtype not in ("float32", "float64") or not math.isfinite(v):
            continue
        suffix, v = ("f" if dtype == "float32" else ""), abs(v)
        printed = f"{v:.6e}{suffix}"
        literal = f"{float(v).hex()}{suffix}"
        if exact.get(printed, literal) != literal:
            raise TargetError(f"opencl: float constants {exact[printed]} and {literal} both print as {printed}")
        exact[printed] = literal
    return _FLOAT_LITERAL.sub(lambda m: exact.get(m.group(0), m.group(0)), source)


def _param_dtype(p) -> str:
    import tvm

    ty = p.ty
    if isinstance(ty, tvm.ir.PointerType):
        return "handle"
    if isinstance(ty, tvm.ir.PrimType):  # a scalar argument (an extent or an offset the kernel is passed)
        return str(ty.dtype)
    return "handle" if str(getattr(p, "dtype", "")) == "handle" else str(p.dtype)


def _launches(name: str, func, params: dict[str, list[str]]) -> list[Launch]:
    """The kernel launches of one step's host function; anything else there (a device allocation, a loop or a
    branch around launches, a dynamic extent) is declined with its reason."""
    import tvm
    import tvm_ffi
    from tvm import tirx

    key = lambda v: v.__chandle__()  # noqa: E731 - TIR vars by identity
    param_index = {key(p): i for i, p in enumerate(func.params)}
    # a step's buffer declared with a symbolic element offset (TOPI's ScatterElements passes it to its kernels): the
    # host program hands every kernel the buffer's own start (an OpenCL sub-buffer, a CUDA pointer into the arena)
    zero_offsets = {key(p.ty.elem_offset) for p in func.params
                    if isinstance(getattr(p.ty, "elem_offset", None), tirx.Var)}
    alias: dict = {}      # a declared buffer -> the buffer its data comes from
    problems: list[str] = []
    calls: list = []

    def on_decl(node) -> None:
        data = node.data
        if isinstance(data, tvm.ir.Call) and getattr(data.op, "name", "") == "tirx.buffer_data":
            alias[key(node.buffer)] = data.args[0]

    def on_alloc(node) -> None:
        problems.append(f"{name}: allocates {node.buffer} on the host side (a device workspace)")

    def on_for(node) -> None:
        problems.append(f"{name}: a host loop around kernel launches")

    def on_call(node) -> None:
        if getattr(node.op, "name", "") == "tirx.call_ffi_kernel":
            calls.append(node)

    tvm_ffi.structural_walk(func, [(tirx.DeclBuffer, on_decl), (tirx.AllocBuffer, on_alloc), (tirx.For, on_for),
                                   (tvm.ir.Call, on_call)])
    if problems:
        raise TargetError("; ".join(problems))

    def root(buf) -> int:
        for _ in range(64):
            if key(buf) in param_index:
                return param_index[key(buf)]
            if key(buf) not in alias:
                break
            buf = alias[key(buf)]
        raise TargetError(f"{name}: a kernel argument {buf} is not one of the step's buffers")

    out = []
    for call in calls:
        kernel = str(call.args[0].value) if hasattr(call.args[0], "value") else str(call.args[0])
        tags = [str(t) for t in call.attrs.launch_params]
        if kernel not in params:
            raise TargetError(f"{name}: launches {kernel}, which the device module lacks")
        n = len(params[kernel])
        values, extents = list(call.args[1:1 + n]), list(call.args[1 + n:])
        if len(extents) != len(tags):
            raise TargetError(f"{name}: {kernel} has {len(extents)} launch extents for tags {tags}")
        args = []
        for dtype, v in zip(params[kernel], values):
            if isinstance(v, tvm.ir.Call) and getattr(v.op, "name", "") == "tirx.buffer_data":
                args.append(Arg("handle", param=root(v.args[0])))
            elif isinstance(v, (tvm.tirx.IntImm, tvm.tirx.FloatImm)):
                args.append(Arg(dtype, value=v.value))
            elif isinstance(v, tirx.Var) and key(v) in zero_offsets:
                args.append(Arg(dtype, value=0))
            else:
                raise TargetError(f"{name}: {kernel} argument {v} is neither a buffer nor a constant")
        grid, block = [1, 1, 1], [1, 1, 1]
        for tag, ext in zip(tags, extents):
            if not isinstance(ext, tvm.tirx.IntImm):
                raise TargetError(f"{name}: {kernel} has a dynamic launch extent {tag}={ext}")
            scope, _, axis = tag.partition(".")
            if scope == "blockIdx" and axis in _AXES:
                grid[_AXES[axis]] = int(ext.value)
            elif scope == "threadIdx" and axis in _AXES:
                block[_AXES[axis]] = int(ext.value)
            else:
                raise TargetError(f"{name}: {kernel} needs launch parameter {tag} (dynamic shared memory)")
        out.append(Launch(kernel, tuple(args), tuple(grid), tuple(block)))
    if not out:
        raise TargetError(f"{name}: no kernel launch (a kernel without thread bindings stays on the host)")
    return out
