"""Optimizers: SGD, AdamW and LARS over backbone / classifier parameter groups.

Groups (empty ones are dropped), each tagged with ``name``:

- ``backbone``: weights with ndim > 1 (convolutions, linear layers);
- ``backbone_no_decay``: biases and norm / PReLU parameters (ndim <= 1);
- ``head``: the classifier ``W`` (lr x ``head_lr_mult``, ``head_weight_decay``).

LARS never decays or trust-scales the ``backbone_no_decay`` group, as usual;
SGD/AdamW do so only with ``no_decay_bias_bn=True`` (insightface decays everything).
"""
from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn

from broadface.train.config import OptimConfig


class LARS(torch.optim.Optimizer):
    """SGD with momentum and a layer-wise trust ratio (You, Gitman, Ginsburg 2017).

    Per parameter ``w`` with gradient ``g``: ``d = g + wd*w``; if the group adapts,
    ``d *= eta * |w| / |d|`` (1 when either norm is 0); ``v = momentum*v + d``;
    ``w -= lr * v``. Groups with ``lars_adapt=False`` skip the trust ratio.
    """

    def __init__(self, params: Iterable[Any], lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 trust_coefficient: float = 0.001, eps: float = 1e-8):
        if lr <= 0 or momentum < 0 or weight_decay < 0 or trust_coefficient <= 0:
            raise ValueError(f"LARS: invalid lr={lr}, momentum={momentum}, weight_decay={weight_decay} "
                             f"or trust_coefficient={trust_coefficient}")
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                        trust_coefficient=trust_coefficient, eps=eps, lars_adapt=True)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D401 - torch signature
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            wd, momentum = group["weight_decay"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                d = p.grad.add(p, alpha=wd) if wd else p.grad.clone()
                if group["lars_adapt"]:
                    w_norm, d_norm = p.norm(), d.norm()
                    trust = group["trust_coefficient"] * w_norm / (d_norm + group["eps"])
                    d.mul_(torch.where((w_norm > 0) & (d_norm > 0), trust, torch.ones_like(trust)))
                if momentum:
                    state = self.state[p]
                    if "momentum_buffer" not in state:
                        state["momentum_buffer"] = d.clone()
                    else:
                        state["momentum_buffer"].mul_(momentum).add_(d)
                    d = state["momentum_buffer"]
                p.add_(d, alpha=-group["lr"])
        return loss


def param_groups(cfg: OptimConfig, backbone: nn.Module, head: nn.Module) -> list[dict[str, Any]]:
    """Backbone (decay / no-decay) and classifier groups, with per-group lr and weight decay."""
    decay, no_decay = [], []
    for p in backbone.parameters():
        if p.requires_grad:
            (decay if p.ndim > 1 else no_decay).append(p)
    head_params = [p for p in head.parameters() if p.requires_grad]
    exclude = cfg.no_decay_bias_bn or cfg.name == "lars"
    head_wd = cfg.weight_decay if cfg.head_weight_decay is None else cfg.head_weight_decay
    groups = [
        dict(name="backbone", params=decay, lr=cfg.lr, weight_decay=cfg.weight_decay),
        dict(name="backbone_no_decay", params=no_decay, lr=cfg.lr,
             weight_decay=0.0 if exclude else cfg.weight_decay, lars_adapt=False),
        dict(name="head", params=head_params, lr=cfg.lr * cfg.head_lr_mult, weight_decay=head_wd),
    ]
    groups = [g for g in groups if g["params"]]
    if cfg.name != "lars":
        for g in groups:
            g.pop("lars_adapt", None)
    return groups


def build_optimizer(cfg: OptimConfig, backbone: nn.Module, head: nn.Module) -> torch.optim.Optimizer:
    """The optimizer named by ``cfg.name`` over :func:`param_groups`."""
    groups = param_groups(cfg, backbone, head)
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
    if cfg.name == "lars":
        return LARS(groups, lr=cfg.lr, momentum=cfg.momentum, trust_coefficient=cfg.trust_coefficient)
    raise ValueError(f"config optim.name={cfg.name!r}: expected sgd, adamw or lars")
