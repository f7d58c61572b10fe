"""tvm-cuda: the integer Relax module as CUDA kernels (TVM's CUDA codegen, dlight GPU schedules: shared-memory
tiling) and a generated host program (:mod:`.executors.gpu.cuda`), compiled by ``nvcc`` for sm_80 and sm_90 into
``model.so`` (in-process) and ``runner`` (a batch process). Builds on any machine with ``nvcc``; runs where a CUDA GPU
is (``tools/gpu_device.py`` times it there). Two builds, as every TVM target: ``tvm-cuda/main`` and
``tvm-cuda/probe`` (every integer tensor too, for the report).

No tensor-core code yet: dlight's int8 ``wmma`` path wants int8 activations (ours are uint8; the shift to int8 with
a corrected bias is exact) and every dimension over 64, and TVM 0.27 itself fails to build that path: a plain
``te`` int8 matmul 1024 x 384 x 384 for sm_90 through ``dlight.gpu.Matmul()`` and ``tvm.compile`` stops with
``Check failed: (it != fragment_info_.end())`` (a wmma fragment left untensorized, apache/tvm#14073's message).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

from qcompile.targets.tvm.executors.gpu.cuda import ARCHS, NVCC, emit_cuda
from qcompile.targets.tvm.frontend import program as frontend  # noqa: F401 - tests read meta through it
from qcompile.targets.tvm.gpu import GpuTarget

SUBDIR = "tvm-cuda"


class TvmCudaTarget(GpuTarget):
    name = "tvm-cuda"
    subdir = SUBDIR
    target = {"kind": "cuda", "arch": ARCHS[-1], "host": {"kind": "llvm"}}
    tools = (NVCC[0],)
    emit = staticmethod(emit_cuda)

    def meta_facts(self, main: dict) -> dict:
        return {"archs": main["archs"], "sass_kernels": {a: len(k) for a, k in main["sass_kernels"].items()}}

    def build(self, model: onnx.ModelProto, out_dir: Path, example: dict[str, np.ndarray] | None = None
              ) -> dict[str, str]:
        return {**super().build(model, out_dir, example), "tvm_library": f"{SUBDIR}/main/model.so"}
