"""Embedding extraction shared by validation, evaluation, the demo and the CLIs.

Convention (insightface): images are RGB, normalised as ``(x / 255 - 0.5) / 0.5``;
with ``flip=True`` the embedding is ``f(x) + f(flip_h(x))`` (summed, not
averaged: the same direction after L2), then L2-normalised. The flip sum is
accumulated in float64 so distances match insightface's float64 pipeline.
Extraction runs under ``model.eval()`` + ``torch.inference_mode()`` and puts
every sub-module back into the train/eval mode it had before.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator, Sequence

import numpy as np
import torch
from torch import Tensor, nn

__all__ = ["embed_tensors", "embed_dataset", "load_images", "read_rgb", "to_input", "eval_mode"]


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


def _size_hw(input_size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(input_size, int):
        return input_size, input_size
    h, w = (int(v) for v in input_size)
    return h, w


def to_input(image: np.ndarray, input_size: int | Sequence[int] | None = None) -> Tensor:
    """H x W x 3 uint8 RGB array -> 3 x H x W float tensor in [-1, 1] (resized if needed).

    Computed as insightface does, ``(x / 255 - 0.5) / 0.5`` (same values as
    ``broadface.data.transforms.normalize`` up to float rounding).
    """
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an H x W x 3 RGB image, got shape {image.shape}")
    if input_size is not None:
        h, w = _size_hw(input_size)
        if image.shape[:2] != (h, w):
            import cv2

            image = cv2.resize(image, (w, h), interpolation=cv2.INTER_LINEAR)
    x = (np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / np.float32(255) - np.float32(0.5)) / np.float32(0.5)
    return torch.from_numpy(np.ascontiguousarray(x))


def read_rgb(source: str | os.PathLike | bytes, name: str | None = None) -> np.ndarray:
    """Decode an image file (or encoded bytes) to H x W x 3 uint8 RGB.

    Missing file -> FileNotFoundError; undecodable -> ValueError naming ``name``/the path.
    """
    from broadface.data.images import decode_image

    if not isinstance(source, (bytes, bytearray, memoryview)) and not os.path.isfile(source):
        raise FileNotFoundError(f"image {os.fspath(source)} does not exist")
    return np.asarray(decode_image(source, name))


def load_images(paths: Sequence[str | os.PathLike], input_size: int | Sequence[int] = 112) -> Tensor:
    """Read image files into an N x 3 x H x W batch normalised to [-1, 1] (resized to ``input_size``)."""
    if len(paths) == 0:
        raise ValueError("load_images: no paths given")
    return torch.stack([to_input(read_rgb(p), input_size) for p in paths])
