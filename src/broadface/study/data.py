"""Data for the reproduction study: Omniglot decoded once into memory, and the evaluation protocols.

* :func:`load_omniglot` -- the class-disjoint train (136 characters) / test (106 characters)
  splits of ``broadface.data.open_dataset("omniglot")`` at 28x28, decoded once into tensors
  (the PNGs are otherwise re-read from the zips every epoch). No flip: training and evaluation
  images are the same deterministic tensors.
* :func:`pair_protocol` -- an LFW-style verification protocol built deterministically from the
  unseen classes: 10 class-disjoint folds x (300 same + 300 different) pairs, contiguous by fold,
  scored by :func:`broadface.metrics.kfold_accuracy` (10-fold threshold selection).
* :func:`evaluate` -- Recall@K (every test image queries all others) and the pair accuracy.
"""
from __future__ import annotations

from dataclasses import dataclass
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
        self.images, self.labels, self.classes = images, labels.long(), list(classes)
        self.num_classes = len(self.classes)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return self.images[index], int(self.labels[index])

    def getitem(self, index: int, generator: torch.Generator | None = None) -> tuple[Tensor, int]:
        return self[index]


@lru_cache(maxsize=2)
def load_omniglot(size: int = 28, data_root: str | None = None) -> tuple[MemorySet, MemorySet]:
    """(train, test) Omniglot splits, decoded once per process at ``size`` x ``size`` (3 channels, [-1, 1]).

    Cached: treat the returned sets as read-only."""
    from broadface.data import open_dataset
    from broadface.data.transforms import EvalTransform

    out = []
    for split in ("train", "test"):
        ds = open_dataset("omniglot", split, transform=EvalTransform(size), data_root=data_root)
        items = [ds[i] for i in range(len(ds))]
        out.append(MemorySet(torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items]), ds.classes))
    return out[0], out[1]


@dataclass(frozen=True)
class PairProtocol:
    """Pairs ``(first[k], second[k])`` of test-set indices; ``issame[k]``; fold ``k // per_fold``."""

    first: np.ndarray
    second: np.ndarray
    issame: np.ndarray
    folds: int

    def __len__(self) -> int:
        return len(self.issame)


def pair_protocol(labels: np.ndarray, folds: int = 10, same: int = 300, diff: int = 300,
                  seed: int = 0) -> PairProtocol:
    """Class-disjoint folds (consecutive class ids split in ``folds`` groups); in each fold ``same``
    distinct same-class pairs and ``diff`` distinct different-class pairs, drawn with ``seed``."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    first, second, issame = [], [], []
    for fold_classes in np.array_split(np.unique(labels), folds):
        members = {c: np.flatnonzero(labels == c) for c in fold_classes}
        pos = [(a, b) for c in fold_classes for i, a in enumerate(members[c]) for b in members[c][i + 1:]]
        if len(pos) < same:
            raise ValueError(f"fold with classes {fold_classes.tolist()} has only {len(pos)} same pairs")
        chosen = [pos[i] for i in np.sort(rng.choice(len(pos), same, replace=False))]
        neg: set[tuple[int, int]] = set()
        while len(neg) < diff:
            c1, c2 = rng.choice(fold_classes, 2, replace=False)
            neg.add((int(rng.choice(members[c1])), int(rng.choice(members[c2]))))
        for (a, b), s in [(p, True) for p in chosen] + [(p, False) for p in sorted(neg)]:
            first.append(a)
            second.append(b)
            issame.append(s)
    return PairProtocol(np.array(first), np.array(second), np.array(issame), folds)


@torch.no_grad()
def embed(model: nn.Module, images: Tensor, batch_size: int = 512) -> np.ndarray:
    """L2-normalised embeddings (eval mode, no flip: handwriting is not mirror-symmetric)."""
    from broadface.models.embed import embed_tensors

    chunks = [embed_tensors(model, images[i:i + batch_size], flip=False) for i in range(0, len(images), batch_size)]
    return torch.cat(chunks).cpu().numpy()


def evaluate(model: nn.Module, test: MemorySet, pairs: PairProtocol | None) -> dict[str, float]:
    """``recall@k`` on the unseen classes and, with ``pairs``, ``pair_acc`` ± ``pair_std`` (10-fold)."""
    from broadface.metrics import kfold_accuracy, recall_at_k

    emb = embed(model, test.images)
    rec = recall_at_k(emb, test.labels.numpy(), ks=RECALL_KS)
    out = {f"recall@{k}": float(rec[k]) for k in RECALL_KS}
    if pairs is not None:
        scores = (emb[pairs.first] * emb[pairs.second]).sum(1)
        res = kfold_accuracy(scores, pairs.issame, folds=pairs.folds)
        out.update(pair_acc=float(res.accuracy_mean), pair_std=float(res.accuracy_std))
    return out
