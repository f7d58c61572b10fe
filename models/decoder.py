"""`llama-bytes` / `llama-bytes-dyn`: a small Llama-style byte-level decoder trained on the Python standard library.

Architecture (as Llama, scaled down): byte vocabulary (256), token embedding, DEPTH pre-norm blocks of
RMSNorm -> causal grouped-query self-attention with rotary position embeddings -> residual, RMSNorm -> SwiGLU MLP
(`down(silu(gate(x)) * up(x))`) -> residual; final RMSNorm; untied lm_head (MatMul to 256 logits). No biases.
RMSNorm is written out elementwise (`x * rsqrt(mean(x^2) + eps) * w`), so the export is decomposed
(Pow/ReduceMean/Add/Sqrt/Reciprocal/Mul) as real exports are; attention is eager (MatMul, Softmax, MatMul) with the
causal mask applied by `Where`, and the KV heads repeated by Expand + Reshape (HF `repeat_kv`).

Data: the `*.py` sources of this interpreter's standard library (sysconfig "stdlib"; test suites, idlelib,
lib2to3, turtledemo and site-packages left out), split by file: a file is held out when crc32 of its relative path
is 0 mod HELDOUT_MOD. Training samples random windows of the training files; calibration is CALIB windows of
training text, the test set TEST windows of held-out text (input_ids int64 [N, SEQ], batch along axis 0).

`llama-bytes` is exported with a dynamic batch axis and a fixed sequence length SEQ. `llama-bytes-dyn` is trained
no second time: its builder builds `llama-bytes` first (which saves its trained weights beside the entry as
`<entry>.weights.npz`), loads those weights and exports them with dynamic batch and sequence axes; calibration and
test sets are the same arrays.
"""
from __future__ import annotations

import logging
import math
import sysconfig
import time
import zlib
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ._common import (
    Artifacts,
    atomic_write,
    check_ort,
    deterministic,
    export_onnx,
    npz_bytes,
)

logger = logging.getLogger(__name__)

VERSION = 1
SEED = 16
VOCAB = 256
DIM = 128
DEPTH = 4
HEADS = 4
KV_HEADS = 2
MLP_HIDDEN = 384
SEQ = 128  # fixed export length; RoPE tables / mask cover MAX_SEQ for the dynamic export
MAX_SEQ = 512
EPS = 1e-5
ROPE_THETA = 10000.0
STEPS = 400
BATCH = 32
LR = 2e-3
WARMUP = 40
HELDOUT_MOD = 8
CALIB = 32
TEST = 64
SKIP_DIRS = {"test", "tests", "idlelib", "lib2to3", "turtledemo", "site-packages", "__pycache__"}
WEIGHTS_SUFFIX = ".weights.npz"


# ----------------------------------------------------------------------------------------------- model


class RMSNorm(nn.Module):
    """x * rsqrt(mean(x^2, -1) + eps) * weight, elementwise (no fused op in the export)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS) * self.weight


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Attention(nn.Module):
    """Causal GQA: q/k/v/o Linears without bias, RoPE on q and k, k/v heads repeated HEADS // KV_HEADS times."""

    def __init__(self) -> None:
        super().__init__()
        self.head_dim = DIM // HEADS
        self.q_proj = nn.Linear(DIM, HEADS * self.head_dim, bias=False)
        self.k_proj = nn.Linear(DIM, KV_HEADS * self.head_dim, bias=False)
        self.v_proj = nn.Linear(DIM, KV_HEADS * self.head_dim, bias=False)
        self.o_proj = nn.Linear(HEADS * self.head_dim, DIM, bias=False)

    def _repeat_kv(self, x: torch.Tensor) -> torch.Tensor:
        b, h, s, d = x.shape
        rep = HEADS // KV_HEADS
        return x[:, :, None, :, :].expand(b, h, rep, s, d).reshape(b, h * rep, s, d)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, causal: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, HEADS, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, s, KV_HEADS, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, s, KV_HEADS, self.head_dim).transpose(1, 2)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        k, v = self._repeat_kv(k), self._repeat_kv(v)
        scores = (q @ k.transpose(-2, -1)) * (self.head_dim**-0.5)
        scores = scores.masked_fill(causal.logical_not(), torch.finfo(scores.dtype).min)
        out = torch.softmax(scores, dim=-1) @ v
        return self.o_proj(out.transpose(1, 2).reshape(b, s, HEADS * self.head_dim))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(DIM, MLP_HIDDEN, bias=False)
        self.up_proj = nn.Linear(DIM, MLP_HIDDEN, bias=False)
        self.down_proj = nn.Linear(MLP_HIDDEN, DIM, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(DIM)
        self.self_attn = Attention()
        self.post_attention_layernorm = RMSNorm(DIM)
        self.mlp = MLP()

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, causal: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, causal)
        return x + self.mlp(self.post_attention_layernorm(x))


