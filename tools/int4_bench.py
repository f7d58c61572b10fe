"""Weight-only int4 (w4a16) on the zoo: fp32, round-to-nearest int4 blocks (32 / 64 / 128), AWQ, GPTQ, and the
MatMulNBits emission; prints a markdown table per model (stdout; progress on stderr).

    python tools/int4_bench.py                                 # llama-bytes and minilm
    python tools/int4_bench.py --models minilm --runs 30 --blocks 32
    python tools/int4_bench.py --models synthetic-mlp          # 2 x (1024 -> 2816 -> 1024) MLP, seq 16: larger MatMuls

Per variant: the task metric on the zoo test set (lm: perplexity ratio to fp32 and next-token agreement; embedding:
mean-pooled cosine to fp32), ONNX Runtime latency (ORT_ENABLE_ALL, 1 intra/inter-op thread, batch 1 = first test
sample, median over rounds that interleave all variants: the ratio to fp32 is from the same run), file size and its
ratio to fp32, time to quantize. Metrics use the same session options as the timing, so a ``qdq`` model is measured as
ORT runs it by default: ORT fuses opset-21 block DequantizeLinear + MatMul into MatMulNBits with accuracy level 4
(activations rounded to int8 inside the kernel); the ``acc0`` rows set ``session.qdq_matmulnbits_accuracy_level`` = 0
(float activations, a true w4a16) for the same file.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import qcompile_zoo as zoo

import qcompile
from qcompile.dataset import load_samples
from qcompile.recipe import EQUIVALENCE, W4A16_BLOCK, Recipe, load_recipe

ROUNDS = 5


def log(msg: str) -> None:
    print(f"[int4_bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def recipe(method: str, block: int, fmt: str = "qdq", level: int = 0) -> Recipe:
    """The builtin w4a16 recipes with another block size / emission (same pass list as qcompile.recipe._w4a16)."""
    q = {"name": "insert_qdq", "weight_only": True, "weight_bits": 4, "weight_granularity": "per_block",
         "weight_block": block, "weight_format": fmt, "nbits_accuracy_level": level}
    solver = {"rtn": [], "awq": [{"name": "awq", "bits": 4, "weight_block": block}],
              "gptq": [{"name": "reconstruct_weights", "bits": 4, "weight_block": block}]}[method]
    return Recipe.from_dict({"name": f"w4a16-{method}-b{block}-{fmt}{level}",
                             "passes": list(EQUIVALENCE) + solver + ["quantize_embedding", q]})


@dataclass
class Variant:
    name: str
    recipe: Recipe | None  # None: the fp32 model, or the file of variant `source`
    source: str = ""
    session_level: int | None = None  # session.qdq_matmulnbits_accuracy_level (None: ORT's default)
    path: Path | None = None
    session: ort.InferenceSession | None = None
    quant_s: float = 0.0
    times: list[float] = field(default_factory=list)
    metric: dict = field(default_factory=dict)
    error: str = ""


def session(path: Path, level: int | None) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    if level is not None:
        so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", str(level))
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def run_all(sess: ort.InferenceSession, samples: list[dict]) -> dict[str, np.ndarray]:
    names = [o.name for o in sess.get_outputs()]
    res = [sess.run(names, s) for s in samples]
    return {n: np.concatenate([r[i] for r in res], axis=0) for i, n in enumerate(names)}


def variants(blocks: list[int], best: int) -> list[Variant]:
    """fp32; RTN blocks in the QDQ form (block choice); the QDQ / MatMulNBits forms and accuracy levels at block
    ``best``; the builtin recipes as shipped (MatMulNBits, level 0) and with int8 activations in the kernel (level 4)."""
    out = [Variant("fp32", None)]
    out += [Variant(f"RTN b{b} qdq", recipe("rtn", b)) for b in blocks]
    out += [Variant(f"RTN b{best} qdq, session acc0", None, f"RTN b{best} qdq", 0),
            Variant(f"RTN b{best} MatMulNBits acc4", recipe("rtn", best, "matmulnbits", 4))]
    for name in ("w4a16", "w4a16-awq", "w4a16-gptq"):
        method = name.split("-")[1] if "-" in name else "rtn"
        out += [Variant(f"`{name}` (MatMulNBits acc0)", load_recipe(name)),
                Variant(f"`{name}` acc4", recipe(method, W4A16_BLOCK, "matmulnbits", 4))]
    return out


def synthetic(work: Path, dim: int = 1024, hidden: int = 2816, layers: int = 2, seq: int = 16) -> tuple[Path, Path]:
    """A stack of float MLPs x -> relu(x·W1)·W2 (residual), [1, seq, dim]: larger MatMuls than the zoo decoder."""
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes, inits, x = [], [], "x"
    for i in range(layers):
        w1 = (rng.standard_normal((dim, hidden)) / np.sqrt(dim)).astype(np.float32)
        w2 = (rng.standard_normal((hidden, dim)) / np.sqrt(hidden)).astype(np.float32)
        inits += [numpy_helper.from_array(w1, f"w1_{i}"), numpy_helper.from_array(w2, f"w2_{i}")]
        nodes += [helper.make_node("MatMul", [x, f"w1_{i}"], [f"h{i}"], name=f"up{i}"),
                  helper.make_node("Relu", [f"h{i}"], [f"r{i}"], name=f"relu{i}"),
                  helper.make_node("MatMul", [f"r{i}", f"w2_{i}"], [f"d{i}"], name=f"down{i}"),
                  helper.make_node("Add", [x, f"d{i}"], [f"y{i}"], name=f"res{i}")]
        x = f"y{i}"
    vi = lambda n: helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, [1, seq, dim])
    graph = helper.make_graph(nodes, "mlp", [vi("x")], [vi(x)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    work.mkdir(parents=True, exist_ok=True)
    onnx.save(model, work / "synthetic-mlp.onnx")
    np.savez(work / "synthetic-mlp.calib.npz", x=rng.standard_normal((32, seq, dim)).astype(np.float32))
    return work / "synthetic-mlp.onnx", work / "synthetic-mlp.calib.npz"


def bench(name: str, args: argparse.Namespace, work: Path) -> str:
    if name == "synthetic-mlp":
        fp32, calib = synthetic(work / name)
        test_arrays = {"x": np.random.default_rng(1).standard_normal((args.test_samples, 16, 1024)).astype(np.float32)}
        task, entry = "none", None
    else:
        entry = zoo.build(name)
        fp32, calib, task = entry.model, entry.calib, zoo._spec(name).task
        with np.load(entry.test) as t:
            test_arrays = {k: t[k][: args.test_samples] for k in t.files}
    test = [{k: v[i:i + 1] for k, v in test_arrays.items()} for i in range(len(next(iter(test_arrays.values()))))]
    if name != "synthetic-mlp":
        test = load_samples(onnx.load(str(fp32), load_external_data=False), str(entry.test), "test",
                            args.test_samples)
    vs = variants(args.blocks, args.best_block)
    paths: dict[str, Path | None] = {}
    for v in vs:
        if v.recipe is None:
            v.path = paths.get(v.source) if v.source else fp32
            continue
        log(f"{name}: quantizing {v.name}")
        t0 = time.perf_counter()
        try:
            out = work / name / v.recipe.name
            qcompile.compile(str(fp32), calib=str(calib), recipe=v.recipe, target="onnxruntime",
                             out_dir=str(out), measure_latency=False)
            v.path = out / "model.qdq.onnx"
        except Exception as exc:  # noqa: BLE001 - a failing variant is a result
            v.error = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            log(f"  failed: {v.error}")
        v.quant_s = time.perf_counter() - t0
        paths[v.name] = v.path
    for v in vs:
        if v.path is None:
            v.error = v.error or "no model"
            continue
        v.session = session(v.path, v.session_level)
    ref = run_all(vs[0].session, test)
    for v in vs:
        if v.session is None:
            continue
        outs = ref if v is vs[0] else run_all(v.session, test)
        if task == "lm":
            v.metric = zoo.lm_metrics(outs, ref, test_arrays)
        elif task == "none":
            v.metric = {"metric": zoo.sqnr_db(outs, ref)}
        else:
            v.metric = {"metric": zoo.evaluate(name, outs, ref, entry, test_arrays)}
    live = [v for v in vs if v.session is not None]
    feed = test[0]
    for v in live:
        for _ in range(3):
            v.session.run(None, feed)
    per = max(1, args.runs // ROUNDS)
    for r in range(ROUNDS):
        for v in live[r % len(live):] + live[: r % len(live)]:
            for _ in range(per):
                t0 = time.perf_counter()
                v.session.run(None, feed)
                v.times.append(time.perf_counter() - t0)
    base_ms = statistics.median(vs[0].times) * 1e3
    base_mb = vs[0].path.stat().st_size / 1e6
    head = ("| variant | ppl ratio | agreement | latency ms | vs fp32 | size MB | vs fp32 | quantize s |\n"
            "|---|---|---|---|---|---|---|---|" if task == "lm" else
            f"| variant | {'SQNR dB' if task == 'none' else 'cosine'} | latency ms | vs fp32 | size MB | vs fp32 | "
            "quantize s |\n|---|---|---|---|---|---|---|")
    rows = [f"### {name} ({len(test)} test samples, batch 1 latency, {args.runs} runs, 1 thread)", "", head]
    for v in vs:
        if v.session is None:
            rows.append(f"| {v.name} | failed: {v.error} |")
            continue
        ms = statistics.median(v.times) * 1e3
        mb = v.path.stat().st_size / 1e6
        m = (f"{v.metric['ratio']:.4f} | {v.metric['agreement']:.4f}" if task == "lm" else
             f"{v.metric['metric']:.2f}" if task == "none" else f"{v.metric['metric']:.5f}")
        rows.append(f"| {v.name} | {m} | {ms:.3f} | {ms / base_ms:.2f}x | {mb:.2f} | {mb / base_mb:.3f}x | "
                    f"{v.quant_s:.1f} |")
    if task == "lm":
        rows.append(f"\nfp32 perplexity {vs[0].metric['fp32_perplexity']:.4f}")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["llama-bytes", "minilm"])
    ap.add_argument("--blocks", nargs="+", type=int, default=[32, 64, 128])
    ap.add_argument("--best-block", type=int, default=32, help="block of the QDQ-vs-MatMulNBits rows")
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--test-samples", type=int, default=64)
    args = ap.parse_args(argv)
    if args.best_block not in args.blocks:
        ap.error("--best-block must be one of --blocks")
    print(f"ONNX Runtime {ort.__version__}, qcompile {getattr(qcompile, '__version__', '?')}\n")
    with tempfile.TemporaryDirectory(prefix="int4_bench-") as tmp:
        for name in args.models:
            print(bench(name, args, Path(tmp)) + "\n", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
