"""Small pieces shared by the backbones."""
from __future__ import annotations

import torch
from torch import nn


def feature_map_size(input_size: int, num_stride2: int) -> int:
    """Spatial size after ``num_stride2`` stride-2 convs with 'same' padding (each rounds up)."""
    size = int(input_size)
    for _ in range(num_stride2):
        size = (size + 1) // 2
    return size


def require_input_size(model: nn.Module, input_size: int) -> None:
    """Make ``model`` reject inputs other than B x 3 x S x S with a clear ValueError.

    Done as a forward pre-hook (not inside forward) so forward stays traceable by
    torch.fx (used for BN folding) and by the ONNX exporter.
    """

    def hook(module: nn.Module, args: tuple) -> None:
        x = args[0]
        if isinstance(x, torch.Tensor) and not torch.jit.is_tracing():
            if x.dim() != 4 or x.shape[1] != 3 or tuple(x.shape[-2:]) != (input_size, input_size):
                raise ValueError(f"{type(module).__name__} expects B x 3 x {input_size} x {input_size} "
                                 f"input (model config input_size={input_size}), got {tuple(x.shape)}")

    model.register_forward_pre_hook(hook)
