"""1:1 verification on image pairs: LFW ``pairs.txt`` + folder, or insightface ``.bin``.

Protocol = insightface ``eval/verification.py``: every image embedded with flip
TTA (``f(x) + f(flip(x))``), L2-normalised in float64, squared L2 distance per
pair, then :func:`broadface.metrics.kfold_accuracy` (10 contiguous folds, best
threshold on 9 applied to the 10th, VAL@FAR=1e-3). Cosine thresholds are
reported too (``cos = 1 - d / 2`` for unit vectors) for ``broadface verify``.

Masked-face setting (MFR style): ``image_hook`` (e.g.
``broadface.data.masks.apply_mask``) is applied to the *second* image of every
pair only, with a generator seeded per image, so the masked set is reproducible.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from broadface.data.pipeline import Preprocessing
from broadface.eval.images import EvalImages, ImageHook
from broadface.models.embed import embed_dataset
from broadface.models.loader import preprocessing_of
from broadface.metrics import kfold_accuracy

__all__ = ["PairSet", "lfw_pair_set", "bin_pair_set", "evaluate_pairs"]


@dataclass(frozen=True)
class PairSet:
    """Verification pairs over a list of unique images (``left[k]``, ``right[k]`` index ``sources``)."""

    name: str
    sources: list            # file paths or encoded image bytes
    left: np.ndarray
    right: np.ndarray
    issame: np.ndarray

    def __len__(self) -> int:
        return int(self.issame.size)

    def subset(self, max_pairs: int | None) -> "PairSet":
        """``max_pairs`` evenly spaced pairs (keeps the fold layout and the same/different mix of
        files ordered like LFW's); the set itself when ``max_pairs`` is None or large enough."""
        if max_pairs is None or max_pairs >= len(self):
            return self
        if max_pairs < 2:
            raise ValueError(f"max_pairs must be >= 2, got {max_pairs}")
        keep = np.unique(np.linspace(0, len(self) - 1, int(max_pairs)).round().astype(np.int64))
        return replace(self, left=self.left[keep], right=self.right[keep], issame=self.issame[keep])


def lfw_pair_set(pairs_txt: str | os.PathLike, image_dir: str | os.PathLike, name: str = "lfw") -> PairSet:
    """LFW View-2 pairs; images at ``image_dir/<Name>/<Name>_NNNN.jpg``. Missing images are an error."""
    from broadface.data.pairs import read_lfw_pairs

    image_dir = Path(image_dir)
    if not image_dir.is_dir():
        raise FileNotFoundError(f"LFW image folder {image_dir} does not exist")
    pairs = read_lfw_pairs(pairs_txt)
    index: dict[str, int] = {}
    left, right = [], []
    for p in pairs:
        left.append(index.setdefault(p.path1, len(index)))
        right.append(index.setdefault(p.path2, len(index)))
    sources = [image_dir / rel for rel in index]
    missing = [str(s) for s in sources if not s.is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} image(s) named in {pairs_txt} are missing under {image_dir}, "
                                f"e.g. {missing[0]}")
    return PairSet(name, [str(s) for s in sources], np.array(left), np.array(right),
                   np.array([p.same for p in pairs], dtype=bool))


def bin_pair_set(path: str | os.PathLike, name: str | None = None) -> PairSet:
    """insightface ``.bin`` (read with a data-only unpickler): images 2k and 2k+1 form pair k."""
    from broadface.data.binfile import load_bin

    images, issame = load_bin(path)
    left = np.arange(0, 2 * issame.size, 2)
    return PairSet(name or Path(path).stem, images, left, left + 1, issame)


def evaluate_pairs(model: nn.Module, pairs: PairSet, *, folds: int = 10, flip: bool = True, batch_size: int = 128,
                   device: str | torch.device | None = None, num_workers: int = 0, image_hook: ImageHook | None = None,
                   hook_seed: int = 0, preprocessing: Preprocessing | None = None, far_target: float = 1e-3
                   ) -> dict[str, Any]:
    """Embed the pairs' images and score them with the k-fold protocol (see module doc).

    Returns accuracy ± std, per-fold accuracies and thresholds (distance and
    cosine), VAL@FAR, the best overall cosine threshold, and the raw cosine
    ``scores`` with ``issame`` (numpy arrays, for ROC plots).
    """
    if len(pairs) < folds:
        raise ValueError(f"{pairs.name}: {len(pairs)} pairs cannot fill {folds} folds")
    pre = preprocessing or preprocessing_of(model)
    if image_hook is None:
        used = np.unique(np.concatenate([pairs.left, pairs.right]))
        srcs, mask = [pairs.sources[i] for i in used], None
        pos = np.full(len(pairs.sources), -1)
        pos[used] = np.arange(used.size)
        li, ri = pos[pairs.left], pos[pairs.right]
    else:  # unmasked copies of left images, masked copies of right images
        ul, ur = np.unique(pairs.left), np.unique(pairs.right)
        srcs = [pairs.sources[i] for i in ul] + [pairs.sources[i] for i in ur]
        mask = np.r_[np.zeros(ul.size, bool), np.ones(ur.size, bool)]
        li, ri = np.searchsorted(ul, pairs.left), ul.size + np.searchsorted(ur, pairs.right)
    names = None if not isinstance(srcs[0], (bytes, bytearray)) else [
        f"{pairs.name} image {i}" for i in range(len(srcs))]
    data = EvalImages(srcs, pre, hook=image_hook, hook_mask=mask, seed=hook_seed, names=names)
    emb = embed_dataset(model, data, batch_size=batch_size, flip=flip, device=device, num_workers=num_workers,
                        dtype=np.float64)
    e1, e2 = emb[li], emb[ri]
    dist = np.sum(np.square(e1 - e2), axis=1)
    cosine = np.sum(e1 * e2, axis=1)
    r = kfold_accuracy(dist, pairs.issame, folds, distance=True, far_target=far_target)
    return {
        "name": pairs.name, "pairs": len(pairs), "images": len(srcs), "folds": folds, "flip": flip,
        "masked_second_image": image_hook is not None,
        "accuracy": r.accuracy_mean, "accuracy_std": r.accuracy_std, "accuracies": r.accuracies.tolist(),
        "val": r.val, "val_std": r.val_std, "far": r.far, "far_target": r.far_target,
        "distance_thresholds": r.thresholds.tolist(), "distance_threshold": r.best_threshold,
        "cosine_thresholds": (1.0 - r.thresholds / 2.0).tolist(), "cosine_threshold": 1.0 - r.best_threshold / 2.0,
        "scores": cosine, "issame": pairs.issame.copy(),
    }
