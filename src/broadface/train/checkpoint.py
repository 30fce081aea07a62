"""Training checkpoints: warm starts and publishing ``final.pt``.

The file format and safe loading are :mod:`broadface.models.checkpoint`'s; writes go through :func:`broadface.fileio.atomic_torch_save`.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from broadface.models.checkpoint import check_model_config, load_checkpoint


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
