"""tvm-opencl: the integer Relax module as OpenCL C kernels (TVM's OpenCL codegen, dlight GPU schedules) and a
generated C host program (:mod:`.executors.gpu.opencl`): one planned device arena, kernels enqueued in order, no
TVM runtime. ``run`` executes the runner over a batch on the first OpenCL GPU, else the first device (POCL on
this machine's CPU: ``tools/setup`` installs it). Two builds, as every TVM target: ``tvm-opencl/main`` and
``tvm-opencl/probe`` (every integer tensor too, for the report's comparison with the integer reference).
"""
from __future__ import annotations

from qcompile.targets.tvm.executors.gpu.opencl import CC, emit_opencl
from qcompile.targets.tvm.frontend import program as frontend  # noqa: F401 - tests read meta through it
from qcompile.targets.tvm.gpu import GpuTarget

SUBDIR = "tvm-opencl"
TARGET = {"kind": "opencl", "host": {"kind": "llvm"}}


class TvmOpenclTarget(GpuTarget):
    name = "tvm-opencl"
    subdir = SUBDIR
    target = TARGET
    tools = (CC[0],)
    emit = staticmethod(emit_opencl)
