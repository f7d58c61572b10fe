"""Hand-scheduled int8 kernels for x86 AVX512-VNNI (``vpdpbusd``), no tuning required.

:func:`vnni_transform` rewrites the true-integer linear ops that qcompile emits in Relax::

    R.nn.conv2d(x: u8[N,C,H,W], w: const i8[O,C,KH,KW], groups=1, NCHW/OIHW, out_dtype="int32")
    R.matmul(x: u8[..., M, K], w: const i8[K, N], out_dtype="int32")

into ``R.call_tir`` of PrimFuncs that are tiled, register-blocked and tensorized with a
16x4 u8·s8→i32 dot-product intrinsic (one ``vpdpbusd zmm`` per 16 output channels × 4
reduction elements). Everything else (depthwise/grouped conv, float ops, non-constant
weights, dynamic shapes, other layouts) is left untouched for the default lowering.

Where to call it
    On the Relax module *before* legalization, i.e. before ``tvm.compile`` /
    ``relax.build`` (whose default pipeline starts with ``LegalizeOps``)::

        mod = vnni_transform(mod, target)
        ex = tvm.compile(mod, target)

    After ``LegalizeOps`` the ops are already ``call_tir`` of generic TIR and nothing
    matches any more. Weights must be visible as constants (``relax.Constant`` or a var
    bound to one in the same function); run ``relax.transform.FoldConstant()`` first if
    they are computed from constants (e.g. a transposed initializer).

Weight packing
    Done once at compile time, in numpy, and re-embedded as a new constant:
    matmul ``[K, N] → [ceil(N/16), ceil(K/4), 16, 4]``, conv
    ``[O, C, KH, KW] → [ceil(O/16), ceil(C/4), KH, KW, 16, 4]``. Nothing is repacked per
    inference.

Shapes that do not divide
    Handled by zero-padding, never by falling back: the weight is zero-padded at compile
    time (N / O up to a multiple of 16, K / C up to a multiple of 4); the activation is
    zero-padded inside the kernel only when needed (matmul: K % 4 != 0 or M not a multiple
    of the row tile; conv: always, see below); results for padded rows/channels are
    computed into a small per-tile accumulator and simply not stored.

Conv2d strategy: NCHW[4c] blocked direct convolution (not implicit GEMM)
    The kernel first packs the u8 NCHW activation into ``[N, C/4, Hp, Wp, 4]`` (zero
    padded: channels to a multiple of 4, spatially for the conv's own ``padding`` and for
    the output-width tile), so the 4 reduction bytes of a pixel are contiguous and can be
    broadcast with one load. It then accumulates ``[ocb×16 channels] × [owb pixels]`` in
    registers over (C/4, KH, KW) and writes the tile straight back to NCHW int32. The
    pack is O(input) and needs no im2col buffer (which for 3x3 convs is 9× the input);
    the output stays NCHW so the surrounding Relax graph does not change.

    Two kernels, chosen per conv by :func:`rows_kernel_pays`: *channel lanes*
    (:func:`conv2d_vnni_primfunc`, 16 output channels per ``vpdpbusd``, one broadcast pixel
    quadruple) stores each output value to its own NCHW plane, one scalar at a time; *position
    lanes* (:func:`conv2d_vnni_rows_primfunc`, 16 output positions per ``vpdpbusd``, one
    broadcast weight quadruple; strided convs read phase planes of the input) stores 16
    neighbouring outputs with one vector store. Measured on this repository's models
    (tools/tvm_bench.py): 1x1 convs 4-5x faster with position lanes (MobileNetV2-digits'
    kernels 0.108 -> 0.059 ms), ResNet-18's 7x7/2 stem 1.6 -> 0.9 ms; 3x3 convs on 7x7, 14x14
    and 28x28 maps stay faster with channel lanes (7x7: 0.53 vs 0.67 ms, 49 positions fill 64 lanes).

    Both kernels, and the matmul, are ``kOutEWiseFusable``: the requantize chain after them is fused into
    the same PrimFunc and runs inside the output-tile loop (:mod:`~..x86_epilogue`).

Bit-exactness
    ``vpdpbusd`` accumulates u8·s8 products in int32 without intermediate saturation, so
    results equal numpy's int32 reference (TVM's ``dot_16x4_avx512`` fallback, built on
    ``vpmaddubsw``, saturates to int16 and is *not* used here).

LLVM note
    LLVM ≥ 22 changed ``llvm.x86.avx512.vpdpbusd.512`` to take ``<64 x i8>`` operands;
    TVM 0.27's registered ``dot_16x4_vnni`` still passes ``<16 x i32>`` and fails LLVM
    module verification. This module registers its own intrinsic and picks the operand
    form by probing the bundled LLVM once.
"""
from qcompile.targets.tvm.kernels.x86_vnni.intrin import VNNI, VNNI_INTRIN, DotIsa, host_mcpu, target_has_vnni
from qcompile.targets.tvm.kernels.x86_vnni.kernels import (ConvTile, MatmulTile, conv2d_out_hw, conv2d_vnni_primfunc,
                                                           matmul_vnni_primfunc, pack_conv2d_weight,
                                                           pack_matmul_weight, vector_rows)
from qcompile.targets.tvm.kernels.x86_vnni.rewrite import vnni_transform
from qcompile.targets.tvm.kernels.x86_vnni.rows import (RowsGeometry, RowsTile, conv2d_rows_geometry,
                                                        conv2d_vnni_rows_primfunc, pack_conv2d_rows_weight,
                                                        rows_kernel_pays)

__all__ = ["VNNI", "VNNI_INTRIN", "ConvTile", "DotIsa", "MatmulTile", "RowsGeometry", "RowsTile",
           "conv2d_out_hw", "conv2d_rows_geometry", "conv2d_vnni_primfunc", "conv2d_vnni_rows_primfunc", "host_mcpu",
           "matmul_vnni_primfunc", "pack_conv2d_rows_weight", "pack_conv2d_weight", "pack_matmul_weight",
           "rows_kernel_pays", "target_has_vnni", "vector_rows", "vnni_transform"]
