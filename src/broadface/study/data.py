"""Data of the study: full Omniglot decoded once into memory, class subsets, and the evaluation.

* :func:`omniglot` -- the standard split of ``broadface.data.open_dataset("omniglot")`` (train: 964
  background characters, test: 659 evaluation characters), optionally with the rotation classes
  (``rotations=4``: 3,856 training classes), decoded once per process at ``size`` x ``size`` through
  the same transform ``broadface train`` uses (``EvalTransform``: no flip, handwriting is not
  mirror-symmetric), so a study run is a ``broadface train`` run on the same tensors.
* :func:`class_subset` -- every k-th training class, for the regime map (fewer classes, same images
  per class).
* :func:`evaluate` -- Recall@K on the unseen evaluation characters, every image querying all others.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

RECALL_KS = (1, 2, 4, 8)


class MemorySet(Dataset):
    """``(image, label)`` items held in memory; ``getitem(i, generator)`` for the seeded loader."""

    supports_generator = True

    def __init__(self, images: Tensor, labels: Tensor, classes: list[str]):
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images, self.labels, self.classes = images, labels.long(), list(classes)
        self.num_classes = len(self.classes)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return self.images[index], int(self.labels[index])

    def getitem(self, index: int, generator: torch.Generator | None = None) -> tuple[Tensor, int]:
        return self[index]


def _decode(split: str, size: int, rotations: int, data_root: str | None) -> MemorySet:
    from broadface.data import open_dataset
    from broadface.data.transforms import EvalTransform

    ds = open_dataset("omniglot", split, transform=EvalTransform(size), data_root=data_root, rotations=rotations)
    images = torch.stack([ds[i][0] for i in range(len(ds))])
    return MemorySet(images, torch.tensor(ds.targets), ds.classes)


@lru_cache(maxsize=4)
def omniglot(split: str, size: int = 28, rotations: int = 1, data_root: str | None = None) -> MemorySet:
    """One split of full Omniglot in memory (cached per process: treat it as read-only)."""
    return _decode(split, size, rotations, data_root)


def class_subset(data: MemorySet, num_classes: int | None) -> MemorySet:
    """Every k-th class of ``data`` (k = C // num_classes, the first ``num_classes`` of those),
    relabelled 0..num_classes-1; ``None`` or all classes returns ``data`` itself."""
    total = data.num_classes
    if num_classes is None or num_classes == total:
        return data
    if not 0 < num_classes < total:
        raise ValueError(f"num_classes must be in (0, {total}], got {num_classes}")
    keep = np.arange(0, total, total // num_classes)[:num_classes]
    new = torch.full((total,), -1, dtype=torch.long)
    new[torch.from_numpy(keep)] = torch.arange(num_classes)
    mask = new[data.labels] >= 0
    return MemorySet(data.images[mask], new[data.labels[mask]], [data.classes[i] for i in keep])


@torch.no_grad()
def embed(model: nn.Module, images: Tensor, batch_size: int = 1024) -> np.ndarray:
    """L2-normalised embeddings in eval mode, no flip."""
    from broadface.models.embed import embed_tensors

    chunks = [embed_tensors(model, images[i:i + batch_size], flip=False) for i in range(0, len(images), batch_size)]
    return torch.cat(chunks).cpu().numpy()


def evaluate(model: nn.Module, test: MemorySet) -> dict[str, float]:
    """``recall@k`` over the unseen classes (every test image queries all others, cosine)."""
    from broadface.metrics import recall_at_k

    rec = recall_at_k(embed(model, test.images), test.labels.numpy(), ks=RECALL_KS)
    return {f"recall@{k}": float(rec[k]) for k in RECALL_KS}
