"""The device half of ``tools/gpu_bench.py``: what runs on the lent GPU machine.

That machine has python3 with numpy and torch (CUDA) but no TVM and none of qcompile's other dependencies, so this
file imports numpy, ctypes and torch only (not qcompile: its static C runner, ``SharedModel``, is the same ctypes
call, but importing it pulls in onnx). It reads one carry folder made by ``gpu_bench.py prepare``:

    manifest.json            what is in the folder
    <build>/model.so         a tvm-cuda build (main or probe), its program.json and samples.npz
    minilm_bf16.npz          MiniLM's weights for the PyTorch baseline (bf16 bits; the word embeddings int8 per row)
    minilm_config.json       its transformers config (the baseline is transformers' BertModel where it imports)

and writes into ``OUT``: ``results.json`` (timings, the GPU's name, which ``outputs<k>.npz`` holds each build's
outputs), ``outputs<k>.npz`` (every output of every sample of the probe builds, compared with the integer reference
back on the build machine by ``gpu_bench.py report``; at most 15 MiB each before compression, as the device tool
brings back 8 files of 16 MiB) and ``timed_outputs.npz`` (the timed runs' outputs, tvm-cuda's and PyTorch's).

    python3 tools/gpu_device.py CARRY OUT [--runs 200]

Timing: end to end is the wall time of one call (inputs copied in, every launch, outputs copied out, synchronized),
median of ``--runs``. Per step (``qc_model_profile``) and ``torch._int_mm`` are GPU times between CUDA events with the
launches queued behind a spin kernel first, so launch overhead does not count on either side.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

ALIGN = 256
SPIN_MS = 30.0  # a spin kernel this long holds the stream while the host queues the launches to be timed


def _aligned(nbytes: int) -> np.ndarray:
    raw = np.zeros(nbytes + ALIGN, np.uint8)
    off = (-raw.ctypes.data) % ALIGN
    return raw[off:off + nbytes]


class Build:
    """A tvm-cuda ``model.so`` in this process: ``qc_model_run`` per sample, ``qc_model_profile`` per step."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.info = json.loads((self.folder / "program.json").read_text())
        self.lib = ctypes.CDLL(str((self.folder / "model.so").resolve()))
        self.lib.qc_model_run.restype = ctypes.c_int
        self.lib.qc_model_run.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
        self.lib.qc_model_last_error.restype = ctypes.c_char_p
        self.inputs, self.outputs = self.info["inputs"], self.info["outputs"]
        self._in = [_aligned(m["nbytes"]) for m in self.inputs]
        self._out = [_aligned(m["nbytes"]) for m in self.outputs]
        self._in_ptrs = (ctypes.c_void_p * max(len(self._in), 1))(*[b.ctypes.data for b in self._in])
        self._out_ptrs = (ctypes.c_void_p * max(len(self._out), 1))(*[b.ctypes.data for b in self._out])

    def _check(self, rc: int) -> None:
        if rc != 0:
            raise RuntimeError(f"{self.folder.name}: {self.lib.qc_model_last_error().decode(errors='replace')} "
                               f"(rc {rc})")

    def load(self, sample: dict[str, np.ndarray]) -> None:
        for meta, buf in zip(self.inputs, self._in):
            arr = np.asarray(sample[meta["name"]], dtype=meta["dtype"])
            if list(arr.shape) != list(meta["shape"]):
                raise ValueError(f"{self.folder.name}: input {meta['name']} has shape {arr.shape}, built for "
                                 f"{meta['shape']}")
            buf.view(meta["dtype"])[...] = arr.reshape(-1)

    def call(self) -> None:
        self._check(self.lib.qc_model_run(self._in_ptrs, self._out_ptrs))

    def run(self, sample: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.load(sample)
        self.call()
        return {m["name"]: buf.view(m["dtype"]).reshape(m["shape"]).copy() for m, buf in zip(self.outputs, self._out)}

    def profile(self, runs: int) -> list[float]:
        """Per step, the median GPU milliseconds over ``runs`` (the inputs of the last :meth:`load`)."""
        fn = self.lib.qc_model_profile
        n = int(self.lib.qc_model_num_steps())
        fn.restype = ctypes.c_int
        fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.POINTER(ctypes.c_float), ctypes.c_double]
        out = (ctypes.c_float * n)()
        rows = []
        for _ in range(runs):
            self._check(fn(self._in_ptrs, self._out_ptrs, out, SPIN_MS))
            rows.append(list(out))
        return [float(x) for x in np.median(np.array(rows), axis=0)]


