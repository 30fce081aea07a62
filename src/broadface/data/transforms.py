"""Training and evaluation transforms: optional mask, resize, optional random horizontal flip, normalise.

A transform is a small picklable callable ``PIL image -> float tensor CHW`` with values
``(x/255 - 0.5)/0.5`` in [-1, 1] (the insightface convention). Resizing and normalising are the
one image pipeline's (:mod:`broadface.data.pipeline`), so evaluation, the CLI and the teacher
prepare an image exactly as training does. Randomness (mask, flip) is drawn from the
``generator`` argument when one is given, so a loader that seeds one generator per sample from
``(seed, epoch, index)`` gets the same augmentation on every run, worker count and resume point
(see :mod:`broadface.data.loader`); without one it falls back to torch's global RNG.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import cv2
import numpy as np
import torch
from PIL import Image

from broadface.data.pipeline import normalize, pixels_chw, resize, size_hw

Size = Union[int, tuple[int, int], None]


def flip(x: torch.Tensor) -> torch.Tensor:
    """Horizontal flip of an image tensor (CHW or NCHW): the test-time augmentation view."""
    return x.flip(-1)


def _hw(size: Size) -> tuple[int, int] | None:
    return None if size is None else size_hw(size)


@dataclass(frozen=True)
class FaceTransform:
    """Optionally put a synthetic mask on the face (probability ``mask_prob``, BigFace used 0.35;
    drawn at the image's own resolution by :class:`broadface.data.masks.MaskAugment`), resize to
    ``size`` (int or (h, w); None keeps the input size), flip with probability ``flip_p``, convert
    to ``channels`` (3 = RGB, 1 = grayscale) and normalise to [-1, 1].

    Every random choice comes from ``generator`` in the order of :meth:`draw` (mask seed, then
    flip), so a per-sample generator makes masks and flips reproducible.

    ``pixels=True`` stops before the normalisation: a uint8 C x H x W tensor, which the consumer
    normalises a batch at a time (:func:`~broadface.data.pipeline.normalize_batch`, the same floats
    bit for bit). The trainer's loader does this: a quarter of the bytes to collate and move, and
    one vectorised op per batch instead of one per image."""

    size: Size = 112
    flip_p: float = 0.0
    channels: int = 3
    mask_prob: float = 0.0
    pixels: bool = False

    accepts_generator = True  # class attributes: __call__ takes ``generator=``,
    accepts_array = True  # and a decoded uint8 array (H x W x 3 or H x W) as well as a PIL image

    def __post_init__(self) -> None:
        object.__setattr__(self, "_out_hw", _hw(self.size))  # validated once; not a field (eq/hash/repr)
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
        mask_seed, flipped = self.draw(generator)
        if isinstance(img, np.ndarray) and mask_seed is None and self._ready(img):
            # Already the mode and size asked for (an aligned face from the loader): flip and convert the
            # array itself, the same pixels as the PIL path below without its two image copies.
            img = cv2.flip(img, 1) if flipped else img  # a copy, but half the cost of transposing a flipped view
            return pixels_chw(img) if self.pixels else normalize(img)
        if isinstance(img, np.ndarray):
            img = Image.fromarray(img)
        if mask_seed is not None:  # masked with probability mask_prob, at the aligned face's own size
            from broadface.data.masks import MaskAugment

            img = MaskAugment(self.mask_prob)(img.convert("RGB"), rng=np.random.default_rng(mask_seed))
        mode = "RGB" if self.channels == 3 else "L"
        if img.mode != mode:
            img = img.convert(mode)
        if self.size is not None:
            img = resize(img, self.size)
        if flipped:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        return pixels_chw(img) if self.pixels else normalize(img)

    def _ready(self, arr: np.ndarray) -> bool:
        """``arr`` is uint8 in the output's channels and size: nothing to convert or resize."""
        channels_ok = (arr.ndim == 3 and arr.shape[2] == 3) if self.channels == 3 else arr.ndim == 2
        hw = self._out_hw
        return arr.dtype == np.uint8 and channels_ok and (hw is None or arr.shape[:2] == hw)


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
