"""Load insightface arcface_torch iResNet weights (``backbone.pth``) into broadface.

arcface_torch saves ``backbone.state_dict()`` with plain ``torch.save``, so the
file is a dict of tensors and loads with ``weights_only=True`` (nothing is
unpickled). Depth, width and embedding size are read from the tensor shapes.
"""
from __future__ import annotations

import math
import os
import re
from pathlib import Path

import torch

from broadface.models.common import feature_map_size
from broadface.models.iresnet import IRESNET_LAYERS

_BLOCK_KEY = re.compile(r"^layer([1-4])\.(\d+)\.")


def _strip_prefix(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop a DistributedDataParallel ``module.`` prefix if every key has it."""
    if state_dict and all(k.startswith("module.") for k in state_dict):
        return {k[len("module."):]: v for k, v in state_dict.items()}
    return state_dict


def iresnet_config_from_state_dict(state_dict: dict[str, torch.Tensor], input_size: int = 112) -> dict:
    """``build_model`` kwargs (name, layers, widths, sizes) that fit an insightface iResNet state dict."""
    if not isinstance(state_dict, dict) or "fc.weight" not in state_dict or "conv1.weight" not in state_dict:
        keys = sorted(state_dict)[:5] if isinstance(state_dict, dict) else type(state_dict).__name__
        raise ValueError(f"not an insightface iResNet state dict (no conv1.weight / fc.weight; keys: {keys})")
    counts = [0, 0, 0, 0]
    for key in state_dict:
        m = _BLOCK_KEY.match(key)
        if m:
            stage, block = int(m.group(1)) - 1, int(m.group(2))
            counts[stage] = max(counts[stage], block + 1)
    if min(counts) == 0:
        raise ValueError(f"insightface state dict lacks blocks in some stage (blocks per stage: {counts})")
    base_width = int(state_dict["conv1.weight"].shape[0])
    embedding_size, fc_in = (int(n) for n in state_dict["fc.weight"].shape)
    side = math.isqrt(fc_in // (8 * base_width))
    if side * side * 8 * base_width != fc_in or feature_map_size(input_size, 4) != side:
        raise ValueError(f"fc.weight expects {fc_in} inputs = {8 * base_width} x {side} x {side}, which does "
                         f"not fit input_size={input_size} (feature map {feature_map_size(input_size, 4)})")
    names = {tuple(v): k for k, v in IRESNET_LAYERS.items()}
    config: dict = {"name": names.get(tuple(counts), "iresnet"), "embedding_size": embedding_size,
                    "input_size": int(input_size)}
    if config["name"] == "iresnet":
        config["layers"] = counts
    if base_width != 64:
        config["base_width"] = base_width
    return config


def load_insightface(path: str | os.PathLike, input_size: int = 112) -> torch.nn.Module:
    """Build the matching broadface iResNet and load insightface weights from ``path`` (eval mode)."""
    from broadface.models import build_model

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"insightface checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"{path}: not a loadable weights file ({type(err).__name__}: {err})") from None
    state = _strip_prefix(state.get("state_dict", state) if isinstance(state, dict) else state)
    try:
        config = iresnet_config_from_state_dict(state, input_size)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
    model = build_model(**config)
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # tensor shape mismatch
        raise ValueError(f"{path}: weights do not fit {config['name']}: {str(err).splitlines()[-1].strip()}") from None
    missing = [k for k in result.missing_keys if not k.endswith("num_batches_tracked")]
    if missing or result.unexpected_keys:
        raise ValueError(f"{path}: does not match {config['name']} (missing {missing[:5]}, "
                         f"unexpected {result.unexpected_keys[:5]})")
    return model.eval()