def load_samples(path: Path, prefix: str = "") -> list[dict[str, np.ndarray]]:
    """``samples.npz`` (``<i>/<name>`` keys), or the ``<prefix>/<i>/<name>`` keys of an ``outputs<k>.npz``, as one
    dict per sample, in order."""
    head = f"{prefix}/" if prefix else ""
    with np.load(path) as z:
        rows = [(k[len(head):].split("/", 1), k) for k in z.files if k.startswith(head)]
        order = sorted({int(i) for (i, _), _ in rows})
        return [{name: z[k] for (i, name), k in rows if int(i) == n} for n in order]


def median_ms(fn, runs: int, warmup: int = 5) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1e3)


def gemm_steps(info: dict) -> list[dict]:
    """The steps of a build that multiply an 8-bit activation by an 8-bit constant 2-D weight: step index, M, N, K
    (M is every leading axis of the output together), from ``program.json``'s ``step_args``."""
    rows = []
    for i, (symbol, args) in enumerate(zip(info.get("step_symbols", []), info.get("step_args", []))):
        if "matmul" not in symbol and "dense" not in symbol:
            continue
        ins = [a for a in args if not a["out"]]
        outs = [a for a in args if a["out"]]
        weights = [a for a in ins if a["kind"] == "const" and len(a["shape"]) == 2 and a["dtype"] in ("int8", "uint8")]
        acts = [a for a in ins if a["kind"] != "const" and a["dtype"] in ("int8", "uint8") and len(a["shape"]) >= 2]
        if len(weights) != 1 or not acts or len(outs) != 1:
            continue
        n = outs[0]["shape"][-1]
        w = weights[0]["shape"]
        k = acts[0]["shape"][-1]
        if sorted(w) != sorted([k, n]):
            continue
        rows.append({"step": i, "symbol": symbol, "m": int(math.prod(outs[0]["shape"][:-1])), "n": int(n),
                     "k": int(k)})
    return rows


# ---- PyTorch side -------------------------------------------------------------------------------------------