class ByteLlama(nn.Module):
    """input_ids int64 [B, S] (S <= MAX_SEQ) -> logits float32 [B, S, VOCAB]."""

    def __init__(self) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(VOCAB, DIM)
        self.layers = nn.ModuleList([Block() for _ in range(DEPTH)])
        self.norm = RMSNorm(DIM)
        self.lm_head = nn.Linear(DIM, VOCAB, bias=False)
        head_dim = DIM // HEADS
        inv_freq = 1.0 / ROPE_THETA ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
        angles = torch.outer(torch.arange(MAX_SEQ, dtype=torch.float64), inv_freq)
        angles = torch.cat((angles, angles), dim=-1)
        self.register_buffer("rope_cos", angles.cos().float(), persistent=False)
        self.register_buffer("rope_sin", angles.sin().float(), persistent=False)
        self.register_buffer("causal", torch.ones(MAX_SEQ, MAX_SEQ, dtype=torch.bool).tril(), persistent=False)
        for name, p in self.named_parameters():
            if p.dim() == 2:
                std = 0.02 / math.sqrt(2 * DEPTH) if name.endswith(("o_proj.weight", "down_proj.weight")) else 0.02
                nn.init.normal_(p, std=std)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        s = input_ids.shape[1]
        cos, sin, causal = self.rope_cos[:s], self.rope_sin[:s], self.causal[:s, :s]
        x = self.embed_tokens(input_ids)
        for layer in self.layers:
            x = layer(x, cos, sin, causal)
        return self.lm_head(self.norm(x))


# ----------------------------------------------------------------------------------------------- data


def stdlib_files() -> tuple[list[Path], list[Path]]:
    """(training files, held-out files) of the stdlib sources, each sorted by relative path."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(
        (p for p in root.rglob("*.py") if not SKIP_DIRS.intersection(p.relative_to(root).parts[:-1])),
        key=lambda p: p.relative_to(root).as_posix(),
    )
    held = [p for p in files if zlib.crc32(p.relative_to(root).as_posix().encode()) % HELDOUT_MOD == 0]
    train = [p for p in files if zlib.crc32(p.relative_to(root).as_posix().encode()) % HELDOUT_MOD != 0]
    if len(train) < 50 or len(held) < 5:
        raise RuntimeError(f"too few stdlib sources under {root}: {len(train)} training / {len(held)} held out")
    return train, held


def corpus_bytes(files: list[Path]) -> np.ndarray:
    """The files' bytes concatenated (a blank line between files) as uint8."""
    return np.frombuffer(b"\n\n".join(p.read_bytes() for p in files), dtype=np.uint8)


def windows(text: np.ndarray, count: int, length: int, rng: np.random.Generator) -> np.ndarray:
    """`count` windows of `length` bytes at seeded random offsets, int64 [count, length]."""
    starts = rng.integers(0, len(text) - length, size=count)
    return np.stack([text[s : s + length] for s in starts]).astype(np.int64)


# ----------------------------------------------------------------------------------------------- training


