"""Cortex-M DSP-extension kernels: the int8 conv2d / matmul reductions as ``SMLAD`` on ``SXTB16`` pairs.

LLVM never forms ``SMLAD`` from TVM's scalar reductions: it emits one ``SMLABB`` per multiply-accumulate plus a byte
load per operand, ~3 instructions per MAC. This module applies CMSIS-NN's recipe inside TVM, as the Relax pass
list :func:`~...pipeline.mcu_phases` for :func:`~...executors.static_c.lower_static`'s ``schedule``. It runs after
fusion, so it sees the fused kernels ``epilogue(Σ_R u8(A) · s8(W))`` and rebuilds each matching one
(:func:`build_kernel`):

- the weight constant is repacked at compile time into ``[O, K]`` rows, ``K`` being the whole reduction (C·KH·KW
  for a conv, whose OIHW order already is that; a ``[K, N]`` matmul weight is transposed), zero-padded to whole
  32-bit words (``K % 4``, so there is no scalar tail loop) and to the 2-channel register tile;
- conv activations are made reduction-contiguous by an im2col of one register tile (2 output pixels × K, int16,
  CMSIS-NN's ``arm_nn_mat_mult_kernel_s8_s16`` layout): each int16 word then is a ready SMLAD operand, and each
  weight word (stored interleaved ``[w0, w2, w1, w3]``) becomes two operands with one ``SXTB16`` plain and one
  rotated by 8. The buffer is ``4·K`` bytes: on the stack below 1 KiB, else kernel workspace that static C plans
  into the arena (capped at :data:`MAX_COL_BYTES`);
- a matmul whose rows are contiguous reads its u8 activations in place: one 32-bit load, ``UXTB16`` plain and
  rotated unpack bytes 0,2 and 1,3 (weights the same way with ``SXTB16``, natural order);
- the reduction is tensorized (:data:`DSP_INTRIN_I16` / :data:`DSP_INTRIN`) under a 2 channels × 2 pixels tile:
  four accumulators in registers, each unpacked word used twice (~1.2 instructions per MAC); the fused kernel's
  requantization epilogue is grafted unchanged after each tile.

Integer results are bit-exact: products are u8 × s8 (|p| < 2^15) summed in int32 without saturation (``SMLAD`` only
sets the Q flag), equal to the reference in any summation order; padded weights are zeros.

Kernels that do not match keep :func:`~...schedules.rules.schedule_pass`: depthwise / grouped convs (every output
channel reduces over its own 9 inputs, so an im2col is not shared across channels and costs more than the scalar MACs it
saves), float reductions, non-constant weights.
"""
from qcompile.targets.tvm.kernels.arm_dsp.intrin import (
    DSP_INTRIN,
    DSP_INTRIN_I16,
    target_has_dsp,
)
from qcompile.targets.tvm.kernels.arm_dsp.kernel import DspKernel, build_kernel
from qcompile.targets.tvm.kernels.arm_dsp.rewrite import dsp_transform

__all__ = ["DSP_INTRIN", "DSP_INTRIN_I16", "DspKernel", "build_kernel", "dsp_transform", "target_has_dsp"]