def _cycles_per_ms(torch) -> float:
    """The GPU clock as torch.cuda._sleep sees it: a spin of 10^7 cycles timed by CUDA events."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(1_000_000)
    start.record()
    torch.cuda._sleep(10_000_000)
    end.record()
    torch.cuda.synchronize()
    return 10_000_000 / start.elapsed_time(end)


def gpu_ms(torch, fn, reps: int = 100, trials: int = 5) -> float:
    """GPU milliseconds per call of ``fn``: ``reps`` calls queued behind a spin kernel, timed by CUDA events
    (median of ``trials``)."""
    cycles = int(_cycles_per_ms(torch) * SPIN_MS)
    for _ in range(3):
        fn()
    out = []
    for _ in range(trials):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(cycles)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        torch.cuda.synchronize()
        out.append(start.elapsed_time(end) / reps)
    return float(np.median(out))


def int_mm_ms(torch, m: int, n: int, k: int) -> float | None:
    """``torch._int_mm`` (int8 x int8 -> int32, cuBLASLt) on an M x K by K x N product (the weight column-major, as
    torchao lays it out), GPU ms per call; None where torch declines the shape (it wants M > 16, K and N % 8 == 0)."""
    dev = torch.device("cuda")
    a = torch.randint(-128, 128, (m, k), dtype=torch.int8, device=dev)
    b = torch.randint(-128, 128, (n, k), dtype=torch.int8, device=dev).t()
    try:
        torch._int_mm(a, b)
    except RuntimeError:
        return None
    return gpu_ms(torch, lambda: torch._int_mm(a, b))


def minilm_module(torch, weights: dict[str, np.ndarray], dtype, device):
    """all-MiniLM-L6-v2 (BERT: 6 layers, hidden 384, 12 heads, erf GELU, LayerNorm eps 1e-12) in plain torch, with
    the weights of ``weights`` (HF BertModel state-dict names; :func:`minilm_weights` reads the carried file);
    attention through ``scaled_dot_product_attention`` as transformers' default ("sdpa") runs it. forward(input_ids,
    attention_mask, token_type_ids) -> last_hidden_state, the zoo model's output."""
    nn, F = torch.nn, torch.nn.functional
    layers = 1 + max(int(k.split(".")[2]) for k in weights if k.startswith("encoder.layer."))
    hidden = weights["embeddings.word_embeddings.weight"].shape[1]
    heads = hidden // 32

    def p(name):
        return nn.Parameter(torch.from_numpy(np.ascontiguousarray(weights[name])).to(device=device, dtype=dtype),
                            requires_grad=False)

    def linear(prefix):
        lin = nn.Linear(1, 1)
        lin.weight, lin.bias = p(prefix + ".weight"), p(prefix + ".bias")
        return lin

    def norm(prefix):
        ln = nn.LayerNorm(hidden, eps=1e-12)
        ln.weight, ln.bias = p(prefix + ".weight"), p(prefix + ".bias")
        return ln

    class Layer(nn.Module):
        def __init__(self, i):
            super().__init__()
            pre = f"encoder.layer.{i}."
            self.q, self.k, self.v = (linear(pre + f"attention.self.{n}") for n in ("query", "key", "value"))
            self.o, self.ln1 = linear(pre + "attention.output.dense"), norm(pre + "attention.output.LayerNorm")
            self.up, self.down = linear(pre + "intermediate.dense"), linear(pre + "output.dense")
            self.ln2 = norm(pre + "output.LayerNorm")

        def forward(self, x, mask):
            b, s, _ = x.shape

            def split(t):
                return t.view(b, s, heads, hidden // heads).transpose(1, 2)

            a = F.scaled_dot_product_attention(split(self.q(x)), split(self.k(x)), split(self.v(x)), attn_mask=mask)
            x = self.ln1(x + self.o(a.transpose(1, 2).reshape(b, s, hidden)))
            return self.ln2(x + self.down(F.gelu(self.up(x))))

    class MiniLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.word = nn.Embedding(1, 1)
            self.word.weight = p("embeddings.word_embeddings.weight")
            self.pos = nn.Embedding(1, 1)
            self.pos.weight = p("embeddings.position_embeddings.weight")
            self.token_type = nn.Embedding(1, 1)
            self.token_type.weight = p("embeddings.token_type_embeddings.weight")
            self.ln = norm("embeddings.LayerNorm")
            self.layers = nn.ModuleList(Layer(i) for i in range(layers))

        def forward(self, input_ids, attention_mask, token_type_ids):
            s = input_ids.shape[1]
            pos = torch.arange(s, device=input_ids.device)
            x = self.ln(self.word(input_ids) + self.pos(pos)[None] + self.token_type(token_type_ids))
            mask = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * torch.finfo(x.dtype).min
            for layer in self.layers:
                x = layer(x, mask)
            return x

    return MiniLM().eval()


def minilm_model(torch, weights: dict[str, np.ndarray], dtype, device, config: dict | None = None):
    """transformers' own ``BertModel`` (attention "sdpa", its default) with ``weights`` where ``config`` is given and
    transformers imports (the GPU machine has it, without any weights), else :func:`minilm_module`. Returns
    (module: forward(input_ids, attention_mask, token_type_ids) -> last_hidden_state, which one it is)."""
    if config is not None:
        try:
            from transformers import BertConfig, BertModel
        except ImportError:
            config = None
    if config is None:
        return minilm_module(torch, weights, dtype, device), "plain torch (sdpa)"
    bert = BertModel(BertConfig(**config), add_pooling_layer=False)
    missing, unexpected = bert.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in
                                                weights.items()}, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise ValueError(f"MiniLM weights do not fit transformers' BertModel: missing {missing}, unexpected "
                         f"{unexpected}")

    class Hidden(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.bert(input_ids=input_ids, attention_mask=attention_mask,
                             token_type_ids=token_type_ids).last_hidden_state

    import transformers
    return Hidden().to(device=device, dtype=dtype).eval(), f"transformers {transformers.__version__} BertModel (sdpa)"


def minilm_weights(path: Path) -> dict[str, np.ndarray]:
    """The carried MiniLM weights as float32: ``name`` (bf16 bits as uint16) or ``name.q`` int8 rows times
    ``name.scale`` (one float32 per row)."""
    out = {}
    with np.load(path) as z:
        for k in z.files:
            if k.endswith(".scale"):
                continue
            if k.endswith(".q"):
                base = k[:-2]
                out[base] = z[k].astype(np.float32) * z[base + ".scale"][:, None]
            else:
                out[k] = (z[k].astype(np.uint32) << 16).view(np.float32)
    return out


def torch_minilm_ms(torch, weights: dict[str, np.ndarray], sample: dict[str, np.ndarray], runs: int,
                    config: dict | None = None) -> dict:
    """PyTorch bf16 MiniLM on the GPU, end to end as ours is timed (inputs copied in, outputs copied out as
    float32): eager, torch.compile, and torch.compile with CUDA graphs; also its output for a sanity check."""
    dev = torch.device("cuda")
    model, implementation = minilm_model(torch, weights, torch.bfloat16, dev, config)
    names = ("input_ids", "attention_mask", "token_type_ids")
    host = [torch.from_numpy(np.ascontiguousarray(sample[n])) for n in names]

    def call(fn):
        def once():
            with torch.inference_mode():
                out = fn(*(t.to(dev, non_blocking=False) for t in host)).float().cpu()
            return out
        return once

    res = {"implementation": implementation}
    with torch.inference_mode():
        res["output"] = call(model)().numpy()
    res["eager_ms"] = median_ms(call(model), runs)
    for mode, key in ((None, "compile_ms"), ("reduce-overhead", "compile_cudagraphs_ms")):
        t0 = time.perf_counter()
        compiled = torch.compile(model, mode=mode, dynamic=False)
        fn = call(compiled)
        for _ in range(3):
            fn()
        res[key.replace("_ms", "_build_s")] = round(time.perf_counter() - t0, 1)
        res[key] = median_ms(fn, runs)
    return res


OUT_FILE_BYTES = 15 << 20  # the device tool brings back at most 8 files of 16 MiB from $OUT


def write_outputs(out: Path, arrays: dict[str, np.ndarray]) -> dict[str, str]:
    """The probe outputs (``<build>/<sample>/<tensor>``) into as few ``outputs<k>.npz`` as keep each under
    :data:`OUT_FILE_BYTES` before compression, a build never split; returns build -> its file."""
    builds: dict[str, list[str]] = {}
    for k in arrays:
        builds.setdefault(k.split("/", 1)[0], []).append(k)
    files: list[list[str]] = []
    sizes: list[int] = []
    where = {}
    for build, keys in builds.items():
        size = sum(arrays[k].nbytes for k in keys)
        i = next((j for j, s in enumerate(sizes) if s + size <= OUT_FILE_BYTES), None)
        if i is None:
            files.append([])
            sizes.append(0)
            i = len(files) - 1
        files[i] += keys
        sizes[i] += size
        where[build] = f"outputs{i}.npz"
    for i, keys in enumerate(files):
        np.savez_compressed(out / f"outputs{i}.npz", **{k: arrays[k] for k in keys})
    return where


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("carry", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--profile-runs", type=int, default=20)
    args = ap.parse_args(argv)
    import torch

    manifest = json.loads((args.carry / "manifest.json").read_text())
    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"
    res: dict = {"device": device, "torch": torch.__version__, "part": manifest["part"],
                 "builds": {}}
    checked: dict[str, np.ndarray] = {}
    for entry in manifest["builds"]:
        name, folder = entry["name"], args.carry / entry["name"]
        row: dict = {}
        try:
            build = Build(folder)
            samples = load_samples(folder / "samples.npz")
            if entry["check"]:
                outs = [build.run(s) for s in samples]
                checked.update({f"{name}/{i}/{k}": v for i, o in enumerate(outs) for k, v in o.items()})
                row["checked_samples"] = len(outs)
            if entry["time"]:
                build.load(samples[0])
                row["end_to_end_ms"] = median_ms(build.call, args.runs)
                steps = build.profile(args.profile_runs)
                row["gpu_ms"] = float(sum(steps))
                row["gemms"] = [{**g, "ms": steps[g["step"]], "int_mm_ms": int_mm_ms(torch, g["m"], g["n"], g["k"])}
                                for g in gemm_steps(build.info)]
                row["last_output"] = build.run(samples[0])
        except Exception as exc:  # noqa: BLE001 - one build failing must not lose the others' results
            row["error"] = f"{type(exc).__name__}: {exc}"
        res["builds"][name] = row
        print(f"{name}: {({k: v for k, v in row.items() if k not in ('gemms', 'last_output')})}", flush=True)
    torch_file = args.carry / "minilm_bf16.npz"
    if torch_file.is_file():
        sample = load_samples(args.carry / manifest["torch_minilm"]["build"] / "samples.npz")[0]
        try:
            config_file = args.carry / "minilm_config.json"
            config = json.loads(config_file.read_text()) if config_file.is_file() else None
            res["torch_minilm"] = torch_minilm_ms(torch, minilm_weights(torch_file), sample, args.runs, config)
        except Exception as exc:  # noqa: BLE001
            res["torch_minilm"] = {"error": f"{type(exc).__name__}: {exc}"}
    outputs = {}
    for name, row in res["builds"].items():
        if "last_output" in row:
            outputs.update({f"{name}/{k}": v for k, v in row.pop("last_output").items()})
    if "output" in res.get("torch_minilm", {}):
        outputs["torch_minilm/last_hidden_state"] = res["torch_minilm"].pop("output")
    if outputs:
        np.savez_compressed(args.out / "timed_outputs.npz", **outputs)
    res["outputs"] = write_outputs(args.out, checked)
    (args.out / "results.json").write_text(json.dumps(res, indent=2))
    print(json.dumps({k: v for k, v in res.items() if k != "builds"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
