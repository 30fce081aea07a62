"""Running an embedding model: a batch or a whole dataset to (L2-normalised) embeddings.

Shared by validation during training, every evaluation, the demo and the CLIs.

Convention (insightface): images are RGB, normalised as ``(x / 255 - 0.5) / 0.5``;
with ``flip=True`` the embedding is ``f(x) + f(flip_h(x))`` (summed, not
averaged: the same direction after L2), then L2-normalised. The flip sum is
accumulated in float64 so distances match insightface's float64 pipeline.
Extraction runs under ``model.eval()`` + ``torch.inference_mode()`` and puts
every sub-module back into the train/eval mode it had before.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import numpy as np
import torch
from torch import Tensor, nn

__all__ = ["embed_tensors", "embed_dataset", "eval_mode"]


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model.eval()`` inside the block; each sub-module's own mode restored after."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in modes:
            m.training = training


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


def _forward(model: nn.Module, images: Tensor, flip: bool) -> Tensor:
    """Raw (un-normalised) float64 embeddings, flip-summed if asked."""
    out = model(images)
    if not isinstance(out, Tensor) or out.ndim != 2 or out.shape[0] != images.shape[0]:
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(f"model must return a (batch, dim) embedding tensor, got {shape}")
    out = out.double()
    if flip:
        out = out + model(torch.flip(images, dims=[3])).double()
    return out


def embed_tensors(model: nn.Module, images: Tensor, flip: bool = True, normalize: bool = True,
                  dtype: torch.dtype = torch.float32) -> Tensor:
    """Embed a batch of normalised images (B x 3 x H x W) -> B x D on the images' device."""
    if images.ndim != 4:
        raise ValueError(f"images must be B x C x H x W, got shape {tuple(images.shape)}")
    device = _model_device(model)
    with eval_mode(model), torch.inference_mode():
        emb = _forward(model, images.to(device, torch.float32), flip)
        if normalize:
            emb = torch.nn.functional.normalize(emb, dim=1)
    return emb.to(images.device, dtype)


def embed_dataset(model: nn.Module, dataset: torch.utils.data.Dataset, batch_size: int = 128, flip: bool = True,
                  device: str | torch.device | None = None, num_workers: int = 0, normalize: bool = True,
                  dtype: np.dtype | type = np.float32, return_labels: bool = False,
                  ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Embed every item of ``dataset`` (which yields ``(image_tensor, label)``), in order.

    ``device=None`` runs on the model's device; another device needs the model
    already there (it is not moved, so the caller's model is left as it was).
    Returns an N x D array (float32 unless ``dtype``), plus the N labels if
    ``return_labels``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    model_device = _model_device(model)
    device = model_device if device is None else torch.device(device)
    if device.type != model_device.type or (device.index is not None and device != model_device):
        raise ValueError(f"model is on {model_device} but device={device}; move the model first")
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                                         pin_memory=device.type == "cuda")
    chunks: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    with eval_mode(model), torch.inference_mode():
        for batch in loader:
            if not isinstance(batch, (list, tuple)) or len(batch) < 2:
                raise ValueError("dataset items must be (image_tensor, label) pairs")
            images, target = batch[0], batch[1]
            emb = _forward(model, images.to(device, torch.float32, non_blocking=True), flip)
            if normalize:
                emb = torch.nn.functional.normalize(emb, dim=1)
            chunks.append(emb.cpu().numpy().astype(dtype, copy=False))
            if return_labels:
                labels.append(np.asarray(target))
    if not chunks:
        raise ValueError("dataset is empty: nothing to embed")
    out = np.concatenate(chunks)
    return (out, np.concatenate(labels)) if return_labels else out
