"""Common base of the labelled image datasets: lazy decoding, seeded transforms, skip mode.

A dataset item is ``(image tensor CHW float, int label)``. Subclasses only say how to read
sample ``i`` (:meth:`ImageDataset._read`) and how to name it (:meth:`ImageDataset.source`).

Seeded augmentation: :meth:`ImageDataset.getitem` takes a ``torch.Generator`` that is passed
to the transform, so the loader can give every sample a generator seeded from
``(seed, epoch, index)`` (see :mod:`broadface.data.loader`) and flips are reproducible no
matter which worker or batch position the sample lands in.

``on_error="skip"``: a sample whose image cannot be decoded is replaced by the next readable
sample (``i+1, i+2, ...`` cyclically) *together with that sample's own label*, so a label never
describes a different image. Bad samples are flagged in a shared-memory byte tensor, which
DataLoader workers (fork or spawn) write into, so :attr:`ImageDataset.skipped` in the main
process lists every file any worker skipped, and a flagged file is not decoded again.
"""
from __future__ import annotations

import functools
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from broadface.data.images import ImageDecodeError, decode_pixels
from broadface.data.pipeline import normalize

Transform = Callable[..., torch.Tensor]
ON_ERROR = ("raise", "skip")


def to_unit_tensor(img: Image.Image) -> torch.Tensor:
    """PIL image -> float32 CHW tensor in [0, 1] (what ``transform=None`` returns)."""
    return normalize(img, mean=(0.0, 0.0, 0.0), std=(255.0, 255.0, 255.0))


def call_transform(transform: Transform | None, img: Image.Image | np.ndarray,
                   generator: torch.Generator | None) -> torch.Tensor:
    """Apply ``transform``; pass ``generator`` only to transforms that accept one, and a decoded uint8 array
    only to those that take arrays (``accepts_array``; any other transform gets a PIL image)."""
    if transform is None:
        return to_unit_tensor(img)
    if isinstance(img, np.ndarray) and not getattr(transform, "accepts_array", False):
        img = Image.fromarray(img)
    if generator is not None and getattr(transform, "accepts_generator", False):
        return transform(img, generator=generator)
    return transform(img)


class ImageDataset(Dataset):
    """Labelled images decoded on access. Attributes: ``classes``, ``targets``, ``transform``."""

    classes: list[str]
    origin: str = "dataset"  # folder / file the samples come from, for messages

    def __init__(self, num_samples: int, transform: Transform | None = None, on_error: str = "raise"):
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
        self.transform = transform
        self.on_error = on_error
        # One byte per sample; shared so that worker processes' skips are visible here.
        self._bad = torch.zeros(num_samples if on_error == "skip" else 0, dtype=torch.uint8)
        if on_error == "skip" and num_samples:
            self._bad.share_memory_()

    # -- subclass API ------------------------------------------------------------------
    def __len__(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def source(self, index: int) -> str:
        """Human-readable origin of sample ``index`` (file path, zip member, record)."""
        raise NotImplementedError

    def _read(self, index: int) -> tuple[Image.Image | np.ndarray, int]:
        """Decode sample ``index`` (a PIL image, or the uint8 array of
        :func:`~broadface.data.images.decode_pixels`); raise :class:`ImageDecodeError` if it is unreadable.
        By default :meth:`encoded`'s bytes through ``decode_pixels``."""
        found = self.encoded(index)
        if found is None:
            raise NotImplementedError
        return self._from_encoded(index, found)

    def encoded(self, index: int) -> tuple[bytes, int] | None:
        """``(encoded image bytes, label)`` of sample ``index`` itself (no skip-mode substitute), for the batched
        fetch (:mod:`broadface.data.batched`); None where the subclass has no such bytes. Raises
        :class:`ImageDecodeError` for an unreadable source, as :meth:`_read` does."""
        return None

    def _from_encoded(self, index: int, found: tuple[bytes, int]) -> tuple[np.ndarray, int]:
        """Sample ``index`` decoded from its :meth:`encoded` pair ``found``, as the default :meth:`_read` does."""
        return decode_pixels(found[0], self.source(index)), found[1]

    # -- public API --------------------------------------------------------------------
    @property
    def targets(self) -> list[int]:
        raise NotImplementedError

    def image(self, index: int) -> tuple[Image.Image, int]:
        """``(PIL image, label)`` of sample ``index`` (or its substitute in skip mode)."""
        img, label = self._decoded(index)
        return (Image.fromarray(img) if isinstance(img, np.ndarray) else img), label

    def _decoded(self, index: int, encoded: tuple[bytes, int] | None = None) -> tuple[Image.Image | np.ndarray, int]:
        """:meth:`image` as :meth:`_read` returns it (an array stays an array, for :meth:`getitem`). ``encoded``:
        sample ``index``'s :meth:`encoded` pair when the caller has already read it (decoded, not read again)."""
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} samples")
        index %= n
        skip = self.on_error == "skip"
        for step in range(n if skip else 1):
            j = (index + step) % n
            if skip and self._bad[j]:
                continue
            try:
                return self._from_encoded(j, encoded) if step == 0 and encoded is not None else self._read(j)
            except ImageDecodeError:
                if not skip:
                    raise
                self._bad[j] = 1
        raise ValueError(f"{self.origin}: none of the {n} images could be decoded (on_error='skip')")

    def getitem(self, index: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, int]:
        """``(tensor, label)`` with the transform's randomness drawn from ``generator``."""
        img, label = self._decoded(index)
        return call_transform(self.transform, img, generator), label

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.getitem(index)

    @property
    def supports_generator(self) -> bool:
        """True if :meth:`getitem`'s randomness comes only from its ``generator`` argument."""
        return self.transform is None or bool(getattr(self.transform, "accepts_generator", False))

    @property
    def skipped(self) -> list[str]:
        """Sources found unreadable so far (skip mode), in index order, across all workers."""
        if self.on_error != "skip":
            return []
        return [self.source(int(i)) for i in torch.nonzero(self._bad).flatten()]

    def class_counts(self) -> np.ndarray:
        """Number of samples per class (length ``len(classes)``)."""
        return np.bincount(np.asarray(self.targets, dtype=np.int64), minlength=len(self.classes))

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @functools.cached_property
    def class_to_idx(self) -> dict[str, int]:
        """{class name: label}, built once (classes are fixed at construction)."""
        return {c: i for i, c in enumerate(self.classes)}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self)} images, {len(self.classes)} classes)"


def check_classes(classes: Sequence[str], where: str) -> list[str]:
    """Validate a class list (strings, no duplicates) and return it as a list."""
    classes = [str(c) for c in classes]
    if not classes:
        raise ValueError(f"{where}: no classes")
    seen: set[str] = set()
    dup = [c for c in classes if c in seen or seen.add(c)]  # type: ignore[func-returns-value]
    if dup:
        raise ValueError(f"{where}: duplicate class name(s) {dup[:5]}")
    return classes
