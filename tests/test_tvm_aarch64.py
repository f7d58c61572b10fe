"""tvm-aarch64: cross-compiled with Debian's gcc, run under qemu-aarch64, bit-exact with the integer reference."""
from __future__ import annotations

import numpy as np
import onnx
import pytest

import qcompile_zoo as zoo
from qcompile import dataset, driver
from qcompile.reference import Interpreter

pytest.importorskip("tvm", reason="the tvm extra is part of the CI install")


@pytest.mark.parametrize("name", ["digits-cnn", "vit-digits"])
def test_runs_under_qemu_bit_exact(name, tmp_path):
    e = zoo.build(name)
    art = driver.compile(str(e.model), calib=str(e.calib), recipe="w8a8", target="tvm-aarch64",
                         out_dir=tmp_path / "out", max_samples=8, check_numerics=False, measure_latency=False)
    lsb = art.report["lsb_vs_reference"]["tvm-aarch64"]
    # integer ops bit-exact given the same float->integer border values (replayed reference)
    assert lsb["integer_ops_exact"], {k: v for k, v in lsb.items() if k != "tensors"}
    if name == "digits-cnn":  # no float region upstream of any integer tensor: every tensor equal end to end
        assert lsb["max_lsb"] == 0, {k: v for k, v in lsb.items() if k != "tensors"}
    else:  # the ViT's float regions (LayerNorm, GELU, Softmax): LLVM fuses multiply-adds there, a border may flip
        assert lsb["within_1_lsb"] == 1.0 and lsb["equal"] > 0.99, {k: v for k, v in lsb.items() if k != "tensors"}
    with np.load(e.test) as t:
        test = {k: t[k][:24] for k in t.files}
    got = art.run(test)  # one qemu-aarch64 process for the batch
    q = onnx.load(str(art.out_dir / "model.qdq.onnx"))
    interp = Interpreter(q)
    ref = [interp.run(s)[0] for s in dataset.split_samples(q, test, "test")]
    want = np.concatenate([r["logits"] for r in ref])
    if name == "digits-cnn":  # all-integer graph up to the logits' DequantizeLinear: identical floats
        np.testing.assert_array_equal(got["logits"], want)
    else:
        assert np.mean(got["logits"].argmax(-1) == want.argmax(-1)) >= 0.95
    x86 = driver.run_artifact(art.out_dir, test, "onnxruntime")
    assert np.mean(got["logits"].argmax(-1) == x86["logits"].argmax(-1)) >= 0.95
