"""Checkpoints: written atomically, loaded without unpickling code.

A checkpoint is a plain dict of tensors and Python scalars/strings/lists/dicts:

    {"format": "broadface", "version": 1,
     "model": {"name": "iresnet50", "embedding_size": 512, ...},   # kwargs of models.build_model
     "backbone": state_dict, "head": state_dict,                     # head holds W and the queue
     ... trainer state (optimizer, scheduler, scaler, rng, data position, step, config)}

Writes go to a temporary file in the same directory, are fsync'ed and then
``os.replace``d over the target, so a crash leaves either the old or the new
file, never half of one. Loads use ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

FORMAT = "broadface"
VERSION = 1


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Load a broadface checkpoint safely; raise ValueError naming the file if it is not one."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # corrupt, truncated, or holds non-allowlisted objects
        raise ValueError(f"{path}: not a loadable checkpoint ({type(err).__name__}: {err})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise ValueError(f"{path}: not a broadface checkpoint (missing format='{FORMAT}')")
    if int(ckpt.get("version", 0)) > VERSION:
        raise ValueError(f"{path}: checkpoint version {ckpt['version']} is newer than this broadface ({VERSION})")
    return ckpt


def load_backbone(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> torch.nn.Module:
    """Rebuild the backbone stored in a checkpoint, in eval mode, ready for embedding."""
    from broadface.models import build_model

    ckpt = load_checkpoint(path, map_location)
    if "model" not in ckpt or "backbone" not in ckpt:
        raise ValueError(f"{path}: checkpoint holds no backbone (keys: {sorted(ckpt)})")
    model = build_model(**ckpt["model"])
    model.load_state_dict(ckpt["backbone"])
    return model.eval()


def model_config(model: torch.nn.Module) -> dict | None:
    """The model's ``build_model`` kwargs (``model.config``), or None for a model built elsewhere."""
    config = getattr(model, "config", None)
    return dict(config) if isinstance(config, dict) else None


def check_model_config(ckpt: dict, model: torch.nn.Module, path: str | os.PathLike) -> None:
    """ValueError naming ``path`` when the checkpoint was written for another architecture."""
    ours = model_config(model)
    if ckpt.get("model") is not None and ours is not None and dict(ckpt["model"]) != ours:
        raise ValueError(f"{path}: checkpoint model {ckpt['model']} differs from this run's model {ours}")


def warm_start(path: str | os.PathLike, model: torch.nn.Module, classifier: torch.nn.Module | None = None,
               map_location: str | torch.device = "cpu") -> None:
    """Load the backbone (and the classifier ``W`` into ``classifier.weight``) from a checkpoint.

    The classifier must have the same (classes, dim) shape; a mismatch is a ValueError
    naming both shapes. Optimizer state and the BroadFace queue are not taken over.
    """
    ckpt = load_checkpoint(path, map_location)
    if "backbone" not in ckpt:
        raise ValueError(f"{path}: checkpoint holds no backbone (keys: {sorted(ckpt)})")
    check_model_config(ckpt, model, path)
    try:
        model.load_state_dict(ckpt["backbone"])
    except RuntimeError as err:
        raise ValueError(f"{path}: backbone does not fit this model ({str(err).strip().splitlines()[0]})") from None
    if classifier is None:
        return
    weight = (ckpt.get("head") or {}).get("margin.weight")
    if weight is None:
        raise ValueError(f"{path}: checkpoint holds no classifier (head 'margin.weight'); "
                         "set train.init_head=false to warm-start the backbone only")
    own = classifier.weight
    if tuple(weight.shape) != tuple(own.shape):
        raise ValueError(f"{path}: classifier has shape {tuple(weight.shape)} (classes x dim) but this run needs "
                         f"{tuple(own.shape)}; train on the same identities in the same order, or set "
                         "train.init_head=false to warm-start the backbone only")
    with torch.no_grad():
        own.copy_(weight)


def publish(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Make ``dst`` the same file as ``src`` atomically: a hard link (a copy where links fail)."""
    src, dst = Path(src), Path(dst)
    tmp = dst.with_name(f".{dst.name}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        import shutil

        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)
    return dst
