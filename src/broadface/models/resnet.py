"""Retrieval backbones: standard ResNet (He et al. 2016) and a tiny CNN for Omniglot.

``ResNet`` follows the usual ImageNet layout (7x7/2 stem, 3x3/2 max-pool, four
stages, stride on the 3x3 conv of the bottleneck, "v1.5"), then global pooling
-> Linear -> BatchNorm1d as the embedding, the common deep-metric-learning head.
Global pooling makes it input-size agnostic (``input_size`` is only recorded
for export). ``TinyCNN`` is the classic 4 x (conv3x3-BN-ReLU-maxpool) few-shot
network, small enough to train on 28 x 28 Omniglot on a CPU.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

#: name -> (block type, stage depths)
RESNET_LAYERS: dict[str, tuple[str, list[int]]] = {
    "resnet18": ("basic", [2, 2, 2, 2]),
    "resnet34": ("basic", [3, 4, 6, 3]),
    "resnet50": ("bottleneck", [3, 4, 6, 3]),
    "resnet101": ("bottleneck", [3, 4, 23, 3]),
}


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(cin, planes, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1):
        super().__init__()
        cout = planes * self.expansion
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(cin, cout, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


def _shortcut(cin: int, cout: int, stride: int) -> nn.Module | None:
    if stride == 1 and cin == cout:
        return None
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))


class ResNet(nn.Module):
    """ResNet embedding network: B x 3 x H x W -> B x embedding_size (raw)."""

    def __init__(self, layers: Sequence[int] = (3, 4, 6, 3), block: str = "bottleneck",
                 embedding_size: int = 512, input_size: int = 224, pooling: str = "avg",
                 zero_init_residual: bool = True):
        super().__init__()
        blocks = {"basic": BasicBlock, "bottleneck": Bottleneck}
        if block not in blocks:
            raise ValueError(f"resnet block must be one of {sorted(blocks)}, got {block!r}")
        if pooling not in ("avg", "max"):
            raise ValueError(f"resnet pooling must be 'avg' or 'max', got {pooling!r}")
        if len(layers) != 4 or any(int(n) < 1 for n in layers):
            raise ValueError(f"resnet layers must be 4 positive block counts, got {list(layers)}")
        cls = blocks[block]
        self.input_size = int(input_size)
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        stages, cin = [], 64
        for i, (planes, n) in enumerate(zip((64, 128, 256, 512), layers)):
            stage = []
            for j in range(int(n)):
                stage.append(cls(cin, planes, 2 if (i > 0 and j == 0) else 1))
                cin = planes * cls.expansion
            stages.append(nn.Sequential(*stage))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.pool = nn.AdaptiveAvgPool2d(1) if pooling == "avg" else nn.AdaptiveMaxPool2d(1)
        self.fc = nn.Linear(cin, embedding_size)
        self.features = nn.BatchNorm1d(embedding_size)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        if zero_init_residual:  # residual branches start at zero (Goyal et al. 2017)
            for m in self.modules():
                if isinstance(m, (BasicBlock, Bottleneck)):
                    nn.init.zeros_((m.bn3 if isinstance(m, Bottleneck) else m.bn2).weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.features(self.fc(torch.flatten(self.pool(x), 1)))


class TinyCNN(nn.Module):
    """4 x (conv3x3-BN-ReLU-maxpool2) -> global avg pool -> Linear -> BN1d.

    ~0.11M conv parameters at width 64; 28 x 28 Omniglot trains on a CPU in minutes.
    """

    def __init__(self, embedding_size: int = 128, input_size: int = 28, width: int = 64, depth: int = 4):
        super().__init__()
        if depth < 1 or width < 1:
            raise ValueError(f"tinycnn depth and width must be positive, got depth={depth}, width={width}")
        self.input_size = int(input_size)
        layers: list[nn.Module] = []
        cin = 3
        for _ in range(depth):
            layers += [nn.Conv2d(cin, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
                       nn.ReLU(inplace=True), nn.MaxPool2d(2, ceil_mode=True)]
            cin = width
        self.body = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, embedding_size)
        self.features = nn.BatchNorm1d(embedding_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(self.fc(torch.flatten(self.pool(self.body(x)), 1)))
