"""A quantized ConvTranspose (w8a8 quantizes it for every TVM target) on each of them: lowered to the integer Conv
it equals (lowering.transposed_as_conv), so each target's own Conv kernels run it (VNNI, NEON dot products, SMLAD,
HVX, the OpenCL tiles), bit-exact with the integer reference, main build included. A U-Net-style decoder: two upsampling
ConvTransposes (stride 2, one with output_padding), concatenated skips, a 1x1 head."""
from __future__ import annotations

import numpy as np
import pytest
from onnx import helper

import helpers
import qcompile
from helpers import init, make, vi

pytest.importorskip("tvm", reason="the tvm extra is part of the CI install")

def decoder():
    rng = np.random.default_rng(0)

    shapes = [(8, 3, 3, 3), (16, 8, 3, 3), (16, 8, 2, 2), (16, 8, 3, 3), (4, 8, 1, 1)]
    ws = [init(f"w{i}", (rng.standard_normal(s) * 0.3).astype(np.float32)) for i, s in enumerate(shapes)]
    nodes = [
        helper.make_node("Conv", ["x", ws[0].name], ["a0"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["a0"], ["a"]),
        helper.make_node("Conv", ["a", ws[1].name], ["b0"], pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Relu", ["b0"], ["b"]),
        helper.make_node("ConvTranspose", ["b", ws[2].name], ["u"], strides=[2, 2], name="up_k2"),
        helper.make_node("Concat", ["u", "a"], ["ua"], axis=1),
        helper.make_node("ConvTranspose", ["ua", ws[3].name], ["v"], strides=[2, 2], pads=[1, 1, 1, 1],
                         output_padding=[1, 1], name="up_k3"),
        helper.make_node("Relu", ["v"], ["vr"]),
        helper.make_node("Conv", ["vr", ws[4].name], ["y"]),
    ]
    return make(nodes, [vi("x", [1, 3, 12, 12])], [vi("y", [1, 4, 24, 24])], ws)


@pytest.mark.parametrize("target", ["tvm-x86", "tvm-aarch64", "mcu-cortex-m4", "tvm-hexagon", "tvm-opencl"])
def test_conv_transpose_is_integer_and_bit_exact(target, tmp_path):
    rng = np.random.default_rng(1)
    calib = {"x": rng.standard_normal((8, 3, 12, 12)).astype(np.float32)}
    art = qcompile.compile(decoder(), calib=calib, recipe="w8a8", target=target, out_dir=tmp_path, max_samples=2,
                           measure_latency=False)
    qdq = [p for p in art.report["passes"] if p["pass"] == "insert_qdq"][0]
    # w8a8 leaves ConvTranspose float for ONNX Runtime (no integer kernel there); a TVM target adds it
    assert "ConvTranspose" in qdq["config"]["compute_ops"] and not qdq["declined"], qdq
    lsb = art.report["lsb_vs_reference"][target]
    assert "error" not in lsb, lsb
    # one float -> integer border (the input): both ConvTransposes run as integer Convs
    assert lsb["borders"] == 1 and lsb["integer_ops_exact"], {k: v for k, v in lsb.items() if k != "tensors"}
    assert lsb["max_lsb"] == 0 and lsb["equal"] == 1.0
    helpers.assert_main_build_equal(lsb)
    assert art.report["outputs"]["y"]["sqnr_db"] > 25, art.report["outputs"]
