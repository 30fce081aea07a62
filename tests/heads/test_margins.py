import math

import pytest
import torch

from broadface.heads import ArcFace, CombinedMargin, CosFace, NormSoftmax

from .reference import dense_margin_loss, margin_target


def _thetas(m):
    # θ near 0, interior, right at and past the fallback threshold π − m, and near π
    return torch.tensor([0.0, 1e-4, 0.3, 1.2, math.pi - m - 1e-3, math.pi - m + 1e-3, 3.0, math.pi - 1e-4, math.pi])


@pytest.mark.parametrize("m", [0.5, 0.3])
def test_arcface_target_matches_formula(m):
    head = ArcFace(4, 3, margin=m)
    cos = torch.cos(_thetas(m).double()).float()
    got = head.target(cos)
    theta, c = torch.acos(cos.double()), cos.double()  # the angle the fp32 cosine really encodes
    want = torch.where(theta + m <= math.pi, torch.cos(theta + m), c - m * math.sin(m))
    assert torch.allclose(got, want.float(), atol=1e-5)
    assert got[2] == pytest.approx(math.cos(0.3 + m), abs=1e-6)


def test_cosface_and_normsoftmax_targets():
    cos = torch.linspace(-1, 1, 11)
    assert torch.equal(CosFace(3, 2, margin=0.4).target(cos), cos - 0.4)
    assert torch.equal(NormSoftmax(3, 2).target(cos), cos)


def test_combined_margin_general_and_presets():
    cos = torch.cos(torch.linspace(0.01, 3.1, 50, dtype=torch.float64))
    head = CombinedMargin(4, 3, m1=1.2, m2=0.3, m3=0.1)
    want = margin_target(cos, 1.2, 0.3, 0.1)
    assert torch.allclose(head.target(cos).double(), want, atol=1e-5)
    arc, comb = ArcFace(4, 3, margin=0.5), CombinedMargin(4, 3, 1.0, 0.5, 0.0)
    assert torch.allclose(arc.target(cos.float()), comb.target(cos.float()))


@pytest.mark.parametrize("cls,kw,m", [(ArcFace, {"margin": 0.5}, (1.0, 0.5, 0.0)),
                                       (CosFace, {"margin": 0.4}, (1.0, 0.0, 0.4)),
                                       (NormSoftmax, {}, (1.0, 0.0, 0.0))])
def test_loss_and_grads_match_dense_onehot(cls, kw, m):
    torch.manual_seed(0)
    head = cls(7, 5, scale=32.0, **kw)
    x = torch.randn(9, 5, requires_grad=True)
    y = torch.randint(0, 7, (9,))
    loss = head(x, y)
    loss.backward()
    xr = x.detach().double().requires_grad_(True)
    wr = head.weight.detach().double().requires_grad_(True)
    ref = dense_margin_loss(xr, wr, y, 32.0, *m)
    ref.backward()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    assert torch.allclose(x.grad.double(), xr.grad, atol=1e-5, rtol=1e-4)
    assert torch.allclose(head.weight.grad.double(), wr.grad, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("cls", [ArcFace, CosFace, NormSoftmax])
def test_no_nan_at_cos_plus_minus_one(cls):
    head = cls(3, 4)
    with torch.no_grad():
        head.weight.copy_(torch.eye(3, 4))
    # embeddings exactly on (cos=+1) and opposite (cos=−1) their class rows
    x = torch.tensor([[1.0, 0, 0, 0], [0, -1.0, 0, 0], [0, 0, 2.0, 0]], requires_grad=True)
    y = torch.tensor([0, 1, 2])
    loss = head(x, y)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(x.grad).all() and torch.isfinite(head.weight.grad).all()


def test_logits_fp32_under_bf16_autocast():
    torch.manual_seed(0)
    head = ArcFace(11, 8)
    x = torch.randn(6, 8)
    y = torch.randint(0, 11, (6,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = head.logits(x, y)
        loss = head(x, y)
    assert logits.dtype == torch.float32 and loss.dtype == torch.float32
    assert loss.item() == pytest.approx(head(x, y).item(), rel=0.05)
    loss.backward()
    assert torch.isfinite(head.weight.grad).all()


@pytest.mark.parametrize("labels,match", [
    (torch.tensor([0.0, 1.0]), "integer"),
    (torch.tensor([0, 5]), "label 5 is outside"),
    (torch.tensor([-1, 0]), "label -1 is outside"),
    (torch.tensor([[0, 1]]), "1-D"),
    (torch.tensor([0, 1, 2]), "3 labels for 2"),
])
def test_bad_labels_raise(labels, match):
    head = ArcFace(5, 4)
    with pytest.raises(ValueError, match=match):
        head(torch.randn(2, 4), labels)


def test_bad_embedding_shape_raises():
    with pytest.raises(ValueError, match="shape"):
        ArcFace(5, 4)(torch.randn(2, 3), torch.tensor([0, 1]))
