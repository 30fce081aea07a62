"""Model size and cost (parameters, multiply-accumulates) and BatchNorm re-estimation."""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (all, or only those with ``requires_grad``)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


@torch.no_grad()
def count_macs(model: nn.Module, input_size: int | None = None) -> int:
    """Multiply-accumulates for one 3 x S x S image (S defaults to ``model.config['input_size']``).

    Counted with ``torch.utils.flop_counter`` (convs, matmuls; FLOPs / 2). This is the
    figure papers usually quote as "GFLOPs" for face backbones (iresnet50 ~ 6.3G).
    """
    from torch.utils.flop_counter import FlopCounterMode

    from broadface.models.loader import input_size_of

    size = input_size or input_size_of(model)
    param = next(model.parameters())
    x = torch.zeros(1, 3, size, size, dtype=param.dtype, device=param.device)
    was_training = model.training
    model.eval()
    try:
        with FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        model.train(was_training)
    return counter.get_total_flops() // 2


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, batches: Iterable[torch.Tensor]) -> nn.Module:
    """Reset BatchNorm running statistics and re-estimate them as a plain average over ``batches``.

    Useful after changing the input distribution, and to give randomly initialised
    nets realistic eval-mode statistics (without it, an untrained iResNet's eval
    outputs grow to ~1e25 and its embeddings are meaningless). Returns ``model`` in eval mode.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average
    model.train()
    try:
        for x in batches:
            model(x)
    finally:
        for m, momentum in zip(bns, momenta):
            m.momentum = momentum
    return model.eval()
