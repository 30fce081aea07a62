"""Named real data sets under the configurable data root (``broadface.paths.data_root``).

=============  =================================  ==========================================
name           location under the root            train / test (class-disjoint)
=============  =================================  ==========================================
``lfw``        ``lfw/aligned-112x112`` +           ``test_fold=None``: train = people in no
               ``lfw/pairs.txt``                   View-2 pair, test = people in some pair;
                                                   ``test_fold=k``: test = people of fold k,
                                                   train = everyone else
``celeba299``  ``celeba299/aligned-112x112``       ids sorted numerically: first 149 / other 150
``omniglot``   ``omniglot/images_background.zip``  the standard split: background (964
               + ``images_evaluation.zip``         characters) / evaluation (659 others)
``omniglot_    ``omniglot/images_background_       the small subsets by alphabet, 136 / 106
small``        small{1,2}.zip``                    characters (fast tests)
=============  =================================  ==========================================

``split="all"`` gives every class. Labels are ``0..len(classes)-1`` within the split.
``rotations=4`` makes each class at 0/90/180/270° a class of its own (any set; Omniglot's
few-shot convention, :mod:`.rotations`).
"""
from __future__ import annotations

import os
from pathlib import Path

from broadface.data.base import ImageDataset, Transform
from broadface.data.folder import FaceFolder, list_classes
from broadface.data.omniglot import open_omniglot_full, open_omniglot_small
from broadface.data.rotations import RotatedClasses
from broadface.data.splits import celeba299_split, lfw_split
from broadface.paths import data_root as _data_root

DATASETS = ("lfw", "celeba299", "omniglot", "omniglot_small")
SPLITS = ("train", "test", "all")
_LOCATION = {"lfw": "lfw/aligned-112x112", "celeba299": "celeba299/aligned-112x112", "omniglot": "omniglot",
             "omniglot_small": "omniglot"}


def dataset_path(name: str, data_root: str | os.PathLike | None = None) -> Path:
    """Folder of set ``name`` under the data root; FileNotFoundError saying where it looked."""
    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; known: {', '.join(DATASETS)}")
    root = _data_root(data_root)
    path = root / _LOCATION[name]
    if not path.is_dir():
        raise FileNotFoundError(f"data set {name!r} not found: {path} does not exist (data root {root}; "
                                f"set $BROADFACE_DATA or pass data_root)")
    return path


def open_dataset(
    name: str,
    split: str = "train",
    transform: Transform | None = None,
    data_root: str | os.PathLike | None = None,
    *,
    on_error: str = "raise",
    test_fold: int | None = None,
    rotations: int = 1,
) -> ImageDataset:
    """Open real set ``name`` (one of :data:`DATASETS`) for ``split`` ("train"/"test"/"all").

    ``test_fold`` (LFW only) picks which View-2 fold's people form the test side;
    ``rotations`` (1, 2 or 4) turns every class into that many rotated classes.
    """
    if rotations != 1:
        base = open_dataset(name, split, None, data_root, on_error=on_error, test_fold=test_fold)
        return RotatedClasses(base, rotations, transform, on_error)
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if test_fold is not None and name != "lfw":
        raise ValueError(f"test_fold applies to 'lfw' only, not {name!r}")
    path = dataset_path(name, data_root)
    if name == "omniglot":
        return open_omniglot_full(path, split, transform, on_error)
    if name == "omniglot_small":
        return open_omniglot_small(path, split, transform, on_error)
    classes = list_classes(path)
    if split != "all":
        if name == "lfw":
            pairs = path.parent / "pairs.txt"
            train, test = lfw_split(classes, pairs, test_fold)
        else:
            train, test = celeba299_split(classes)
        classes = train if split == "train" else test
    return FaceFolder(path, transform, classes=classes, on_error=on_error)
