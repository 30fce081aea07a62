"""The one image pipeline: decoded image -> resize -> normalise -> float CHW tensor.

Training transforms (:mod:`broadface.data.transforms`), every evaluation, the CLI, serving and
the distillation teacher prepare images here, so a model sees the same pixels at every stage:

* **resize** (:func:`resize`, the library's only image-resize call): Pillow's bilinear filter,
  which widens its support by the scale factor when shrinking (antialiased) and is plain
  bilinear when enlarging. Nothing happens when the image already has the size.
* **normalise** (:func:`normalize`): ``(x - mean) / std`` per channel, computed as
  ``x / std - mean / std`` in float32; with the default ``mean = std = 127.5`` that is
  ``x / 127.5 - 1``, the insightface convention ``(x / 255 - 0.5) / 0.5``. ``bgr=True`` reverses
  the channel order first, for models trained on OpenCV's BGR images.

:class:`Preprocessing` bundles size and normalisation; it is what a loaded model reports
(:mod:`broadface.models.loader`) and is itself a dataset transform (``PIL image or uint8 array
-> tensor``). Decoding (EXIF orientation, mode conversion) is :mod:`broadface.data.images`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Union

import cv2
import numpy as np
import torch
from PIL import Image

Size = Union[int, Sequence[int]]
DEFAULT_MEAN = (127.5, 127.5, 127.5)
DEFAULT_STD = (127.5, 127.5, 127.5)

__all__ = ["Preprocessing", "resize", "normalize", "normalize_batch", "BatchNormalizer", "pixels_chw", "size_hw",
           "resize_batch", "load_images", "DEFAULT_MEAN", "DEFAULT_STD"]


def size_hw(size: Size) -> tuple[int, int]:
    """``112`` or ``(h, w)`` -> ``(h, w)``; ValueError for anything else or a non-positive side."""
    hw = (size, size) if isinstance(size, (int, np.integer)) else tuple(size)
    if len(hw) != 2 or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in hw):
        raise ValueError(f"image size must be an int or (height, width), got {size!r}")
    if min(hw) < 1:
        raise ValueError(f"image size must be positive, got {size!r}")
    return int(hw[0]), int(hw[1])


def resize(image: Image.Image, size: Size) -> Image.Image:
    """``image`` at ``size`` (int or (h, w)) with Pillow's bilinear filter, antialiased when shrinking."""
    h, w = size_hw(size)
    if (image.height, image.width) == (h, w):
        return image
    return image.resize((w, h), Image.BILINEAR)


def _per_channel(values: Sequence[float] | float, what: str) -> tuple[float, float, float]:
    v = (float(values),) * 3 if isinstance(values, (int, float)) else tuple(float(x) for x in values)
    if len(v) == 1:
        v = v * 3
    if len(v) != 3 or not all(np.isfinite(v)):
        raise ValueError(f"{what} must be one number or three (R, G, B), got {values!r}")
    return v  # type: ignore[return-value]


def _hwc(image: Image.Image | np.ndarray) -> np.ndarray:
    """The image's uint8 pixels as H x W x C (a grayscale image gets C = 1)."""
    arr = np.asarray(image, dtype=np.uint8)
    return arr[:, :, None] if arr.ndim == 2 else arr


def normalize(image: Image.Image | np.ndarray, mean: Sequence[float] = DEFAULT_MEAN,
              std: Sequence[float] = DEFAULT_STD, bgr: bool = False) -> torch.Tensor:
    """H x W (x C) uint8 image -> float32 C x H x W tensor ``(x - mean) / std``; with ``bgr`` the channels
    are reversed first and ``mean`` / ``std`` apply in that (B, G, R) order.

    Per-image arithmetic is NumPy, not torch: torch's intra-op thread pool makes these tiny ops
    ~8x slower on a busy machine when loading in the main process (num_workers=0)."""
    x = np.ascontiguousarray(_hwc(image).transpose(2, 0, 1), dtype=np.float32)
    if bgr and x.shape[0] == 3:
        x = np.ascontiguousarray(x[::-1])
    c = x.shape[0]
    s = np.asarray(std[:c], dtype=np.float32).reshape(c, 1, 1)
    m = (np.asarray(mean[:c], dtype=np.float32).reshape(c, 1, 1) / s).astype(np.float32)
    np.divide(x, s, out=x)
    np.subtract(x, m, out=x)
    return torch.from_numpy(x)


