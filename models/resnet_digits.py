"""`resnet-digits`: a small ResNet (basic blocks, strided blocks with 1x1 projection shortcuts) on 16x16 digits."""
from __future__ import annotations

import logging

import torch
from torch import nn

from ._common import Artifacts
from .digits import build_classifier

logger = logging.getLogger(__name__)

VERSION = 1
SEED = 2
SIZE = 16


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN + shortcut (identity, or 1x1 conv-BN projection when strided / widened), ReLU."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNetDigits(nn.Module):
    """[N,1,16,16] -> stem16 -> block16 -> block32/2 (proj) -> block32 -> block64/2 (proj) -> GAP -> Gemm(10)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.layers = nn.Sequential(
            BasicBlock(16, 16), BasicBlock(16, 32, stride=2), BasicBlock(32, 32), BasicBlock(32, 64, stride=2)
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.layers(self.stem(x))), 1))


def build_artifacts() -> Artifacts:
    return build_classifier(
        ResNetDigits, size=SIZE, seed=SEED, keep_batchnorm=True, min_accuracy=0.97, epochs=25, lr=3e-3, batch_size=64
    )
