"""iResNet: the "improved" pre-BN residual network used by insightface arcface_torch.

Layout (parameter names match insightface checkpoints, so their ``.pth`` files load
with ``model.load_state_dict``)::

    conv1(3x3, s1) -> bn1 -> prelu                      # stem keeps 112x112
    layer1..layer4: IBasicBlock x layers[i], first one stride 2 (64,128,256,512 ch)
    bn2 -> dropout -> flatten -> fc -> features(BN1d)   # "OptionE" embedding head

IBasicBlock is BN -> conv3x3 -> BN -> PReLU -> conv3x3(stride) -> BN, plus a
conv1x1+BN shortcut when shape changes; there is no activation after the sum.
The FC input is 512 x s x s where s = input_size halved (rounding up) four
times: 112 -> 7, 56 -> 4, 28 -> 2.

Depth naming: depth = 2 * sum(layers) + 2 (stem conv + FC), e.g. iresnet100 is
[3, 13, 30, 3]. BigFace-style very deep nets are quoted with three numbers
(blocks in the first three stages); the fourth stage keeps the first stage's
count, as in every insightface net ([3,13,30,3], [6,26,60,6]). So ResNet120
[3,13,40] -> [3,13,40,3] (2*59+2 = 120) and ResNet1.2K [3,80,512] -> [3,80,512,3].
"""
from __future__ import annotations

import contextlib
from typing import Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from broadface.models.common import feature_map_size, require_input_size

#: Stage depths of the named iResNets (see module docstring for the 3-number specs).
IRESNET_LAYERS: dict[str, list[int]] = {
    "iresnet18": [2, 2, 2, 2],
    "iresnet34": [3, 4, 6, 3],
    "iresnet50": [3, 4, 14, 3],
    "iresnet100": [3, 13, 30, 3],
    "iresnet120": [3, 13, 40, 3],
    "iresnet140": [3, 15, 48, 3],
    "iresnet200": [6, 26, 60, 6],
    "iresnet240": [3, 25, 88, 3],
    "iresnet600": [3, 70, 220, 3],
    "iresnet1200": [3, 80, 512, 3],
}


def expand_layers(layers: Sequence[int]) -> list[int]:
    """Four stage depths from a 4-number spec, or a BigFace 3-number spec (4th = 1st)."""
    layers = [int(n) for n in layers]
    if len(layers) == 3:
        layers = layers + [layers[0]]
    if len(layers) != 4 or any(n < 1 for n in layers):
        raise ValueError(f"iresnet layers must be 3 or 4 positive block counts, got {layers}")
    return layers


def conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False)