def pixels_chw(image: Image.Image | np.ndarray) -> torch.Tensor:
    """H x W (x C) uint8 image -> uint8 C x H x W tensor: the pixels :func:`normalize` would read, not yet
    normalised (the training loader's fast path; :func:`normalize_batch` finishes the batch)."""
    hwc = _hwc(image)
    if hwc.shape[2] == 3 and hwc.flags.c_contiguous:
        # OpenCV's SIMD de-interleave into the three planes: the same bytes as NumPy's transposing copy
        # below, in one SIMD pass instead of a strided copy
        x = np.empty((3, *hwc.shape[:2]), np.uint8)
        cv2.split(hwc, [x[0], x[1], x[2]])
        return torch.from_numpy(x)
    x = np.ascontiguousarray(hwc.transpose(2, 0, 1))
    return torch.from_numpy(x if x.flags.writeable else x.copy())  # a 1-channel view of Pillow's read-only bytes


def _batch_constants(mean: Sequence[float], std: Sequence[float], c: int, device: torch.device
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(std, mean / std)`` as float32 1 x c x 1 x 1 tensors on ``device``: the divisor and the subtrahend."""
    s = torch.tensor(std[:c], dtype=torch.float32, device=device).view(1, c, 1, 1)
    return s, torch.tensor(mean[:c], dtype=torch.float32, device=device).view(1, c, 1, 1) / s


class BatchNormalizer:
    """:func:`normalize_batch` that builds its constants once per (device, channels) and keeps them: on a
    GPU each build is a host-to-device copy that waits for the device, so a training step holds one of
    these instead of calling :func:`normalize_batch` (no host sync per step). On the CPU, when every
    channel has the same mean and std (the default), a batch goes through a 256-entry float32 table in one
    ``cv2.LUT`` pass, the table made by the same ops (so the same bits) as the three-pass arithmetic."""

    def __init__(self, mean: Sequence[float] = DEFAULT_MEAN, std: Sequence[float] = DEFAULT_STD):
        self.mean, self.std = tuple(mean), tuple(std)
        self._constants: dict[tuple[torch.device, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self._tables: dict[tuple[torch.device, int], np.ndarray | None] = {}

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        if pixels.dtype != torch.uint8 or pixels.ndim != 4:
            raise ValueError(f"normalize_batch: expected an N x C x H x W uint8 batch, got {pixels.dtype} "
                             f"{tuple(pixels.shape)}")
        key = (pixels.device, pixels.shape[1])
        if key not in self._constants:
            self._constants[key] = _batch_constants(self.mean, self.std, key[1], key[0])
        s, m = self._constants[key]
        if pixels.device.type == "cpu" and pixels.is_contiguous() and pixels.numel() > 0:
            table = self._table(key, s, m)
            if table is not None:  # one pass through a 256-entry table instead of three over the batch
                return torch.from_numpy(cv2.LUT(pixels.numpy().reshape(-1, pixels.shape[-1]), table)).view(pixels.shape)
        return pixels.float().div_(s).sub_(m)

    def _table(self, key: tuple, s: torch.Tensor, m: torch.Tensor) -> np.ndarray | None:
        """``v / std − mean / std`` for every uint8 value v, by the same float32 ops as the batch path (so the
        same bits), when every channel shares it (the default mean and std); else None."""
        if key not in self._tables:
            values = torch.arange(256, dtype=torch.uint8).view(1, 1, 1, 256).expand(1, key[1], 1, 256)
            rows = values.float().div_(s).sub_(m)[0, :, 0]                     # (channels, 256)
            self._tables[key] = rows[0].numpy().copy() if bool((rows == rows[:1]).all()) else None
        return self._tables[key]


def normalize_batch(pixels: torch.Tensor, mean: Sequence[float] = DEFAULT_MEAN,
                    std: Sequence[float] = DEFAULT_STD) -> torch.Tensor:
    """N x C x H x W uint8 batch (of :func:`pixels_chw`) -> float32, on its own device: the same arithmetic as
    :func:`normalize` (``x / std - mean / std`` in float32), so the result is the same bit for bit.

    One vectorised op per batch instead of one per image, and on a GPU the batch crosses to the device
    as uint8 (a quarter of the bytes). Called per step, keep a :class:`BatchNormalizer` instead."""
    return BatchNormalizer(mean, std)(pixels)


@dataclass(frozen=True)
class Preprocessing:
    """What a model expects: RGB (or BGR) images of ``size`` (h, w), normalised ``(x - mean) / std``.

    Calling it prepares one image (PIL image or H x W x 3 uint8 RGB array) -> 3 x h x w tensor.
    ``mean`` and ``std`` are in pixel units (0..255), one value per input channel in the model's
    channel order (R, G, B; B, G, R when ``bgr``)."""

    size: tuple[int, int] = (112, 112)
    mean: tuple[float, float, float] = DEFAULT_MEAN
    std: tuple[float, float, float] = DEFAULT_STD
    bgr: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "size", size_hw(self.size))
        object.__setattr__(self, "mean", _per_channel(self.mean, "mean"))
        std = _per_channel(self.std, "std")
        if min(std) <= 0:
            raise ValueError(f"std must be positive, got {self.std!r}")
        object.__setattr__(self, "std", std)
        object.__setattr__(self, "bgr", bool(self.bgr))

    def __call__(self, image: Image.Image | np.ndarray) -> torch.Tensor:
        if isinstance(image, np.ndarray):
            if image.dtype != np.uint8 or image.ndim not in (2, 3):
                raise ValueError(f"expected an H x W (x 3) uint8 image, got {image.dtype} {image.shape}")
            image = Image.fromarray(image)
        if image.mode != "RGB":
            image = image.convert("RGB")
        return normalize(resize(image, self.size), self.mean, self.std, self.bgr)

    @property
    def side(self) -> int:
        """The square input side; ValueError for a non-square size."""
        h, w = self.size
        if h != w:
            raise ValueError(f"a square input is needed here, the model takes {h}x{w}")
        return h

    def normalization(self) -> str:
        """Channel order and normalisation, e.g. ``RGB, (x - 127.5) / 127.5``."""
        def fmt(v: tuple[float, ...]) -> str:
            return f"{v[0]:g}" if len(set(v)) == 1 else "(" + ", ".join(f"{x:g}" for x in v) + ")"

        return f"{'BGR' if self.bgr else 'RGB'}, (x - {fmt(self.mean)}) / {fmt(self.std)}"

    def describe(self) -> str:
        """One line, e.g. ``112x112 RGB, (x - 127.5) / 127.5``."""
        return f"{self.size[0]}x{self.size[1]} {self.normalization()}"

    def to_dict(self) -> dict:
        return {"size": list(self.size), "mean": list(self.mean), "std": list(self.std), "bgr": self.bgr}


def resize_batch(images: torch.Tensor, source: Preprocessing, target: Preprocessing) -> torch.Tensor:
    """A batch prepared with ``source`` re-prepared for ``target`` through the pipeline (resize included).

    Each image is mapped back to 8-bit pixels (exact for images that came from the pipeline)
    and prepared again, so a model that takes another size or normalisation sees what the
    pipeline would have given it from the same pixels. Unchanged when both are equal."""
    if source == target:
        return images
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected N x 3 x H x W images, got {tuple(images.shape)}")
    std = torch.tensor(source.std, dtype=torch.float32).view(1, 3, 1, 1)
    mean = torch.tensor(source.mean, dtype=torch.float32).view(1, 3, 1, 1)
    pixels = images.detach().float().cpu() * std + mean
    if source.bgr:
        pixels = pixels.flip(1)
    pixels = pixels.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return torch.stack([target(Image.fromarray(p)) for p in pixels]).to(images.device)


def load_images(paths: Sequence, preprocessing: Preprocessing | None = None) -> torch.Tensor:
    """Image files (or encoded bytes) -> N x 3 x H x W batch prepared with ``preprocessing`` (default 112x112).

    Missing file -> FileNotFoundError; undecodable -> ValueError naming it."""
    from broadface.data.images import read_rgb

    if len(paths) == 0:
        raise ValueError("load_images: no paths given")
    pre = preprocessing or Preprocessing()
    return torch.stack([pre(read_rgb(p)) for p in paths])
