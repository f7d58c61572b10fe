"""`vit-digits`: a small pre-LN Vision Transformer (4x4 patches of 16x16 digits, dim 64, 4 blocks, 4 heads)."""
from __future__ import annotations

import logging

import torch
from torch import nn

from ._common import Artifacts, random_shift
from .digits import build_classifier

logger = logging.getLogger(__name__)

VERSION = 1
SEED = 4
SIZE = 16
PATCH = 4
DIM = 64
DEPTH = 4
HEADS = 4
MLP_RATIO = 2


class Attention(nn.Module):
    """Multi-head self-attention written out: qkv Linear, per-head scaled MatMul, Softmax, MatMul, out Linear."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.head_dim = dim // heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = torch.softmax((q @ k.transpose(-2, -1)) * self.scale, dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, dim * mlp_ratio), nn.GELU(), nn.Linear(dim * mlp_ratio, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViTDigits(nn.Module):
    """[N,1,16,16] -> Conv patch embedding -> [cls; patches] + pos -> pre-LN blocks -> LayerNorm -> head(cls)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(1, DIM, PATCH, stride=PATCH)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, DIM))
        self.pos_embed = nn.Parameter(torch.randn(1, (SIZE // PATCH) ** 2 + 1, DIM) * 0.02)
        self.blocks = nn.Sequential(*[Block(DIM, HEADS, MLP_RATIO) for _ in range(DEPTH)])
        self.norm = nn.LayerNorm(DIM)
        self.head = nn.Linear(DIM, num_classes)
        nn.init.normal_(self.cls_token, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)  # [N, 16, DIM]
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)
        x = torch.cat([cls, tokens], dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


def build_artifacts() -> Artifacts:
    return build_classifier(
        ViTDigits, size=SIZE, seed=SEED, keep_batchnorm=False, min_accuracy=0.95, epochs=40, lr=2e-3, batch_size=64,
        weight_decay=0.05, label_smoothing=0.1, augment=random_shift(1),
    )