class IBasicBlock(nn.Module):
    """Pre-BN residual block: BN-conv-BN-PReLU-conv-BN (+ shortcut)."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes, eps=1e-5)
        self.conv1 = conv3x3(inplanes, planes)
        self.bn2 = nn.BatchNorm2d(planes, eps=1e-5)
        self.prelu = nn.PReLU(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn3 = nn.BatchNorm2d(planes, eps=1e-5)
        self.downsample = downsample

    @staticmethod
    def _autocast(device_type: str) -> torch.autocast:
        """fp16 on CUDA, bf16 elsewhere (CPU autocast is bf16-first)."""
        return torch.autocast(device_type, dtype=torch.float16 if device_type == "cuda" else torch.bfloat16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        identity = x if self.downsample is None else self.downsample(x)
        return out + identity


class _NoBNStatsUpdate:
    """Recompute context for checkpointing: BN uses batch stats but leaves running stats alone.

    Without it, the recomputed forward would apply the running-mean/var momentum a
    second time per step. momentum=0 keeps running stats bit-exact; the batch
    counter is restored on exit.
    """

    def __init__(self, module: nn.Module):
        self.bns = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]

    def __enter__(self) -> None:
        self.saved = [(m.momentum, None if m.num_batches_tracked is None else m.num_batches_tracked.clone())
                      for m in self.bns]
        for m in self.bns:
            m.momentum = 0.0

    def __exit__(self, *exc) -> None:
        for m, (momentum, tracked) in zip(self.bns, self.saved):
            m.momentum = momentum
            if tracked is not None:
                m.num_batches_tracked.copy_(tracked)


class IResNet(nn.Module):
    """iResNet embedding network: B x 3 x S x S in [-1, 1] -> B x embedding_size (raw)."""

    def __init__(
        self,
        layers: Sequence[int] = (3, 4, 14, 3),
        embedding_size: int = 512,
        input_size: int = 112,
        dropout: float = 0.0,
        base_width: int = 64,
        zero_init_residual: bool = False,
        fp16: bool = False,
        gradient_checkpointing: bool = False,
    ):
        super().__init__()
        layers = expand_layers(layers)
        if input_size < 8:
            raise ValueError(f"iresnet input_size must be >= 8, got {input_size}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"iresnet dropout must be in [0, 1), got {dropout}")
        self.input_size = int(input_size)
        self.fp16 = fp16
        self.gradient_checkpointing = gradient_checkpointing
        widths = [base_width, 2 * base_width, 4 * base_width, 8 * base_width]
        self.inplanes = base_width

        self.conv1 = conv3x3(3, base_width)
        self.bn1 = nn.BatchNorm2d(base_width, eps=1e-5)
        self.prelu = nn.PReLU(base_width)
        self.layer1 = self._make_layer(widths[0], layers[0])
        self.layer2 = self._make_layer(widths[1], layers[1])
        self.layer3 = self._make_layer(widths[2], layers[2])
        self.layer4 = self._make_layer(widths[3], layers[3])
        self.bn2 = nn.BatchNorm2d(widths[3], eps=1e-5)
        self.dropout = nn.Dropout(p=dropout, inplace=True)
        side = feature_map_size(self.input_size, 4)
        self.fc = nn.Linear(widths[3] * side * side, embedding_size)
        self.features = nn.BatchNorm1d(embedding_size, eps=1e-5)
        self._init_weights(zero_init_residual)
        require_input_size(self, self.input_size)

    def _make_layer(self, planes: int, blocks: int) -> nn.Sequential:
        downsample = nn.Sequential(
            nn.Conv2d(self.inplanes, planes, kernel_size=1, stride=2, bias=False),
            nn.BatchNorm2d(planes, eps=1e-5),
        )  # every stage starts with stride 2, so the first block always needs a shortcut
        modules = [IBasicBlock(self.inplanes, planes, 2, downsample)]
        self.inplanes = planes
        modules += [IBasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*modules)

    def _init_weights(self, zero_init_residual: bool) -> None:
        # insightface init: conv ~ N(0, 0.1), BN = identity, embedding-BN scale fixed at 1.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0, 0.1)
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.ones_(self.features.weight)
        self.features.weight.requires_grad = False
        if zero_init_residual:  # each block starts as identity: helps very deep nets
            for m in self.modules():
                if isinstance(m, IBasicBlock):
                    nn.init.zeros_(m.bn3.weight)

    def _run_stage(self, stage: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
        if not (self.gradient_checkpointing and self.training and torch.is_grad_enabled()):
            return stage(x)
        for block in stage:
            x = checkpoint(block, x, use_reentrant=False,
                           context_fn=lambda b=block: (contextlib.nullcontext(), _NoBNStatsUpdate(b)))
        return x

    @staticmethod
    def _autocast(device_type: str) -> torch.autocast:
        """fp16 on CUDA, bf16 elsewhere (CPU autocast is bf16-first)."""
        return torch.autocast(device_type, dtype=torch.float16 if device_type == "cuda" else torch.bfloat16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        amp = self.fp16 and not torch.jit.is_tracing()
        with self._autocast(x.device.type) if amp else contextlib.nullcontext():
            x = self.prelu(self.bn1(self.conv1(x)))
            for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
                x = self._run_stage(stage, x)
            x = self.dropout(torch.flatten(self.bn2(x), 1))
        x = self.fc(x.float() if amp else x)  # embedding head in fp32, as insightface does
        return self.features(x)
