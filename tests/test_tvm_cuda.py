"""tvm-cuda without a GPU: every zoo model's kernels and host program built by nvcc for sm_80 and sm_90 (exit 0),
every kernel in ptxas' listing for both, every launch naming a kernel of the source; the runner says clearly that
there is no device. (Running the builds, bit for bit, needs a GPU.)"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import onnx
import pytest

import qcompile_zoo as zoo
from qcompile import dataset

tvm = pytest.importorskip("tvm", reason="the tvm extra is part of the CI install")
from qcompile.targets.tvm import cuda  # noqa: E402
from qcompile.targets.tvm.executors import static_c  # noqa: E402
from qcompile.targets.tvm.executors.gpu.cuda import ARCHS, HOST_KERNELS, emit_cuda, sass_kernels  # noqa: E402
from qcompile.targets.tvm.frontend import program as frontend  # noqa: E402


@pytest.fixture(autouse=True)
def _nvcc():
    if shutil.which("nvcc") is None:
        pytest.fail("nvcc is not on PATH (the CI machine has CUDA's compiler; tools/setup does not install it)")


def _check_build(build: Path) -> dict:
    info = json.loads((build / "program.json").read_text())
    assert info["binary"] == "runner" and (build / "model.so").stat().st_size > 0
    listed = sass_kernels((build / "ptxas.txt").read_text())
    for arch in ARCHS:  # every kernel TVM generated was compiled to machine code for every architecture
        assert set(listed.get(arch, [])) == set(info["kernels"]), (arch, set(info["kernels"]) ^ set(listed[arch]))
    launched = set(re.findall(r"^  (\w+)<<<", (build / "model.cu").read_text(), re.M)) - set(HOST_KERNELS)
    assert launched == set(info["kernels"]), launched ^ set(info["kernels"])
    return info


def _qdq(zoo_quantized, name: str) -> onnx.ModelProto:
    """The zoo model's QDQ model for tvm-cuda (the pass pipeline only: what ``compile`` would build)."""
    return zoo_quantized(name, "tvm-cuda", 4)


@pytest.mark.parametrize("name", [n for n in zoo.names() if n != "digits-cnn"])
def test_zoo_model_builds_with_nvcc_every_kernel_in_the_sass(name, zoo_quantized, tmp_path):
    """The model's ``main`` build (the kernels and launches of every zoo model; ``probe`` adds outputs only)."""
    q = _qdq(zoo_quantized, name)
    e = zoo.build(name)
    with np.load(e.calib) as c:
        example = dataset.split_samples(q, {k: c[k] for k in c.files}, "calibration", 1)[0]
    prog = frontend.lower_to_relax(q, example)
    (which, mod, names), = [x for x in frontend.entries(prog) if x[0] == "main"]
    target = cuda.TvmCudaTarget()
    program = static_c.lower_static(mod, target.target, output_names=names, schedule=target.pipeline())
    emit_cuda(program, tmp_path / which, target.target)
    info = _check_build(tmp_path / which)
    assert info["launches"] >= len(info["kernels"]) > 0


@pytest.mark.hardware("a machine without a CUDA GPU (the CI machine)")
def test_whole_target_builds_and_without_a_gpu_the_runner_is_one_clear_error(zoo_quantized, tmp_path):
    if shutil.which("nvidia-smi") and subprocess.run(["nvidia-smi", "-L"], capture_output=True).returncode == 0:
        pytest.skip("a GPU is here")
    q = _qdq(zoo_quantized, "digits-cnn")
    files = cuda.TvmCudaTarget().build(q, tmp_path)
    for which in ("main", "probe"):
        _check_build(tmp_path / cuda.SUBDIR / which)
    meta = frontend.read_meta(tmp_path / cuda.SUBDIR)
    assert meta["sass_kernels"] == {a: meta["kernels"] for a in ARCHS} and files["tvm_library"].endswith("model.so")
    with pytest.raises(Exception, match="no CUDA device"):
        cuda.TvmCudaTarget().runner(tmp_path).run([{"input": np.zeros((1, 1, 8, 8), np.float32)}])


def test_topk_builds_as_rank_kernels(tmp_path):
    """TopK (RT-DETR's choice of encoder proposals): TVM's GPU TopK sorts in a host loop of launches over device
    workspaces, which the host program declined; as ranks by counting and a gather (``topk_as_ranks``, run bit-exact
    under POCL in tests/test_tvm_opencl.py) nvcc builds its kernels for every architecture."""
    import helpers

    from qcompile import driver

    path, calib = helpers.save_with_calib(tmp_path, helpers.conv_then("TopK"))
    q = driver.quantize(str(path), calib=str(calib), target="tvm-cuda", check_numerics=False)
    cuda.TvmCudaTarget().build(q, tmp_path / "o")
    info = _check_build(tmp_path / "o" / cuda.SUBDIR / "main")
    assert [k for k in info["kernels"] if "topk" in k] and not [k for k in info["kernels"] if "sort" in k], info
