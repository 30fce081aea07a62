"""Backbone registry: ``build_model(name, ...)`` -> embedding network.

Every model maps B x 3 x H x W images normalised to [-1, 1] to B x D raw
(un-normalised) embeddings and carries ``model.config``, a plain dict such that
``build_model(**model.config)`` rebuilds the same architecture (checkpoints store it).
"""
from __future__ import annotations

import inspect
from typing import Any, Callable

from torch import nn

from broadface.models.iresnet import IRESNET_LAYERS, IResNet
from broadface.models.mobilefacenet import MobileFaceNet
from broadface.models.resnet import RESNET_LAYERS, ResNet, TinyCNN
from broadface.models.stats import count_macs, count_parameters, recalibrate_batchnorm

__all__ = ["build_model", "available_models", "count_parameters", "count_macs", "recalibrate_batchnorm",
           "IResNet", "MobileFaceNet", "ResNet", "TinyCNN"]


# name -> (constructor, architecture kwargs fixed by the name)
_REGISTRY: dict[str, tuple[Callable[..., nn.Module], dict[str, Any]]] = {
    "iresnet": (IResNet, {}),  # generic: pass layers=[...] (3 or 4 numbers)
    **{name: (IResNet, {"layers": layers}) for name, layers in IRESNET_LAYERS.items()},
    "mobilefacenet": (MobileFaceNet, {}),
    **{name: (ResNet, {"layers": layers, "block": block}) for name, (block, layers) in RESNET_LAYERS.items()},
    "tinycnn": (TinyCNN, {}),
}


def available_models() -> list[str]:
    """Names accepted by :func:`build_model`."""
    return sorted(_REGISTRY)


def _plain(value: Any) -> Any:
    """Tuples -> lists so the config is YAML/JSON/weights_only friendly."""
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    return value


def build_model(name: str, *, embedding_size: int = 512, input_size: int = 112, **kwargs: Any) -> nn.Module:
    """Build backbone ``name``; extra kwargs go to its constructor (e.g. ``dropout``,
    ``gradient_checkpointing``, ``layers`` for the generic ``"iresnet"``)."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(available_models())}")
    cls, fixed = _REGISTRY[name]
    accepted = set(inspect.signature(cls).parameters) - set(fixed)
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        raise ValueError(f"model {name!r} got unknown option(s) {unknown}; accepted: {sorted(accepted)}")
    if name == "iresnet" and "layers" not in kwargs:
        raise ValueError("model 'iresnet' needs layers=[...] (3 or 4 stage depths), "
                         f"or use a named depth: {', '.join(n for n in available_models() if n.startswith('iresnet'))}")
    if int(embedding_size) < 1 or int(input_size) < 1:
        raise ValueError(f"embedding_size and input_size must be positive, got {embedding_size}, {input_size}")
    model = cls(embedding_size=int(embedding_size), input_size=int(input_size), **fixed, **kwargs)
    model.config = {"name": name, "embedding_size": int(embedding_size), "input_size": int(input_size),
                    **{k: _plain(v) for k, v in kwargs.items()}}
    return model
