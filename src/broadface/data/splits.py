"""Class-disjoint splits: train and test never share an identity.

* :func:`class_disjoint_split` -- generic, by count or fraction, in sorted / numeric / seeded
  shuffled order.
* :func:`celeba299_split` -- the CelebA-299 retrieval protocol: ids sorted numerically, the
  first 149 train, the other 150 test.
* :func:`lfw_pair_folds` / :func:`lfw_split` -- the identities of each LFW View-2 fold, to
  train on people outside fold ``k`` (or outside every pair) and verify on fold ``k``.
"""
from __future__ import annotations

import os
import random
from typing import Iterable, Sequence

from broadface.data.base import check_classes
from broadface.data.pairs import read_lfw_pairs

ORDERS = ("sorted", "numeric", "shuffle")
CELEBA299_TRAIN = 149
CELEBA299_TOTAL = 299


def _numeric_key(c: str) -> int:
    try:
        return int(c)
    except ValueError:
        raise ValueError(f"order='numeric' needs integer class names, got {c!r}") from None


def order_classes(classes: Iterable[str], order: str = "sorted", seed: int | None = None) -> list[str]:
    """``classes`` in the given order; ``"shuffle"`` needs ``seed`` (sorted, then seeded shuffle)."""
    classes = check_classes(list(classes), "split")
    if order == "sorted":
        return sorted(classes)
    if order == "numeric":
        return sorted(classes, key=_numeric_key)
    if order == "shuffle":
        if seed is None:
            raise ValueError("order='shuffle' needs a seed (a split must be reproducible)")
        out = sorted(classes)
        random.Random(seed).shuffle(out)
        return out
    raise ValueError(f"order must be one of {ORDERS}, got {order!r}")


def class_disjoint_split(
    classes: Iterable[str],
    num_train: int | None = None,
    fraction: float | None = None,
    seed: int | None = None,
    order: str = "sorted",
) -> tuple[list[str], list[str]]:
    """Split ``classes`` into (train, test) class lists with no class in both.

    Give exactly one of ``num_train`` (a count) or ``fraction`` (of classes, rounded). The
    classes are ordered by ``order`` and the first ``num_train`` go to train; both parts are
    returned in that order (for ``"shuffle"``: each part sorted, so labels stay stable).
    ``seed`` only matters for ``order="shuffle"``.
    """
    ordered = order_classes(classes, order, seed)
    n = len(ordered)
    if (num_train is None) == (fraction is None):
        raise ValueError("give exactly one of num_train or fraction")
    if fraction is not None:
        if not 0.0 < fraction < 1.0:
            raise ValueError(f"fraction must be in (0, 1), got {fraction}")
        num_train = round(fraction * n)
    assert num_train is not None
    if isinstance(num_train, bool) or not isinstance(num_train, int) or not 0 < num_train < n:
        raise ValueError(f"num_train must leave both sides non-empty: 0 < num_train < {n}, got {num_train!r}")
    train, test = ordered[:num_train], ordered[num_train:]
    if order == "shuffle":
        train, test = sorted(train), sorted(test)
    return train, test


def celeba299_split(classes: Iterable[str]) -> tuple[list[str], list[str]]:
    """CelebA-299 protocol: the 299 ids sorted numerically; first 149 train, other 150 test."""
    classes = list(classes)
    if len(classes) != CELEBA299_TOTAL:
        raise ValueError(f"CelebA-299 protocol expects {CELEBA299_TOTAL} identities, got {len(classes)}")
    return class_disjoint_split(classes, num_train=CELEBA299_TRAIN, order="numeric")


def lfw_pair_folds(pairs_txt: str | os.PathLike) -> list[list[str]]:
    """The identities appearing in each View-2 fold of ``pairs_txt`` (sorted, one list per fold)."""
    pairs = read_lfw_pairs(pairs_txt)
    folds: list[set[str]] = [set() for _ in range(pairs[-1].fold + 1)]
    for p in pairs:
        folds[p.fold].update((p.name1, p.name2))
    return [sorted(f) for f in folds]


def lfw_split(
    classes: Sequence[str], pairs_txt: str | os.PathLike, test_fold: int | None = None
) -> tuple[list[str], list[str]]:
    """(train, test) identities for LFW.

    ``test_fold=k``: test = the people of fold ``k``; train = every other class (people of the
    other folds and people in no pair). ``test_fold=None``: train = people in no pair at all,
    test = people in any pair. Both lists keep ``classes``' order.
    """
    folds = lfw_pair_folds(pairs_txt)
    if test_fold is None:
        held = set().union(*folds)
    elif isinstance(test_fold, int) and not isinstance(test_fold, bool) and 0 <= test_fold < len(folds):
        held = set(folds[test_fold])
    else:
        raise ValueError(f"test_fold must be None or 0..{len(folds) - 1}, got {test_fold!r}")
    classes = check_classes(classes, "lfw_split")
    missing = sorted(held - set(classes))
    if missing:
        raise ValueError(f"{pairs_txt}: {len(missing)} pair identities are not among the classes, e.g. {missing[:3]}")
    return [c for c in classes if c not in held], [c for c in classes if c in held]
