"""BatchNorm folding: exact in eval mode, folds exactly what can be folded."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from broadface.infer.fold_bn import count_batchnorm, fold_batchnorm
from broadface.models import build_model


def randomise_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial running stats and affine params, so folding mistakes show up."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            c = m.num_features
            m.running_mean.copy_(torch.rand(c, generator=gen) - 0.5)
            m.running_var.copy_(torch.rand(c, generator=gen) + 0.5)
            if m.affine:
                m.weight.data.copy_(torch.rand(c, generator=gen) + 0.5)
                m.bias.data.copy_(torch.rand(c, generator=gen) - 0.5)
    return model.eval()


def max_rel_diff(a: nn.Module, b: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        ya, yb = a(x), b(x)
    return ((ya - yb).abs().max() / ya.abs().max()).item()


CASES = [
    # name, kwargs, BNs expected to remain after folding
    ("iresnet", dict(layers=[2, 1, 2, 1], base_width=16, input_size=56), "block_bn1"),
    ("mobilefacenet", dict(input_size=56), 0),
    ("resnet18", dict(input_size=64), 0),
    ("tinycnn", dict(input_size=28), 0),
]


@pytest.mark.parametrize("name,kwargs,left", CASES, ids=[c[0] for c in CASES])
def test_fold_is_exact_and_complete(name, kwargs, left):
    model = randomise_bn(build_model(name, embedding_size=64, **kwargs))
    before = count_batchnorm(model)
    folded = fold_batchnorm(model)
    size = kwargs["input_size"]
    assert max_rel_diff(model, folded, torch.rand(4, 3, size, size) * 2 - 1) < 1e-5
    if left == "block_bn1":  # iResNet: only the BN before each zero-padded conv3x3 stays
        left = sum(1 for m in model.modules() if type(m).__name__ == "IBasicBlock")
        assert all(n.endswith(".bn1") and n.startswith("layer")
                   for n, m in folded.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))
    assert count_batchnorm(folded) == left
    assert count_batchnorm(model) == before  # original untouched


class SharedConvOutput(nn.Module):
    """conv output feeds BN *and* a skip: folding the BN into the conv would change the skip."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.conv2 = nn.Conv2d(3, 3, 1)
        self.bn2 = nn.BatchNorm2d(3)

    def forward(self, x):
        y = self.conv(x)
        return self.bn2(self.conv2(self.bn(y) + y))


def test_does_not_fold_when_conv_output_is_shared():
    model = randomise_bn(SharedConvOutput())
    folded = fold_batchnorm(model)
    assert isinstance(folded.bn, nn.BatchNorm2d) and isinstance(folded.bn2, nn.Identity)
    assert max_rel_diff(model, folded, torch.randn(2, 3, 8, 8)) < 1e-5


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
            return self.body(x)
        return self.body(-x)


def test_untraceable_model_falls_back_to_sequential_pairs():
    model = randomise_bn(Untraceable())
    with pytest.warns(UserWarning, match="could not trace"):
        folded = fold_batchnorm(model)
    assert count_batchnorm(folded) == 0
    assert max_rel_diff(model, folded, torch.rand(2, 3, 8, 8)) < 1e-5
