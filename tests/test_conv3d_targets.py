"""Volumetric / video convolutions (Conv with 3 spatial axes: 3-D U-Nets, R(2+1)D and X3D video models) quantized and
built for every TVM target as Relax conv3d on uint8 x int8 -> int32, bit-exact with the integer reference, main build
included. Before, each target declined the whole model ("QLinear Conv with 3 spatial dims is not lowered"), and a 3-D
ConvTranspose stayed float."""
from __future__ import annotations

import helpers
import pytest
from onnx import helper

pytest.importorskip("tvm", reason="the tvm extra is part of the CI install")


def volume_net():
    """Strided SAME-padded conv, ReLU, a grouped, dilated, explicitly padded conv with a bias, ReLU, then a 3-D
    ConvTranspose (stride 2 with output_padding: the sub-pixel phases; a 3-D U-Net's decoder)."""
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", strides=[1, 2, 2], auto_pad="SAME_UPPER"),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", group=2, dilations=[1, 2, 1],
                              pads=[1, 2, 0, 1, 2, 1]),
             helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
             helper.make_node("ConvTranspose", ["r2", "w3"], ["y"], name="up", strides=[2, 2, 2],
                              pads=[1, 1, 1, 1, 1, 1], output_padding=[1, 0, 1])]
    inits = [helpers.init("w1", helpers.rand(8, 3, 3, 3, 3, scale=0.3)),
             helpers.init("w2", helpers.rand(6, 4, 3, 3, 2, scale=0.3)),
             helpers.init("b2", helpers.rand(6, scale=0.1)),
             helpers.init("w3", helpers.rand(6, 4, 3, 3, 3, scale=0.3))]
    return helpers.make(nodes, [helpers.vi("x", [1, 3, 4, 8, 8])], [helpers.vi("y", [1, 4, 8, 7, 8])], inits,
                        opset=17)


@pytest.mark.parametrize("target", ["tvm-x86", "tvm-aarch64", "mcu-cortex-m4", "tvm-hexagon", "tvm-opencl"])
def test_conv3d_is_integer_and_bit_exact(target, tmp_path):
    art, lsb = helpers.compile_exact(tmp_path, volume_net(), target)
    assert lsb["equal"] == 1.0
    helpers.assert_main_build_equal(lsb)
    qdq = next(p for p in art.report["passes"] if p["pass"] == "insert_qdq")
    assert qdq["stats"]["quantized_nodes"].get("Conv") == 2 and qdq["stats"]["quantized_nodes"].get("ConvTranspose") == 1
    assert not [f for f in art.report.get("fallbacks", []) if f["op"] in ("Conv", "ConvTranspose")]
