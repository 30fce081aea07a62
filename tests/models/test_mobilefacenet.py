"""MobileFaceNet: size and cost match the paper (Chen et al. 2018), 112 and 56 inputs work."""
from __future__ import annotations

import pytest
import torch

from broadface.models import build_model, count_macs, count_parameters


def test_paper_size_and_cost():
    # Paper: 0.99M parameters with a 128-d embedding, 221M MAdds at 112 x 112.
    model = build_model("mobilefacenet", embedding_size=128)
    assert 0.95e6 < count_parameters(model) < 1.03e6
    assert abs(count_macs(model) - 221e6) / 221e6 < 0.02


@pytest.mark.parametrize("size,gdc", [(112, 7), (56, 4)])
def test_input_sizes(size, gdc):
    model = build_model("mobilefacenet", input_size=size, embedding_size=64).eval()
    assert model.gdc[0].kernel_size == (gdc, gdc)
    with torch.no_grad():
        out = model(torch.rand(3, 3, size, size) * 2 - 1)
    assert out.shape == (3, 64) and torch.isfinite(out).all()


def test_trains_one_step():
    model = build_model("mobilefacenet", input_size=56, embedding_size=32).train()
    x = torch.rand(4, 3, 56, 56) * 2 - 1
    loss = model(x).pow(2).mean()
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)


def test_wrong_input_size():
    with pytest.raises(ValueError, match="112 x 112"):
        build_model("mobilefacenet")(torch.zeros(1, 3, 56, 56))
