"""tools/gpu_bench.py and tools/gpu_device.py, the GPU benchmark's two halves, checked here without a GPU: the
device half runs a build and writes its outputs, the report checks them against the integer reference (and sees a
wrong one), the GEMM layers are found from a build's step arguments, the PyTorch MiniLM is the zoo model, and the
builds are packed into carries that fit."""
from __future__ import annotations

import json
import shutil
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest

import qcompile_zoo as zoo
from qcompile import dataset, numerics

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
import gpu_bench  # noqa: E402
import gpu_device  # noqa: E402

torch = pytest.importorskip("torch", reason="torch is part of the CI install")


def _carry(tmp_path: Path, art, name: str, samples: list[dict]) -> tuple[Path, Path]:
    """A carry folder with the tvm-x86 probe build (same C API as a tvm-cuda model.so) and the work folder the
    report reads (the QDQ model, the samples)."""
    carry, work = tmp_path / "carry", tmp_path / "work"
    for f in gpu_bench.CARRIED:
        (carry / name).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(art.out_dir / "tvm-x86" / "probe" / f, carry / name / f)
    (work / name / "ort").mkdir(parents=True)
    shutil.copyfile(art.out_dir / "model.qdq.onnx", work / name / "ort" / "model.qdq.onnx")
    gpu_bench._save_samples(work / name / "samples.npz", samples)
    shutil.copyfile(work / name / "samples.npz", carry / name / "samples.npz")
    (carry / "manifest.json").write_text(json.dumps({"part": 0, "builds": [{"name": name, "check": True,
                                                                             "time": False}]}))
    return carry, work


def test_device_half_outputs_are_checked_against_the_reference_and_a_wrong_one_is_seen(zoo_compiled, tmp_path):
    name = "digits-cnn"
    art = zoo_compiled(name, "tvm-x86", 4)
    q = onnx.load(str(art.out_dir / "model.qdq.onnx"))
    with np.load(zoo.build(name).test) as t:
        samples = dataset.split_samples(q, {k: t[k] for k in t.files}, "test", 3)
    carry, work = _carry(tmp_path, art, name, samples)
    out = tmp_path / "out"
    assert gpu_device.main([str(carry), str(out), "--runs", "3"]) == 0
    res = json.loads((out / "results.json").read_text())
    outputs = gpu_bench.build_outputs(out / res["outputs"][name], name)
    assert len(outputs) == 3 and len(outputs[0]) > 5  # the probe: every integer tensor
    table = gpu_bench.report_tables([out], work)
    assert f"| {name} | 3 | 100.0000 % | 0 | True |" in table, table

    key = next(k for k, v in outputs[1].items() if v.dtype in (np.uint8, np.int8) and v.size > 1)
    outputs[1][key].flat[0] ^= 1  # one integer off by one LSB in sample 1
    np.savez(out / res["outputs"][name], **{f"{name}/{i}/{k}": v for i, o in enumerate(outputs) for k, v in o.items()})
    table = gpu_bench.report_tables([out], work)
    assert "100.0000 %" not in table and "| False |" in table, table


def test_gemm_layers_found_from_the_step_arguments(opencl_zoo):
    """Every MatMul / Gemm with a constant weight of the ViT is one GEMM step, with the ONNX weight's K and N."""
    art = opencl_zoo("vit-digits")
    info = json.loads((art.out_dir / "tvm-opencl" / "main" / "program.json").read_text())
    q = onnx.load(str(art.out_dir / "model.qdq.onnx"))
    inits = {i.name: list(i.dims) for i in q.graph.initializer}
    producer = {o: n for n in q.graph.node for o in n.output}
    want = Counter()
    for node in q.graph.node:
        dq = producer.get(node.input[1]) if node.op_type in ("MatMul", "Gemm") else None
        if dq is not None and dq.op_type == "DequantizeLinear" and dq.input[0] in inits:
            k, n = inits[dq.input[0]]
            trans = any(a.name == "transB" and a.i for a in node.attribute)
            want[(n, k) if trans else (k, n)] += 1
    got = gpu_device.gemm_steps(info)
    assert Counter((g["k"], g["n"]) for g in got) == want and len(want) >= 4
    tokens = {g["m"] for g in got if g["n"] != 10}
    assert len(tokens) == 1 and tokens.pop() > 1  # every encoder GEMM over all tokens of the one sample


