"""ROC curve and TAR@FAR for 1:1 verification scores (higher score = more likely same).

``roc`` returns exactly what ``sklearn.metrics.roc_curve`` returns: one point per
distinct score (ties collapsed), a leading ``(0, 0)`` point with threshold
``inf``, and with ``drop_intermediate`` the collinear points removed by
sklearn's rule (a point is dropped when both its FP and TP second differences
are zero).

``tar_at_far`` reads TAR (= TPR) off that ROC at each target FAR (= FPR):

* ``rule="nearest"`` — the insightface IJB-B/C rule (``eval_ijbc.py``): on
  ``roc_curve(label, score)`` (``drop_intermediate=True``) take the point whose
  FPR is nearest the target, ``argmin |fpr - far|``, the later point winning
  ties (insightface flips the curve before its ``min``). Use it to reproduce
  published IJB numbers; the point may lie *above* the target FAR.
* ``rule="strict"`` — the largest TPR among all ROC points with FPR <= far.

Scores are sorted once per class (no index arrays); counts live in int32 when
they fit, so 15.6M IJB-C pairs take a few seconds and ~30 bytes per pair.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Sequence

import numpy as np

from broadface.metrics._arrays import scores_labels

__all__ = ["roc", "tar_at_far", "OperatingPoints", "DEFAULT_FARS"]

DEFAULT_FARS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
Rule = Literal["nearest", "strict"]


@dataclass(frozen=True)
class OperatingPoints:
    """TAR at each target FAR, with the ROC point used (threshold: accept if score >= it)."""

    fars: np.ndarray           # targets
    tars: np.ndarray
    thresholds: np.ndarray
    achieved_fars: np.ndarray  # FPR of the chosen ROC point
    rule: str

    def to_dict(self) -> dict[str, float]:
        """``{"1e-04": tar, ...}``, ready for JSON."""
        return {f"{f:.0e}": float(t) for f, t in zip(self.fars, self.tars)}


@dataclass(frozen=True)
class _Curve:
    """Full ROC in counts: index 0 is the (0, 0) point, index i>0 the i-th distinct score, descending."""

    fps: np.ndarray
    tps: np.ndarray
    thresholds: np.ndarray
    n_pos: int
    n_neg: int


def _curve(scores: Any, issame: Any) -> _Curve:
    s, y = scores_labels(scores, issame)
    pos, neg = np.sort(s[y]), np.sort(s[~y])
    if pos.size == 0 or neg.size == 0:
        raise ValueError(f"ROC needs both classes, got {pos.size} genuine and {neg.size} impostor pairs")
    merged = np.concatenate([pos, neg])
    merged.sort(kind="stable")                       # two sorted runs: a linear merge
    last = np.empty(merged.size, dtype=bool)
    np.not_equal(merged[1:], merged[:-1], out=last[:-1])
    last[-1] = True
    values = merged[last]                            # distinct scores, ascending
    del merged, last
    itype = np.int32 if s.size < 2**31 - 1 else np.int64
    tps = np.empty(values.size + 1, dtype=itype)
    fps = np.empty(values.size + 1, dtype=itype)
    tps[0] = fps[0] = 0
    # counts of scores >= each value, listed for descending values
    tps[1:] = (pos.size - np.searchsorted(pos, values, side="left"))[::-1]
    fps[1:] = (neg.size - np.searchsorted(neg, values, side="left"))[::-1]
    thresholds = np.concatenate([[np.inf], values[::-1].astype(np.float64)])
    return _Curve(fps, tps, thresholds, int(pos.size), int(neg.size))


def _kept(c: _Curve, lo: int, hi: int) -> np.ndarray:
    """sklearn's drop_intermediate mask for curve indices [lo, hi): the (0, 0) point, the first and last
    score points and every point where the FP or TP count has a non-zero second difference."""
    m = c.fps.size - 1                               # sklearn points are indices 1..m
    idx = np.arange(lo, hi)
    keep = (idx <= 1) | (idx == m)
    inner = (idx >= 2) & (idx < m)
    if inner.any() and m > 2:
        j = idx[inner]
        f = [c.fps[j + o].astype(np.int64) for o in (-1, 0, 1)]
        t = [c.tps[j + o].astype(np.int64) for o in (-1, 0, 1)]
        d2f = f[2] - 2 * f[1] + f[0]
        d2t = t[2] - 2 * t[1] + t[0]
        keep[inner] = (d2f != 0) | (d2t != 0)
    return keep


def roc(scores: Any, issame: Any, drop_intermediate: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(fpr, tpr, thresholds)`` identical to ``sklearn.metrics.roc_curve(issame, scores)``."""
    c = _curve(scores, issame)
    keep = _kept(c, 0, c.fps.size) if drop_intermediate else slice(None)
    return c.fps[keep] / c.n_neg, c.tps[keep] / c.n_pos, c.thresholds[keep]


def _last_kept(c: _Curve, start: int, step: int) -> int | None:
    """Nearest index to ``start`` (inclusive) kept by drop_intermediate, walking by ``step`` (+1/-1)."""
    end = c.fps.size if step > 0 else -1
    block = 1024
    i = start
    while (step > 0 and i < end) or (step < 0 and i > end):
        lo, hi = (i, min(i + block, end)) if step > 0 else (max(i - block + 1, 0), i + 1)
        kept = np.flatnonzero(_kept(c, lo, hi))
        if kept.size:
            return int(lo + (kept[0] if step > 0 else kept[-1]))
        i = hi if step > 0 else lo - 1
        block *= 2
    return None


def _max_count(far: float, n: int) -> int:
    """Largest false-accept count k with k / n <= far (in float64, as the ROC divides)."""
    k = int(np.floor(far * n))
    while k + 1 <= n and (k + 1) / n <= far:
        k += 1
    while k >= 0 and k / n > far:
        k -= 1
    return k


def tar_at_far(scores: Any, issame: Any, fars: Sequence[float] = DEFAULT_FARS,
               rule: Rule = "nearest") -> OperatingPoints:
    """TAR at each target FAR from the ROC of ``scores`` (see module doc for the two rules)."""
    if rule not in ("nearest", "strict"):
        raise ValueError(f"rule must be 'nearest' (insightface IJB) or 'strict' (FPR <= target), got {rule!r}")
    fars_arr = np.asarray(fars, dtype=np.float64).reshape(-1)
    if fars_arr.size == 0 or not np.all((fars_arr >= 0) & (fars_arr <= 1)):
        raise ValueError(f"fars must be values in [0, 1], got {list(fars)}")
    c = _curve(scores, issame)
    chosen = np.empty(fars_arr.size, dtype=np.int64)
    for i, far in enumerate(fars_arr):
        k = _max_count(float(far), c.n_neg)
        j = int(np.searchsorted(c.fps, k, side="right")) - 1      # last point with FPR <= far
        if rule == "strict":
            chosen[i] = j
            continue
        a = _last_kept(c, j, -1)                                   # always found: index 0 is kept
        b = _last_kept(c, j + 1, +1)
        if b is None:
            chosen[i] = a
            continue
        b = int(np.searchsorted(c.fps, c.fps[b], side="right")) - 1  # top of its vertical run (kept)
        da = abs(c.fps[a] / c.n_neg - far)
        db = abs(c.fps[b] / c.n_neg - far)
        chosen[i] = b if db <= da else a
    return OperatingPoints(fars=fars_arr, tars=c.tps[chosen] / c.n_pos, thresholds=c.thresholds[chosen],
                           achieved_fars=c.fps[chosen] / c.n_neg, rule=rule)
