"""MobileFaceNet (Chen et al., CCBR 2018): < 1M-parameter face embedding network.

Table 1 of the paper, for a 112 x 112 input::

    conv3x3 s2 64 -> depthwise3x3 64 -> bottlenecks (t, c, n, s):
    (2, 64, 5, 2) (4, 128, 1, 2) (2, 128, 6, 1) (4, 128, 1, 2) (2, 128, 2, 1)
    -> conv1x1 512 -> GDConv (linear global depthwise conv, 7x7) -> linear 1x1 -> D

Bottlenecks are MobileNetV2 inverted residuals with PReLU. Here the final linear
1x1 conv on the 1x1 map is written as Linear + BatchNorm1d (same function, same
head as iResNet). The GDConv kernel equals the last feature map, computed from
``input_size`` (112 -> 7, 56 -> 4), so smaller crops work too.
"""
from __future__ import annotations

import torch
from torch import nn

from broadface.models.common import feature_map_size, require_input_size

#: (expansion t, output channels c, repeats n, first stride s) from the paper.
MOBILEFACENET_SETTING = [(2, 64, 5, 2), (4, 128, 1, 2), (2, 128, 6, 1), (4, 128, 1, 2), (2, 128, 2, 1)]


def conv_bn(cin: int, cout: int, kernel: int = 1, stride: int = 1, groups: int = 1,
            act: bool = True, padding: int | None = None) -> nn.Sequential:
    """Conv (no bias) -> BN [-> PReLU]."""
    padding = kernel // 2 if padding is None else padding
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, kernel, stride, padding, groups=groups, bias=False),
                               nn.BatchNorm2d(cout)]
    if act:
        layers.append(nn.PReLU(cout))
    return nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    """1x1 expand -> 3x3 depthwise (stride) -> 1x1 linear projection, residual when shapes match."""

    def __init__(self, cin: int, cout: int, stride: int, expansion: int):
        super().__init__()
        hidden = cin * expansion
        self.use_residual = stride == 1 and cin == cout
        self.conv = nn.Sequential(
            conv_bn(cin, hidden, 1),
            conv_bn(hidden, hidden, 3, stride, groups=hidden),
            conv_bn(hidden, cout, 1, act=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_residual else self.conv(x)


class MobileFaceNet(nn.Module):
    """MobileFaceNet: B x 3 x S x S in [-1, 1] -> B x embedding_size (raw)."""

    def __init__(self, embedding_size: int = 512, input_size: int = 112, width: int = 512):
        super().__init__()
        if input_size < 8:
            raise ValueError(f"mobilefacenet input_size must be >= 8, got {input_size}")
        self.input_size = int(input_size)
        self.conv1 = conv_bn(3, 64, 3, stride=2)
        self.conv2_dw = conv_bn(64, 64, 3, groups=64)
        blocks, cin = [], 64
        for t, c, n, s in MOBILEFACENET_SETTING:
            for i in range(n):
                blocks.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
        self.blocks = nn.Sequential(*blocks)
        self.conv_sep = conv_bn(cin, width, 1)
        side = feature_map_size(self.input_size, 4)  # conv1 + three stride-2 bottlenecks
        self.gdc = conv_bn(width, width, side, groups=width, act=False, padding=0)  # GDConv
        self.fc = nn.Linear(width, embedding_size, bias=False)
        self.features = nn.BatchNorm1d(embedding_size)
        self._init_weights()
        require_input_size(self, self.input_size)

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.conv2_dw(self.conv1(x)))
        x = self.gdc(self.conv_sep(x))
        return self.features(self.fc(torch.flatten(x, 1)))
