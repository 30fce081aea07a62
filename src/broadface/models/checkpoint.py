"""The broadface checkpoint format, as far as a backbone is concerned: read one safely, rebuild its model.

A checkpoint is a plain dict of tensors and Python scalars/strings/lists/dicts:

    {"format": "broadface", "version": 1,
     "model": {"name": "iresnet50", "embedding_size": 512, ...},   # kwargs of models.build_model
     "backbone": state_dict, "head": state_dict,                     # head holds W and the queue
     ... trainer state (optimizer, scheduler, scaler, rng, data position, step, config)}

Reads use ``torch.load(weights_only=True)`` (:func:`broadface.fileio.load_torch`); writes are
atomic (:func:`broadface.fileio.atomic_torch_save`). The training state is the trainer's
(:mod:`broadface.train.checkpoint`).
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from broadface.fileio import load_torch

FORMAT = "broadface"
VERSION = 1


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Load a broadface checkpoint safely; raise ValueError naming the file if it is not one."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"checkpoint {path} is a directory, expected a .pt file")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        ckpt = load_torch(path, map_location)  # weights_only=True: data, never code
    except ValueError as err:
        raise ValueError(str(err).replace("not a loadable torch file", "not a loadable checkpoint", 1)) from None
    return check_checkpoint(ckpt, path)


def check_checkpoint(ckpt: object, path: str | os.PathLike) -> dict:
    """``ckpt`` (loaded from ``path``) if it is a broadface checkpoint this version can read, else ValueError."""
    if not is_checkpoint(ckpt):
        raise ValueError(f"{path}: not a broadface checkpoint (missing format='{FORMAT}')")
    if int(ckpt.get("version", 0)) > VERSION:  # type: ignore[union-attr]
        raise ValueError(f"{path}: checkpoint version {ckpt['version']} is newer than this broadface ({VERSION})")
    return ckpt  # type: ignore[return-value]


def load_backbone(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> torch.nn.Module:
    """Rebuild the backbone stored in a checkpoint, in eval mode, ready for embedding."""
    return backbone_from_checkpoint(load_checkpoint(path, map_location), path)


def is_checkpoint(obj: object) -> bool:
    """True for a loaded broadface checkpoint dict (``format='broadface'``)."""
    return isinstance(obj, dict) and obj.get("format") == FORMAT


def backbone_from_checkpoint(ckpt: dict, path: str | os.PathLike) -> torch.nn.Module:
    """The backbone of an already loaded checkpoint ``ckpt`` (read from ``path``), in eval mode."""
    from broadface.models import build_model

    if "model" not in ckpt or "backbone" not in ckpt:
        raise ValueError(f"{path}: checkpoint holds no backbone (keys: {sorted(ckpt)})")
    try:
        model = build_model(**ckpt["model"])
        model.load_state_dict(ckpt["backbone"])
    except (TypeError, RuntimeError) as err:
        raise ValueError(f"{path}: the backbone does not fit its model config {ckpt['model']} "
                         f"({state_dict_error(err)})") from None
    return model.eval()


def state_dict_error(err: BaseException, limit: int = 2) -> str:
    """The informative part of a ``load_state_dict`` error (torch's first line only names the class),
    e.g. ``conv1.weight: [8, 3, 3, 3] in the checkpoint, [16, 3, 3, 3] in the model``."""
    lines = [x.strip() for x in str(err).strip().splitlines() if x.strip()]
    detail = [x for x in lines if not x.startswith("Error(s) in loading state_dict")] or lines
    detail = [re.sub(r"size mismatch for (\S+): copying a param with shape torch\.Size\((.*?)\) from checkpoint, "
                     r"the shape in current model is torch\.Size\((.*?)\)\.?", r"\1: \2 in the checkpoint, \3 in "
                     "the model", x) for x in detail]
    more = f"; and {len(detail) - limit} more" if len(detail) > limit else ""
    return "; ".join(detail[:limit]) + more


def model_config(model: torch.nn.Module) -> dict | None:
    """The model's ``build_model`` kwargs (``model.config``), or None for a model built elsewhere."""
    config = getattr(model, "config", None)
    return dict(config) if isinstance(config, dict) else None


def check_model_config(ckpt: dict, model: torch.nn.Module, path: str | os.PathLike) -> None:
    """ValueError naming ``path`` when the checkpoint was written for another architecture."""
    ours = model_config(model)
    if ckpt.get("model") is not None and ours is not None and dict(ckpt["model"]) != ours:
        raise ValueError(f"{path}: checkpoint model {ckpt['model']} differs from this run's model {ours}")
