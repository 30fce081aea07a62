"""LFW-style k-fold verification accuracy and VAL@FAR (the insightface protocol).

Protocol (insightface ``eval/verification.py``, itself from FaceNet):

* Pairs are split into ``folds`` contiguous folds exactly like
  ``sklearn.model_selection.KFold(folds, shuffle=False)`` (the first
  ``n % folds`` folds get one extra pair). With ``folds=1`` train = test = all.
* Accuracy: for each fold, the grid threshold with the best accuracy on the
  other folds (first one on ties) is applied to the held-out fold. Reported as
  mean ± std (``np.std``, ddof=0) over folds.
* VAL@FAR: on the other folds, FAR(threshold) is computed on a finer grid and
  the threshold reaching ``far_target`` is found by linear interpolation of
  threshold against FAR (``scipy.interpolate.interp1d(far, thr, kind="slinear")``,
  reproduced exactly, quirks included); if FAR never reaches the target the
  fold accepts nothing. VAL and FAR are then measured on the held-out fold.

Distances (``distance=True``, e.g. squared L2 of unit vectors, 0..4) accept a
pair when ``d < t`` on insightface's grids ``t = arange(0, 4, 0.01)`` (accuracy)
and ``arange(0, 4, 0.001)`` (VAL). Similarities (cosine, the default) accept
when ``s > t`` on the image of those grids under ``s = 1 - d / 2`` (the identity
``‖a-b‖² = 2 - 2cos`` for unit vectors), i.e. ``1, 0.995, ..., -0.995``:
the same decisions as insightface up to float rounding of ``2 - 2cos``.
Grids are ordered from strictest to most lenient, which fixes tie-breaking.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from broadface.metrics._arrays import scores_labels

__all__ = ["KFoldResult", "kfold_accuracy", "kfold_splits", "DISTANCE_GRID", "DISTANCE_VAL_GRID",
           "SIMILARITY_GRID", "SIMILARITY_VAL_GRID"]

DISTANCE_GRID = np.arange(0, 4, 0.01)
DISTANCE_VAL_GRID = np.arange(0, 4, 0.001)
SIMILARITY_GRID = 1.0 - DISTANCE_GRID / 2.0
SIMILARITY_VAL_GRID = 1.0 - DISTANCE_VAL_GRID / 2.0


@dataclass(frozen=True)
class KFoldResult:
    """Outcome of :func:`kfold_accuracy`; thresholds are in the units of the scores."""

    accuracy_mean: float
    accuracy_std: float
    thresholds: np.ndarray      # threshold chosen for each fold (accuracy)
    val: float                  # mean VAL (TAR) at far_target over folds
    val_std: float
    far: float                  # mean FAR actually reached on the held-out folds
    accuracies: np.ndarray      # per-fold held-out accuracy
    best_threshold: float       # grid threshold with the best accuracy over all pairs
    grid: np.ndarray            # the accuracy grid (strictest first)
    tpr: np.ndarray             # mean held-out TPR per grid threshold (insightface's ROC)
    fpr: np.ndarray
    far_target: float = 1e-3

    def summary(self) -> dict[str, float]:
        return {"accuracy": self.accuracy_mean, "accuracy_std": self.accuracy_std, "val": self.val,
                "val_std": self.val_std, "far": self.far, "far_target": self.far_target,
                "best_threshold": self.best_threshold}


def kfold_splits(n: int, folds: int) -> list[np.ndarray]:
    """Test indices of each fold: contiguous, as ``KFold(folds, shuffle=False)``."""
    if folds < 1:
        raise ValueError(f"folds must be >= 1, got {folds}")
    if folds > n:
        raise ValueError(f"cannot split {n} pairs into {folds} folds")
    sizes = np.full(folds, n // folds)
    sizes[: n % folds] += 1
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    return [np.arange(bounds[i], bounds[i + 1]) for i in range(folds)]


def _accepted(sorted_scores: np.ndarray, thr: np.ndarray) -> np.ndarray:
    """How many of ``sorted_scores`` are > each threshold."""
    return sorted_scores.size - np.searchsorted(sorted_scores, thr, side="right")


def _fold_counts(s: np.ndarray, y: np.ndarray, tests: list[np.ndarray], thr: np.ndarray):
    """Per fold: accepted positives / negatives at each threshold, and positives / negatives."""
    tp = np.stack([_accepted(np.sort(s[t][y[t]]), thr) for t in tests])
    fp = np.stack([_accepted(np.sort(s[t][~y[t]]), thr) for t in tests])
    pos = np.array([int(y[t].sum()) for t in tests])
    neg = np.array([t.size for t in tests]) - pos
    return tp, fp, pos, neg


def _safe_div(a: np.ndarray, b: np.ndarray | int, empty: float) -> np.ndarray:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(b == 0, empty, a / np.where(b == 0, 1.0, b))


def _interp_slinear(far: np.ndarray, grid: np.ndarray, target: float) -> float | None:
    """``interp1d(far, grid, kind="slinear")(target)`` as scipy evaluates it.

    Points are stably sorted by FAR; the interval is the last one whose left knot
    is <= target. A zero-width last interval (target == max FAR, repeated) makes
    scipy's order-1 B-spline return 0, i.e. distance 0 = accept nothing: None here.
    """
    order = np.argsort(far, kind="mergesort")
    x, y = far[order], grid[order]
    i = int(np.searchsorted(x, target, side="right")) - 1
    i = min(max(i, 0), x.size - 2)
    xa, xb = x[i], x[i + 1]
    if xb == xa:
        return None
    w = 1.0 / (xb - xa)
    return float(y[i] * (w * (xb - target)) + y[i + 1] * (w * (target - xa)))


def kfold_accuracy(scores: Any, issame: Any, folds: int = 10, *, distance: bool = False,
                   thresholds: Any = None, val_thresholds: Any = None, far_target: float = 1e-3) -> KFoldResult:
    """k-fold verification accuracy ± std and VAL@FAR on pair ``scores`` (see module doc).

    ``scores``: cosine similarities (higher = same), or distances if ``distance``.
    ``thresholds`` / ``val_thresholds`` override the grids (same units as scores).
    """
    s, y = scores_labels(scores, issame)
    grid = np.asarray(thresholds if thresholds is not None else
                      (DISTANCE_GRID if distance else SIMILARITY_GRID), dtype=np.float64)
    vgrid = np.asarray(val_thresholds if val_thresholds is not None else
                       (DISTANCE_VAL_GRID if distance else SIMILARITY_VAL_GRID), dtype=np.float64)
    if grid.ndim != 1 or grid.size == 0 or vgrid.ndim != 1 or vgrid.size < 2:
        raise ValueError("thresholds must be a non-empty 1-D grid (val_thresholds: at least 2 values)")
    sign = -1.0 if distance else 1.0           # internal convention: accept when sign*score > sign*thr
    s_int = sign * s.astype(np.float64)
    tests = kfold_splits(s.size, folds)
    n_fold = np.array([t.size for t in tests])

    # --- accuracy: threshold picked on the other folds, applied to the held-out one.
    tp, fp, pos, neg = _fold_counts(s_int, y, tests, sign * grid)
    single = folds == 1
    tp_tr, fp_tr = (tp, fp) if single else (tp.sum(0) - tp, fp.sum(0) - fp)
    neg_tr, n_tr = (neg, n_fold) if single else (neg.sum() - neg, s.size - n_fold)
    acc_train = (tp_tr + (neg_tr[:, None] - fp_tr)) / n_tr[:, None]
    best = np.argmax(acc_train, axis=1)
    rows = np.arange(folds)
    accuracies = (tp[rows, best] + neg - fp[rows, best]) / n_fold
    tpr = _safe_div(tp, pos[:, None], 0.0).mean(0)
    fpr = _safe_div(fp, neg[:, None], 0.0).mean(0)
    acc_all = (tp.sum(0) + neg.sum() - fp.sum(0)) / s.size

    # --- VAL@FAR: threshold interpolated on the other folds' FAR curve.
    _, vfp, vpos, vneg = _fold_counts(s_int, y, tests, sign * vgrid)
    vfp_tr, vneg_tr = (vfp, vneg) if single else (vfp.sum(0) - vfp, vneg.sum() - vneg)
    vals, fars = np.empty(folds), np.empty(folds)
    for f, t in enumerate(tests):
        far_train = _safe_div(vfp_tr[f], vneg_tr[f], np.nan)
        thr = None
        if np.nanmax(far_train, initial=-np.inf) >= far_target:
            thr = _interp_slinear(far_train, vgrid, far_target)
        if thr is None:  # insightface falls back to distance 0: accept nothing
            thr = 0.0 if distance else np.inf
        accepted = s_int[t] > sign * thr
        yt = y[t]
        vals[f] = _safe_div(np.sum(accepted & yt), vpos[f], np.nan)
        fars[f] = _safe_div(np.sum(accepted & ~yt), vneg[f], np.nan)

    return KFoldResult(
        accuracy_mean=float(np.mean(accuracies)), accuracy_std=float(np.std(accuracies)),
        thresholds=grid[best], val=float(np.mean(vals)), val_std=float(np.std(vals)), far=float(np.mean(fars)),
        accuracies=accuracies, best_threshold=float(grid[int(np.argmax(acc_all))]), grid=grid, tpr=tpr, fpr=fpr,
        far_target=float(far_target),
    )

