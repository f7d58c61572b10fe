"""`resnet18-224`: the ResNet-18 architecture (3x224x224, 1000 classes), seeded random weights, untrained.

BatchNorm running statistics are made non-trivial by 20 train-mode forward passes over smooth random images
(cumulative average), BN affine parameters are randomised around (1, 0). Task "none": outputs are compared to fp32.
"""
from __future__ import annotations

import logging
import time

import numpy as np
import torch
from torch import nn

from ._common import Artifacts, check_ort, deterministic, export_onnx

logger = logging.getLogger(__name__)

VERSION = 1
SEED = 5
STAT_PASSES = 20
STAT_BATCH = 4
N_CALIB = 16
N_TEST = 16
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet18(nn.Module):
    """conv7x7/2 - BN - ReLU - maxpool3x3/2 - 4 stages x 2 BasicBlocks (64,128,256,512) - GAP - fc(1000)."""

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        stages, cin = [], 64
        for i, cout in enumerate((64, 128, 256, 512)):
            stride = 1 if i == 0 else 2
            stages.append(nn.Sequential(BasicBlock(cin, cout, stride), BasicBlock(cout, cout)))
            cin = cout
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.uniform_(m.weight, 0.5, 1.5)
                nn.init.normal_(m.bias, 0.0, 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def smooth_images(n: int, seed: int, size: int = 224) -> np.ndarray:
    """`n` seeded random smooth RGB images: multi-scale noise (bilinear-upsampled), in [0,1], ImageNet-normalised."""
    gen = torch.Generator().manual_seed(seed)
    img = torch.zeros(n, 3, size, size)
    for res, amp in ((4, 1.0), (14, 0.5), (56, 0.25)):
        noise = torch.randn(n, 3, res, res, generator=gen)
        img += amp * nn.functional.interpolate(noise, size=(size, size), mode="bicubic", align_corners=False)
    lo = img.amin(dim=(1, 2, 3), keepdim=True)
    hi = img.amax(dim=(1, 2, 3), keepdim=True)
    img = ((img - lo) / (hi - lo)).numpy()
    out = (img - IMAGENET_MEAN[None, :, None, None]) / IMAGENET_STD[None, :, None, None]
    return np.ascontiguousarray(out, dtype=np.float32)


def build_artifacts() -> Artifacts:
    with deterministic(SEED):
        model = ResNet18()
        t0 = time.perf_counter()
        model.train()
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = None  # cumulative average over all the passes
        with torch.no_grad():
            for i in range(STAT_PASSES):
                model(torch.from_numpy(smooth_images(STAT_BATCH, seed=SEED * 1000 + i)))
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = 0.1
        model.eval()
        logger.info("BN statistics from %d train-mode passes in %.1f s", STAT_PASSES, time.perf_counter() - t0)
        calib = smooth_images(N_CALIB, seed=SEED * 1000 + 900)
        test = smooth_images(N_TEST, seed=SEED * 1000 + 901)
        onnx_bytes = export_onnx(
            model,
            (torch.from_numpy(calib[:1]),),
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            opset=17,
            keep_batchnorm=True,
        )
        diff = check_ort(onnx_bytes, model, {"input": test}, atol=1e-3)
    return Artifacts(
        onnx=onnx_bytes, calib={"input": calib}, test={"input": test}, labels=None, info={"ort_max_abs_diff": diff}
    )
