"""Image transforms without torchvision: resize, optional random horizontal flip, normalise.

A transform is a small picklable callable ``PIL image -> float tensor CHW`` with values
``(x/255 - 0.5)/0.5`` in [-1, 1] (the insightface convention). Randomness (the flip) is drawn
from the ``generator`` argument when one is given, so a loader that seeds one generator per
sample from ``(seed, epoch, index)`` gets the same augmentation on every run, worker count and
resume point (see :mod:`broadface.data.loader`); without one it falls back to torch's global RNG.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence, Union

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from broadface.data.images import read_rgb

Size = Union[int, tuple[int, int], None]


def chw_float_array(img: Image.Image) -> np.ndarray:
    """PIL image -> C-contiguous float32 CHW array with the raw 0..255 values."""
    arr = np.asarray(img, dtype=np.uint8)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return np.ascontiguousarray(arr.transpose(2, 0, 1), dtype=np.float32)


# Per-image arithmetic is done in NumPy, not torch: torch's intra-op thread pool makes these
# tiny ops ~8x slower on a busy machine when loading in the main process (num_workers=0).
def to_tensor(img: Image.Image) -> torch.Tensor:
    """PIL image -> float32 CHW tensor with the raw 0..255 values."""
    return torch.from_numpy(chw_float_array(img))


def normalize(x: torch.Tensor) -> torch.Tensor:
    """0..255 values -> (x/255 - 0.5)/0.5, i.e. [-1, 1]."""
    return x.div(127.5).sub_(1.0)


def to_normalized_tensor(img: Image.Image) -> torch.Tensor:
    """PIL image -> float32 CHW tensor in [-1, 1]: ``normalize(to_tensor(img))``."""
    x = chw_float_array(img)
    np.divide(x, 127.5, out=x)
    np.subtract(x, 1.0, out=x)
    return torch.from_numpy(x)


def denormalize(x: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`normalize` mapped to [0, 1] (for plotting)."""
    return x.add(1.0).mul_(0.5).clamp_(0.0, 1.0)


def flip(x: torch.Tensor) -> torch.Tensor:
    """Horizontal flip of an image tensor (CHW or NCHW): the test-time augmentation view."""
    return x.flip(-1)


def _hw(size: Size) -> tuple[int, int] | None:
    if size is None:
        return None
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    if h < 1 or w < 1:
        raise ValueError(f"transform size must be positive, got {size!r}")
    return int(h), int(w)


@dataclass(frozen=True)
class FaceTransform:
    """Optionally put a synthetic mask on the face (probability ``mask_prob``, BigFace used 0.35;
    drawn at the image's own resolution by :class:`broadface.data.masks.MaskAugment`), resize to
    ``size`` (int or (h, w); None keeps the input size), flip with probability ``flip_p``, convert
    to ``channels`` (3 = RGB, 1 = grayscale) and normalise to [-1, 1].

    Every random choice comes from ``generator`` in the order of :meth:`draw` (mask seed, then
    flip), so a per-sample generator makes masks and flips reproducible."""

    size: Size = 112
    flip_p: float = 0.0
    channels: int = 3
    mask_prob: float = 0.0

    accepts_generator = True  # class attribute: __call__ takes ``generator=``

    def __post_init__(self) -> None:
        _hw(self.size)
        if not 0.0 <= self.flip_p <= 1.0:
            raise ValueError(f"flip_p must be in [0, 1], got {self.flip_p}")
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {self.channels}")
        if not 0.0 <= self.mask_prob <= 1.0:
            raise ValueError(f"mask_prob must be in [0, 1], got {self.mask_prob}")

    def draw(self, generator: torch.Generator | None = None) -> tuple[int | None, bool]:
        """The random choices of one call: (seed of the mask draw or None, flip?). Draws only what
        can happen, so transforms without masks / flips never consume randomness."""
        mask_seed = None
        if self.mask_prob > 0:
            mask_seed = int(torch.randint(0, 2**62, (), generator=generator).item())
        flipped = self.flip_p > 0 and torch.rand((), generator=generator).item() < self.flip_p
        return mask_seed, bool(flipped)

    def __call__(self, img: Image.Image | np.ndarray, generator: torch.Generator | None = None) -> torch.Tensor:
        if isinstance(img, np.ndarray):
            img = Image.fromarray(img)
        mask_seed, flipped = self.draw(generator)
        if mask_seed is not None:  # masked with probability mask_prob, at the aligned face's own size
            from broadface.data.masks import MaskAugment

            img = MaskAugment(self.mask_prob)(img.convert("RGB"), rng=np.random.default_rng(mask_seed))
        mode = "RGB" if self.channels == 3 else "L"
        if img.mode != mode:
            img = img.convert(mode)
        hw = _hw(self.size)
        if hw is not None and (img.height, img.width) != hw:
            img = img.resize((hw[1], hw[0]), Image.BILINEAR)  # Pillow antialiases when shrinking
        if flipped:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        return to_normalized_tensor(img)


@dataclass(frozen=True)
class TrainTransform(FaceTransform):
    """Training view: resize, random horizontal flip (p=0.5), normalise."""

    flip_p: float = 0.5


@dataclass(frozen=True)
class EvalTransform(FaceTransform):
    """Evaluation view: resize and normalise, no randomness."""

    def __post_init__(self) -> None:
        if self.flip_p != 0.0:
            raise ValueError("EvalTransform never flips; use TrainTransform or flip() for test-time augmentation")
        super().__post_init__()


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


def load_images(paths: Sequence[str | os.PathLike], input_size: int | Sequence[int] = 112) -> Tensor:
    """Read image files into an N x 3 x H x W batch normalised to [-1, 1] (resized to ``input_size``)."""
    if len(paths) == 0:
        raise ValueError("load_images: no paths given")
    return torch.stack([to_input(read_rgb(p), input_size) for p in paths])
