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
from qcompile.targets.tvm.executors.static_c.arena import lifetimes, plan_arena, plan_with_workspace, workspace_buffer
from qcompile.targets.tvm.executors.static_c.build import ProcessRunner, build_entries, memory_facts
from qcompile.targets.tvm.executors.static_c.codegen import BuiltKernels, build_kernels
from qcompile.targets.tvm.executors.static_c.emit_c import ENTRIES, byte_array, c_str, emit, model_c, model_h
from qcompile.targets.tvm.executors.static_c.lower import lower_static
from qcompile.targets.tvm.executors.static_c.program import (ALIGN, KERNEL_OPT_LEVEL, KERNEL_PREFIX, RUNTIME_DIR,
                                                           ArenaPlan, Buffer, StaticProgram, Step, View, align_up)
from qcompile.targets.tvm.executors.static_c.run import (SharedModel, pack_inputs, profile_shared, run_static,
                                                       unpack_outputs)

__all__ = ["ALIGN", "BuiltKernels", "ENTRIES", "KERNEL_OPT_LEVEL", "KERNEL_PREFIX", "RUNTIME_DIR", "ArenaPlan", "Buffer",
           "ProcessRunner", "SharedModel", "build_entries", "byte_array", "memory_facts",
           "StaticProgram", "Step", "View", "align_up", "build_kernels", "c_str", "emit", "lifetimes", "lower_static",
           "model_c", "model_h", "pack_inputs", "plan_arena", "plan_with_workspace", "profile_shared", "run_static",
           "unpack_outputs", "workspace_buffer"]
