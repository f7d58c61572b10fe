"""`digits-cnn`: a small Conv-BN-ReLU CNN with a Gemm head on the native 8x8 digits."""
from __future__ import annotations

import logging

import torch
from torch import nn

from ._common import Artifacts
from .digits import build_classifier

logger = logging.getLogger(__name__)

VERSION = 1
SEED = 1


def conv_bn_relu(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class DigitsCNN(nn.Module):
    """[N,1,8,8] -> conv16 -> conv32 -> maxpool -> conv64 -> maxpool -> flatten(256) -> Gemm(10)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            conv_bn_relu(1, 16),
            conv_bn_relu(16, 32),
            nn.MaxPool2d(2),
            conv_bn_relu(32, 64),
            nn.MaxPool2d(2),
        )
        self.head = nn.Linear(64 * 2 * 2, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.features(x), 1))


def build_artifacts() -> Artifacts:
    return build_classifier(
        DigitsCNN, size=8, seed=SEED, keep_batchnorm=True, min_accuracy=0.97, epochs=30, lr=3e-3, batch_size=64
    )
