"""Data of the study: full Omniglot decoded once into memory, class subsets, and the evaluation.

* :func:`omniglot` -- the standard split of ``broadface.data.open_dataset("omniglot")`` (train: 964
  background characters, test: 659 evaluation characters), optionally with the rotation classes
  (``rotations=4``: 3,856 training classes), decoded once per process at ``size`` x ``size`` through
  the same transform ``broadface train`` uses (``EvalTransform``: no flip, handwriting is not
  mirror-symmetric), so a study run is a ``broadface train`` run on the same tensors.
* ``classes=`` / :func:`class_subset` -- every k-th class, for the regime map (fewer classes, same
  images per class) and for fast tests.
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

    def class_counts(self) -> np.ndarray:
        return np.bincount(self.labels.numpy(), minlength=self.num_classes)


def _kept(num_total: int, num_classes: int | None) -> np.ndarray:
    """Every k-th class index (k = total // num_classes), the first ``num_classes`` of them; None: all."""
    if num_classes is None or num_classes == num_total:
        return np.arange(num_total)
    if not 0 < num_classes < num_total:
        raise ValueError(f"num_classes must be in (0, {num_total}], got {num_classes}")
    return np.arange(0, num_total, num_total // num_classes)[:num_classes]


@lru_cache(maxsize=4)
def omniglot(split: str, size: int = 28, rotations: int = 1, classes: int | None = None,
             data_root: str | None = None) -> MemorySet:
    """One split of full Omniglot in memory, optionally only every k-th class (relabelled 0..classes-1);
    only the kept images are decoded. Cached per process: treat it as read-only."""
    from broadface.data import open_dataset
    from broadface.data.transforms import EvalTransform

    ds = open_dataset("omniglot", split, transform=EvalTransform(size), data_root=data_root, rotations=rotations)
    keep = _kept(ds.num_classes, classes)
    new = np.full(ds.num_classes, -1)
    new[keep] = np.arange(len(keep))
    targets = np.asarray(ds.targets)
    idx = np.flatnonzero(new[targets] >= 0)
    images = torch.stack([ds[int(i)][0] for i in idx])
    return MemorySet(images, torch.from_numpy(new[targets[idx]]), [ds.classes[i] for i in keep])


def class_subset(data: MemorySet, num_classes: int | None) -> MemorySet:
    """Every k-th class of ``data`` (as :func:`omniglot` keeps them), relabelled 0..num_classes-1;
    ``None`` or all classes returns ``data`` itself."""
    if num_classes is None or num_classes == data.num_classes:
        return data
    keep = _kept(data.num_classes, num_classes)
    new = torch.full((data.num_classes,), -1, dtype=torch.long)
    new[torch.from_numpy(keep)] = torch.arange(len(keep))
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
