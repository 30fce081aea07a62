"""Model size and cost: parameter count and multiply-accumulates per image."""
from __future__ import annotations

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

    size = input_size or getattr(model, "config", {}).get("input_size", 112)
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
