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
    if not isinstance(state_dict, dict):
        raise ValueError(f"not an insightface iResNet state dict: the file holds a {type(state_dict).__name__}, "
                         "not a dict of tensors (conv1.weight, fc.weight, ...)")
    if "fc.weight" not in state_dict or "conv1.weight" not in state_dict:
        raise ValueError(f"not an insightface iResNet state dict (no conv1.weight / fc.weight; keys: "
                         f"{sorted(state_dict)[:5]})")
    counts = [0, 0, 0, 0]
    for key in state_dict:
        m = _BLOCK_KEY.match(key)
        if m:
            stage, block = int(m.group(1)) - 1, int(m.group(2))
            counts[stage] = max(counts[stage], block + 1)
    if min(counts) == 0:
        raise ValueError(f"insightface state dict lacks blocks in some stage (blocks per stage: {counts})")
    base_width = int(state_dict["conv1.weight"].shape[0])
    stem = state_dict.get("bn1.weight", state_dict.get("layer1.0.bn1.weight"))
    if state_dict["conv1.weight"].ndim != 4 or (stem is not None and int(stem.shape[0]) != base_width):
        raise ValueError(f"conv1.weight has shape {list(state_dict['conv1.weight'].shape)}, which does not fit the "
                         f"network after it (bn1 / layer1 take {None if stem is None else int(stem.shape[0])} "
                         "channels): expected [channels, 3, 3, 3]")
    embedding_size, fc_in = (int(n) for n in state_dict["fc.weight"].shape)
    side = math.isqrt(fc_in // (8 * base_width))
    if side * side * 8 * base_width != fc_in or feature_map_size(input_size, 4) != side:
        hint = f"; pass the size the weights were trained at (--input-size S, {16 * side - 15} <= S <= {16 * side})" \
            if side * side * 8 * base_width == fc_in else ""
        raise ValueError(f"fc.weight expects {fc_in} inputs = {8 * base_width} x {side} x {side}, which does "
                         f"not fit input_size={input_size} (feature map {feature_map_size(input_size, 4)}){hint}")
    names = {tuple(v): k for k, v in IRESNET_LAYERS.items()}
    config: dict = {"name": names.get(tuple(counts), "iresnet"), "embedding_size": embedding_size,
                    "input_size": int(input_size)}
    if config["name"] == "iresnet":
        config["layers"] = counts
    if base_width != 64:
        config["base_width"] = base_width
    return config


def is_insightface_state_dict(obj: object) -> bool:
    """True for an (optionally ``module.``-prefixed or ``{"state_dict": ...}``-wrapped) iResNet state dict."""
    state = _unwrap(obj)
    return isinstance(state, dict) and "conv1.weight" in state and "fc.weight" in state


def _unwrap(obj: object) -> object:
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    return _strip_prefix(obj) if isinstance(obj, dict) else obj


def load_insightface(path: str | os.PathLike, input_size: int = 112) -> torch.nn.Module:
    """Build the matching broadface iResNet and load insightface weights from ``path`` (eval mode)."""
    from broadface.fileio import load_torch

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"insightface checkpoint {path} does not exist")
    try:
        state = load_torch(path)  # weights_only=True: a state dict is tensors only
    except ValueError as err:
        raise ValueError(str(err).replace("not a loadable torch file", "not a loadable weights file", 1)) from None
    return model_from_state_dict(state, path, input_size)


def model_from_state_dict(state: object, path: str | os.PathLike, input_size: int = 112) -> torch.nn.Module:
    """The broadface iResNet holding the insightface weights ``state`` (read from ``path``), in eval mode."""
    from broadface.models import build_model

    state = _unwrap(state)
    try:
        config = iresnet_config_from_state_dict(state, input_size)  # type: ignore[arg-type]
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
    model = build_model(**config)
    try:
        result = model.load_state_dict(state, strict=False)  # type: ignore[arg-type]
    except RuntimeError as err:  # tensor shape mismatch
        raise ValueError(f"{path}: weights do not fit {config['name']}: {str(err).splitlines()[-1].strip()}") from None
    missing = [k for k in result.missing_keys if not k.endswith("num_batches_tracked")]
    if missing or result.unexpected_keys:
        raise ValueError(f"{path}: does not match {config['name']} (missing {missing[:5]}, "
                         f"unexpected {result.unexpected_keys[:5]})")
    return model.eval()