def test_pytorch_minilm_is_the_zoo_model(tmp_path):
    """The baseline's plain-torch MiniLM computes the zoo's fp32 ONNX model (ORT), in float32 with the source
    weights, and close to it with the carried ones (bf16; the word embeddings int8 per row) in float32 and bf16."""
    e = zoo.build("minilm")
    with np.load(e.test) as t:
        feeds = {k: t[k][:4] for k in t.files}
    want = numerics.run(numerics.session(str(e.model), optimize=True), feeds)["last_hidden_state"]
    state, config = gpu_bench.minilm_state()
    carried = tmp_path / "minilm_bf16.npz"
    gpu_bench.minilm_weights_file(carried, state)
    assert carried.stat().st_size < 0.4 * sum(v.nbytes for v in state.values())
    weights = gpu_device.minilm_weights(carried)
    args = [torch.from_numpy(feeds[k]) for k in ("input_ids", "attention_mask", "token_type_ids")]
    with torch.inference_mode():
        fp32 = gpu_device.minilm_module(torch, state, torch.float32, "cpu")(*args).numpy()
        np.testing.assert_allclose(fp32, want, atol=2e-4)
        got = gpu_device.minilm_module(torch, weights, torch.float32, "cpu")(*args).numpy()
        assert numerics.compare(got, want)["cosine"] > 0.999
        low = gpu_device.minilm_module(torch, weights, torch.bfloat16, "cpu")(*args).float().numpy()
        assert numerics.compare(low, want)["cosine"] > 0.99
        hf, which = gpu_device.minilm_model(torch, weights, torch.float32, "cpu", config)
        assert which.startswith("transformers")  # transformers' own BertModel, as on the GPU machine
        assert numerics.compare(hf(*args).numpy(), got)["cosine"] > 0.99999
    broken = dict(state)
    broken["encoder.layer.3.attention.self.key.weight"] = state["encoder.layer.3.attention.self.value.weight"]
    with torch.inference_mode():
        wrong = gpu_device.minilm_module(torch, broken, torch.float32, "cpu")(*args).numpy()
    assert np.abs(wrong - want).max() > 1e-2  # the check sees a wrong weight


def test_builds_are_packed_into_carries_that_fit():
    mib = gpu_bench.MIB
    items = [([n], s * mib, {}, []) for n, s in (("a", 30), ("b", 40), ("c", 25), ("big", 135), ("d", 5))]
    parts, skipped = gpu_bench.pack(items, 60 * mib)
    assert [[i[0][0] for i in p] for p in parts] == [["a", "c", "d"], ["b"]]
    assert skipped == [("big", 135 * mib)]


def test_report_tables_the_timings_as_ratios(tmp_path):
    """The speed tables from a device's results.json: tvm-cuda / PyTorch per run, each GEMM's share of _int_mm."""
    res = {"device": "NVIDIA H100", "torch": "2.11", "part": 1, "builds": {gpu_bench.TIMED: {
        "end_to_end_ms": 2.0, "gpu_ms": 1.5,
        "gemms": [{"step": 12, "symbol": "qcm_fused_matmul_add5", "m": 1024, "n": 384, "k": 384, "ms": 0.02,
                   "int_mm_ms": 0.01},
                  {"step": 13, "symbol": "qcm_fused_matmul_add6", "m": 8, "n": 384, "k": 384, "ms": 0.01,
                   "int_mm_ms": None}]}},
        "torch_minilm": {"eager_ms": 4.0, "compile_ms": 1.6, "compile_cudagraphs_ms": 1.0}}
    res["torch_minilm"]["implementation"] = "transformers BertModel (sdpa)"
    (tmp_path / "results.json").write_text(json.dumps(res))
    table = gpu_bench.report_tables([tmp_path], tmp_path)
    for row in ("| tvm-cuda int8 (qcompile) | 2.000 | 1.00x |", "| PyTorch bf16 eager | 4.000 | 0.50x |",
                "| PyTorch bf16 torch.compile | 1.600 | 1.25x |", "| PyTorch bf16 torch.compile reduce-overhead | "
                "1.000 | 2.00x |", "| 1024 x 384 x 384 | 0.0200 | 0.01 | 50 % |", "n/a (torch declines the shape)"):
        assert row in table, (row, table)


def test_outputs_are_written_in_files_the_device_tool_brings_back(tmp_path):
    """At most OUT_FILE_BYTES per file before compression, a build never split, each build's file recorded."""
    big = gpu_device.OUT_FILE_BYTES // 2 + 1
    arrays = {f"{b}/0/t": np.zeros(big if b in ("a", "b") else 10, np.uint8) for b in ("a", "b", "c")}
    where = gpu_device.write_outputs(tmp_path, arrays)
    assert where["a"] != where["b"] and where["c"] == where["a"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["outputs0.npz", "outputs1.npz"]
    assert [len(o) for o in (gpu_bench.build_outputs(tmp_path / where[b], b) for b in "abc")] == [1, 1, 1]
