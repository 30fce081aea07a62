"""Optimizers: parameter groups, SGD/AdamW/LARS, the LARS update rule."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from broadface.train.config import OptimConfig
from broadface.train.optim import LARS, build_optimizer, param_groups


def nets():
    backbone = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    head = nn.Linear(3, 5, bias=False)
    return backbone, head


def test_groups_split_backbone_decay_no_decay_and_head():
    backbone, head = nets()
    cfg = OptimConfig(name="sgd", lr=0.1, weight_decay=1e-3, head_lr_mult=10.0, head_weight_decay=0.0,
                      no_decay_bias_bn=True)
    groups = {g["name"]: g for g in param_groups(cfg, backbone, head)}
    assert [p.shape for p in groups["backbone"]["params"]] == [torch.Size([3, 4])]
    assert len(groups["backbone_no_decay"]["params"]) == 3  # linear bias, BN weight and bias
    assert groups["backbone_no_decay"]["weight_decay"] == 0.0 and groups["backbone"]["weight_decay"] == 1e-3
    assert groups["head"]["lr"] == pytest.approx(1.0) and groups["head"]["weight_decay"] == 0.0
    insightface = {g["name"]: g for g in param_groups(OptimConfig(weight_decay=1e-3), backbone, head)}
    assert insightface["backbone_no_decay"]["weight_decay"] == 1e-3  # default: decay everything


@pytest.mark.parametrize("name, cls", [("sgd", torch.optim.SGD), ("adamw", torch.optim.AdamW), ("lars", LARS)])
def test_build_each_optimizer_and_step(name, cls):
    backbone, head = nets()
    opt = build_optimizer(OptimConfig(name=name, lr=0.01), backbone, head)
    assert isinstance(opt, cls)
    before = head.weight.detach().clone()
    head(backbone(torch.randn(8, 4))).pow(2).mean().backward()
    opt.step()
    assert not torch.equal(before, head.weight)
    state = opt.state_dict()
    again = build_optimizer(OptimConfig(name=name, lr=0.01), backbone, head)
    again.load_state_dict(state)


def test_lars_update_rule():
    w = nn.Parameter(torch.tensor([3.0, 4.0]))  # |w| = 5
    b = nn.Parameter(torch.tensor([1.0]))
    opt = LARS([{"params": [w]}, {"params": [b], "weight_decay": 0.0, "lars_adapt": False}],
               lr=0.1, momentum=0.9, weight_decay=0.01, trust_coefficient=0.02)
    w.grad, b.grad = torch.tensor([0.6, 0.8]), torch.tensor([2.0])
    opt.step()
    d = torch.tensor([0.6, 0.8]) + 0.01 * torch.tensor([3.0, 4.0])  # g + wd*w
    trust = 0.02 * 5.0 / d.norm()
    torch.testing.assert_close(w.detach(), torch.tensor([3.0, 4.0]) - 0.1 * trust * d)
    torch.testing.assert_close(b.detach(), torch.tensor([1.0 - 0.1 * 2.0]))  # plain SGD: no trust, no decay
    w.grad, b.grad = torch.zeros(2), torch.zeros(1)
    w_before = w.detach().clone()
    opt.step()  # momentum carries the previous update (wd*w only adds a tiny trust-scaled term)
    assert (w_before - w.detach()).norm() > 0.5 * (0.1 * trust * d).norm()
    torch.testing.assert_close(b.detach(), torch.tensor([1.0 - 0.1 * 2.0 * 1.9]))


def test_lars_zero_weight_uses_unit_trust():
    w = nn.Parameter(torch.zeros(2))
    opt = LARS([w], lr=1.0, momentum=0.0, weight_decay=0.0)
    w.grad = torch.tensor([1.0, -1.0])
    opt.step()
    torch.testing.assert_close(w.detach(), torch.tensor([-1.0, 1.0]))


def test_lars_excludes_bias_and_bn():
    backbone, head = nets()
    groups = {g["name"]: g for g in param_groups(OptimConfig(name="lars", weight_decay=1e-3), backbone, head)}
    assert groups["backbone_no_decay"]["lars_adapt"] is False and groups["backbone_no_decay"]["weight_decay"] == 0.0
    assert "lars_adapt" not in groups["backbone"]  # default True from LARS
