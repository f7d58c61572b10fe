"""`mobilenetv2-digits`: MobileNetV2-style net (inverted residuals, depthwise 3x3, ReLU6, linear bottlenecks), 32x32."""
from __future__ import annotations

import logging

import torch
from torch import nn

from ._common import Artifacts
from .digits import build_classifier

logger = logging.getLogger(__name__)

VERSION = 1
SEED = 3
SIZE = 32

# (expansion t, out channels c, repeats n, first stride s), as in the MobileNetV2 paper's table, scaled down
SETTINGS = [(1, 16, 1, 1), (4, 24, 2, 2), (4, 32, 2, 2), (4, 64, 2, 1)]


def conv_bn(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, act: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]
    if act:
        layers.append(nn.ReLU6())
    return nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    """[1x1 expand-BN-ReLU6] -> depthwise 3x3-BN-ReLU6 -> 1x1 project-BN (linear), + input when shapes allow."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        layers: list[nn.Module] = [conv_bn(cin, hidden, 1)] if expand != 1 else []
        layers += [conv_bn(hidden, hidden, 3, stride=stride, groups=hidden), conv_bn(hidden, cout, 1, act=False)]
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return x + out if self.residual else out


class MobileNetV2Digits(nn.Module):
    """[N,1,32,32] -> stem conv3x3/2 -> inverted residual stages -> 1x1 conv 128 -> GAP -> Gemm(10)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = [conv_bn(1, 16, 3, stride=2)]
        cin = 16
        for t, c, n, s in SETTINGS:
            for i in range(n):
                layers.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
        layers.append(conv_bn(cin, 128, 1))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


def build_artifacts() -> Artifacts:
    return build_classifier(
        MobileNetV2Digits, size=SIZE, seed=SEED, keep_batchnorm=True, min_accuracy=0.97, epochs=20, lr=5e-3,
        batch_size=64,
    )