def lm_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-byte cross-entropy (nats) of `model` on ids [B, S+1]: predicts ids[:, 1:] from ids[:, :-1]."""
    logits = model(ids[:, :-1])
    return nn.functional.cross_entropy(logits.reshape(-1, VOCAB), ids[:, 1:].reshape(-1))


def lr_factor(step: int, steps: int) -> float:
    """Linear warm-up over WARMUP steps, then cosine decay from 1 to 0.1."""
    if step < WARMUP:
        return (step + 1) / WARMUP
    return 0.1 + 0.45 * (1 + math.cos(math.pi * (step - WARMUP) / (steps - WARMUP)))


def train(model: nn.Module, text: np.ndarray, steps: int, seed: int) -> list[float]:
    """AdamW, linear warm-up then cosine decay, seeded windows of SEQ+1 bytes; returns per-step losses."""
    rng = np.random.default_rng(seed)
    decay = [p for p in model.parameters() if p.dim() == 2]
    other = [p for p in model.parameters() if p.dim() != 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}], lr=LR, betas=(0.9, 0.95)
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: lr_factor(i, steps))
    losses: list[float] = []
    t0 = time.perf_counter()
    model.train()
    for step in range(steps):
        ids = torch.from_numpy(windows(text, BATCH, SEQ + 1, rng))
        loss = lm_loss(model, ids)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step % 50 == 0 or step == steps - 1:
            logger.debug("step %d loss %.4f (%.1f s)", step, losses[-1], time.perf_counter() - t0)
    model.eval()
    logger.info("trained ByteLlama for %d steps in %.1f s, last loss %.3f", steps, time.perf_counter() - t0,
                float(np.mean(losses[-20:])))
    return losses


# ----------------------------------------------------------------------------------------------- build


def weights_path(cache_dir: Path) -> Path:
    """Where `llama-bytes` keeps its trained state dict (float32 arrays keyed by parameter name)."""
    return Path(cache_dir) / f"llama-bytes-v{VERSION}{WEIGHTS_SUFFIX}"


def _export(model: nn.Module, example: np.ndarray, dynamic_seq: bool) -> bytes:
    axes = {0: "batch", 1: "sequence"} if dynamic_seq else {0: "batch"}
    return export_onnx(
        model, (torch.from_numpy(example),), input_names=["input_ids"], output_names=["logits"],
        dynamic_axes={"input_ids": axes, "logits": axes}, opset=17, keep_batchnorm=False,
    )


def _eval_loss(model: nn.Module, ids: np.ndarray) -> float:
    with torch.no_grad():
        return float(lm_loss(model, torch.from_numpy(ids)))


def build_artifacts(cache_dir: Path) -> Artifacts:
    """Train ByteLlama (STEPS steps), save its weights to `weights_path(cache_dir)`, export with a fixed length."""
    train_files, held_files = stdlib_files()
    train_text, held_text = corpus_bytes(train_files), corpus_bytes(held_files)
    with deterministic(SEED):
        rng = np.random.default_rng(SEED)
        calib = windows(train_text, CALIB, SEQ, rng)
        test = windows(held_text, TEST, SEQ, rng)
        model = ByteLlama()
        losses = train(model, train_text, STEPS, SEED + 1)
        state = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
        atomic_write(weights_path(cache_dir), npz_bytes(state))
        held_loss = _eval_loss(model, test)
        onnx_bytes = _export(model, test[:2], dynamic_seq=False)
        diff = check_ort(onnx_bytes, model, {"input_ids": test}, atol=1e-3)
    info = {
        "params": sum(int(np.prod(v.shape)) for v in state.values()),
        "train_files": len(train_files), "heldout_files": len(held_files),
        "train_bytes": len(train_text), "heldout_bytes": len(held_text),
        "train_loss_last20": round(float(np.mean(losses[-20:])), 4),
        "torch_test_perplexity": round(math.exp(held_loss), 4), "ort_max_abs_diff": diff,
    }
    logger.info("llama-bytes: held-out perplexity %.3f (torch), ORT diff %.3g", info["torch_test_perplexity"], diff)
    return Artifacts(onnx=onnx_bytes, calib={"input_ids": calib}, test={"input_ids": test}, labels=None, info=info)


def build_dyn_artifacts(cache_dir: Path) -> Artifacts:
    """`llama-bytes`'s trained weights (built first if needed) exported with dynamic batch and sequence axes."""
    from . import build

    fixed = build("llama-bytes", cache_dir)
    with np.load(weights_path(cache_dir)) as w:
        state = {k: torch.from_numpy(w[k]) for k in w.files}
    with np.load(fixed.calib) as c, np.load(fixed.test) as t:
        calib, test = c["input_ids"], t["input_ids"]
    with deterministic(SEED):
        model = ByteLlama()
        model.load_state_dict(state)
        model.eval()
        onnx_bytes = _export(model, test[:2, : SEQ // 2], dynamic_seq=True)
        diff = max(check_ort(onnx_bytes, model, {"input_ids": test[:, :n]}, atol=1e-3) for n in (SEQ, 37))
        held_loss = _eval_loss(model, test)
    info = {"weights": weights_path(cache_dir).name, "torch_test_perplexity": round(math.exp(held_loss), 4),
            "ort_max_abs_diff": diff}
    return Artifacts(onnx=onnx_bytes, calib={"input_ids": calib}, test={"input_ids": test}, labels=None, info=info)
