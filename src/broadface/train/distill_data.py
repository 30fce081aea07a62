"""Training data for distillation: unlabeled images, and items that carry their cache key.

:class:`DistillDataset` joins the labelled training set with optional unlabeled images
(label ``-1``: they get the distillation term only) and returns ``(image, label, key)``
with ``key = 2 * index + flipped``: the row of the teacher-embedding cache that holds the
teacher's embedding of exactly this view. The flip is read back by replaying the sample's
generator through the transform's :meth:`FaceTransform.draw`, so it is the flip the
transform applied (same seed, same draws), with no change to the loader.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset

from broadface.data.base import ImageDataset, Transform
from broadface.data.folder import find_images
from broadface.data.images import IMG_EXTENSIONS, decode_image

UNLABELED = -1


class UnlabeledImages(ImageDataset):
    """Every image under ``root`` (recursively, sorted), each with label ``-1``."""

    def __init__(self, root: str | os.PathLike, transform: Transform | None = None, on_error: str = "raise"):
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"distill.unlabeled_root {root} is not a folder")
        files = [str(p) for p in find_images(root)]
        if not files:
            raise ValueError(f"distill.unlabeled_root {root}: no images ({', '.join(IMG_EXTENSIONS)}) found")
        super().__init__(len(files), transform, on_error)
        self.samples = [(f, UNLABELED) for f in files]
        self.classes: list[str] = []
        self.origin = str(root)

    def __len__(self) -> int:
        return len(self.samples)

    def source(self, index: int) -> str:
        return self.samples[index][0]

    def _read(self, index: int) -> tuple[Image.Image, int]:
        return decode_image(self.samples[index][0]), UNLABELED

    @property
    def targets(self) -> list[int]:
        return [UNLABELED] * len(self.samples)


def _parts(dataset: Dataset, unlabeled: Dataset | None) -> list[Dataset]:
    return [dataset] + ([unlabeled] if unlabeled is not None else [])


def fingerprint(datasets: list[Dataset]) -> dict[str, Any]:
    """Count and SHA-256 of the samples' sources and labels (a stale cache is one built on other files)."""
    h = hashlib.sha256()
    count = 0
    for ds in datasets:
        samples = getattr(ds, "samples", None)
        if samples is None:
            raise ValueError(f"distill.cache: {type(ds).__name__} has no .samples (source, label) list to identify "
                             "it by; use a broadface data set or run without a cache")
        for src, label in samples:
            h.update(f"{src}\t{label}\n".encode())
        count += len(samples)
    return {"count": count, "sha256": h.hexdigest()}


class DistillDataset(Dataset):
    """``(image, label, key)`` items over ``dataset`` followed by ``unlabeled`` (see module doc).

    Attributes (``classes``, ``num_classes``...) fall through to the labelled set.
    """

    def __init__(self, dataset: Dataset, unlabeled: Dataset | None = None):
        self.dataset, self.unlabeled = dataset, unlabeled
        self.parts = _parts(dataset, unlabeled)
        self.offset = len(dataset)  # type: ignore[arg-type]
        self.samples = [s for p in self.parts for s in getattr(p, "samples", [])]

    def __len__(self) -> int:
        return sum(len(p) for p in self.parts)  # type: ignore[arg-type]

    @property
    def supports_generator(self) -> bool:
        return all(getattr(p, "supports_generator", False) for p in self.parts)

    def _locate(self, index: int) -> tuple[Dataset, int]:
        if index < self.offset:
            return self.dataset, index
        return self.unlabeled, index - self.offset  # type: ignore[return-value]

    def getitem(self, index: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, int, int]:
        part, local = self._locate(int(index))
        if generator is None:
            image, label = part[local]
            return image, int(label), 2 * int(index)
        state = generator.get_state()
        image, label = part.getitem(local, generator)  # type: ignore[attr-defined]
        flipped = False
        draw = getattr(getattr(part, "transform", None), "draw", None)
        if draw is not None:  # replay the sample's draws to learn whether the transform flipped
            replay = torch.Generator()
            replay.set_state(state)
            flipped = draw(replay)[1]
        return image, int(label), 2 * int(index) + int(flipped)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        return self.getitem(index)

    def __getattr__(self, name: str) -> Any:
        if name in ("dataset", "unlabeled", "parts"):  # not set yet (unpickling): avoid recursion
            raise AttributeError(name)
        return getattr(self.dataset, name)
