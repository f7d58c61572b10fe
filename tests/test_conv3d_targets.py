"""Volumetric / video convolutions (Conv with 3 spatial axes: 3-D U-Nets, R(2+1)D and X3D video models) quantized and
built for every TVM target as Relax conv3d on uint8 x int8 -> int32, bit-exact with the integer reference, main build
included. Before, each target declined the whole model ("QLinear Conv with 3 spatial dims is not lowered")."""
from __future__ import annotations

import helpers
import pytest
from onnx import helper

pytest.importorskip("tvm", reason="the tvm extra is part of the CI install")


def volume_net():
    """Strided SAME-padded conv, ReLU, then a grouped, dilated, explicitly padded conv with a bias."""
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", strides=[1, 2, 2], auto_pad="SAME_UPPER"),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["y"], name="conv2", group=2, dilations=[1, 2, 1],
                              pads=[1, 2, 0, 1, 2, 1])]
    inits = [helpers.init("w1", helpers.rand(8, 3, 3, 3, 3, scale=0.3)),
             helpers.init("w2", helpers.rand(6, 4, 3, 3, 2, scale=0.3)),
             helpers.init("b2", helpers.rand(6, scale=0.1))]
    return helpers.make(nodes, [helpers.vi("x", [1, 3, 4, 8, 8])], [helpers.vi("y", [1, 6, 4, 4, 4])], inits,
                        opset=17)


@pytest.mark.parametrize("target", ["tvm-x86", "tvm-aarch64", "mcu-cortex-m4", "tvm-hexagon", "tvm-opencl"])
def test_conv3d_is_integer_and_bit_exact(target, tmp_path):
    art, lsb = helpers.compile_exact(tmp_path, volume_net(), target)
    assert lsb["equal"] == 1.0
    helpers.assert_main_build_equal(lsb)
    qdq = next(p for p in art.report["passes"] if p["pass"] == "insert_qdq")
    assert qdq["stats"]["quantized_nodes"].get("Conv") == 2
