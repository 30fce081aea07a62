"""Verification sets evaluated while training (``train.val_bins``), as insightface's callback does.

Each entry of ``train.val_bins`` is

- a path to an insightface verification ``.bin`` (read with the data-only unpickler);
- ``lfw``: LFW View 2 under the data root (``lfw/pairs.txt`` + ``lfw/aligned-112x112``). When the run
  trains on LFW itself with ``data.test_fold=k``, only fold k's 600 pairs are used (the other folds'
  people are trained on), named ``lfw_fold<k>``;
- a folder in the LFW layout (``pairs.txt`` + ``aligned-112x112/``).

Every ``train.eval_every`` steps (and at the end) each set's 10-fold accuracy is measured with
:func:`broadface.eval.evaluate_pairs` (flip TTA per ``train.eval_flip``) on rank 0, and logged as
``<name>_accuracy`` / ``<name>_accuracy_std``; the best and the last accuracy of every set go to the
summary. The evaluation runs in a fork of the global RNGs, so adding verification sets changes nothing
in the training itself.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

FOLDS = 10


def open_pair_sets(entries: list[str], data_root: str | None = None, lfw_fold: int | None = None) -> list:
    """The :class:`broadface.eval.PairSet` of every entry, each under a name of its own."""
    from broadface.eval.verification import bin_pair_set, lfw_pair_set

    sets: list = []
    for entry in entries:
        names = [s.name for s in sets]
        path = Path(entry)
        if entry == "lfw" and not path.exists():
            from broadface.paths import data_root as find_root

            lfw = find_root(data_root) / "lfw"
            ps = lfw_pair_set(lfw / "pairs.txt", lfw / "aligned-112x112", "lfw")
            if lfw_fold is not None:
                ps = fold_subset(ps, lfw / "pairs.txt", lfw_fold)
        elif path.is_dir():
            ps = lfw_pair_set(path / "pairs.txt", path / "aligned-112x112", path.name)
        elif path.is_file() and path.suffix == ".bin":
            ps = bin_pair_set(path)
        else:
            what = "does not exist" if not path.exists() else "is neither a .bin file nor an LFW-layout folder"
            raise FileNotFoundError(f"config train.val_bins: {entry} {what} (expected a verification .bin, 'lfw', "
                                    "or a folder holding pairs.txt and aligned-112x112/)")
        if len(ps) < FOLDS:
            raise ValueError(f"config train.val_bins: {entry} has {len(ps)} pairs, fewer than the {FOLDS} folds")
        name = ps.name if ps.name not in names else str(path)
        sets.append(replace(ps, name=name))
    return sets


def fold_subset(pairs, pairs_txt: Path, fold: int):
    """The pairs of one View-2 fold, matched and mismatched interleaved (so that every one of the
    protocol's contiguous folds holds both kinds)."""
    from broadface.data.pairs import read_lfw_pairs

    folds = np.array([p.fold for p in read_lfw_pairs(pairs_txt)])
    if not 0 <= fold <= folds.max():
        raise ValueError(f"config data.test_fold={fold}: {pairs_txt} has folds 0..{folds.max()}")
    idx = np.flatnonzero(folds == fold)
    same, diff = idx[pairs.issame[idx]], idx[~pairs.issame[idx]]
    n = min(len(same), len(diff))
    order = np.concatenate([np.stack([same[:n], diff[:n]], 1).reshape(-1), same[n:], diff[n:]])
    return replace(pairs, name=f"lfw_fold{fold}", left=pairs.left[order], right=pairs.right[order],
                   issame=pairs.issame[order])


class VerificationSets:
    """The sets of ``train.val_bins``, their evaluation and their best / last accuracy."""

    def __init__(self, sets: list, input_size: int, flip: bool, batch_size: int):
        self.sets, self.flip, self.batch_size = sets, flip, batch_size
        self.input_size = input_size
        self.best: dict[str, dict[str, Any]] = {}
        self.last: dict[str, dict[str, Any]] = {}
        self.evaluated = 0  # evaluations run by this process (rank 0 only under torchrun)

    def __bool__(self) -> bool:
        return bool(self.sets)

    def evaluate(self, model: Any, step: int) -> dict[str, float]:
        """``{<name>_accuracy, <name>_accuracy_std}`` of every set for ``model`` at ``step``."""
        from broadface.data.pipeline import Preprocessing
        from broadface.eval.verification import evaluate_pairs
        from broadface.train.rng import forked_rngs

        out: dict[str, float] = {}
        with forked_rngs():
            for ps in self.sets:
                r = evaluate_pairs(model, ps, folds=FOLDS, flip=self.flip, batch_size=self.batch_size,
                                   preprocessing=Preprocessing(size=self.input_size))
                out[f"{ps.name}_accuracy"], out[f"{ps.name}_accuracy_std"] = r["accuracy"], r["accuracy_std"]
                self.observe(ps.name, step, r["accuracy"])
        self.evaluated += 1
        return out

    def observe(self, name: str, step: int, accuracy: float) -> None:
        self.last[name] = {"step": step, "accuracy": accuracy}
        if name not in self.best or accuracy > self.best[name]["accuracy"]:
            self.best[name] = {"step": step, "accuracy": accuracy}

    def summary(self) -> dict[str, Any]:
        """``{name: {"best": {step, accuracy}, "last": {step, accuracy}, "pairs": n}}``."""
        return {ps.name: {"pairs": len(ps), "best": self.best.get(ps.name), "last": self.last.get(ps.name)}
                for ps in self.sets}
