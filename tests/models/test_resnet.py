"""ResNet retrieval backbones and the tiny Omniglot CNN."""
from __future__ import annotations

import torch

from broadface.models import build_model, count_macs, count_parameters


def test_resnet50_matches_standard_layout():
    model = build_model("resnet50", embedding_size=512, input_size=224)
    head = count_parameters(model.fc) + count_parameters(model.features)
    # torchvision's resnet50 has 25,557,032 parameters, 2,049,000 of them in its 1000-way fc.
    assert count_parameters(model) - head == 25_557_032 - 2_049_000
    assert abs(count_macs(model) - 4.09e9) / 4.09e9 < 0.01  # ~4.1 GMACs at 224 x 224
    assert model.fc.in_features == 2048


def test_resnet_any_input_size_and_pooling():
    for pooling in ("avg", "max"):
        model = build_model("resnet18", input_size=64, embedding_size=32, pooling=pooling).eval()
        with torch.no_grad():
            assert model(torch.randn(2, 3, 64, 64)).shape == (2, 32)


def test_tinycnn_omniglot_sized_learns():
    """28x28 input; a few SGD steps separate two random classes (it really trains)."""
    torch.manual_seed(0)
    model = build_model("tinycnn", input_size=28, embedding_size=16, width=16)
    head = torch.nn.Linear(16, 2)
    x = torch.rand(32, 3, 28, 28) * 2 - 1
    y = torch.arange(32) % 2
    x[y == 1, :, :14] += 0.5  # class 1: brighter top half
    opt = torch.optim.SGD([*model.parameters(), *head.parameters()], lr=0.1, momentum=0.9)
    losses = []
    for _ in range(12):
        loss = torch.nn.functional.cross_entropy(head(model(x)), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    assert count_parameters(model) < 200_000
