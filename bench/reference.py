"""Straightforward re-implementations of the published evaluation code paths: the baseline of
``bench/eval.py`` and the independent reference of the metric tests (``from bench.reference import ...``).

Written loop-by-loop after insightface's ``eval/verification.py`` and ``eval_ijbc.py``
(sklearn KFold, per-threshold counting, sklearn ``roc_curve``), independent of
``broadface.metrics``. scipy >= 1.9 rejects the duplicate FAR values that
insightface passes to ``interp1d(kind="slinear")``; the versions insightface ran
on built the order-1 B-spline on knots ``[x0, x..., xn]`` without that check, which
``BSpline.construct_fast`` reproduces here.
"""
from __future__ import annotations

import numpy as np
from scipy.interpolate import BSpline
from sklearn.metrics import roc_curve
from sklearn.model_selection import KFold


def old_scipy_slinear(x: np.ndarray, y: np.ndarray, at: float) -> float:
    order = np.argsort(x, kind="mergesort")
    xs, ys = x[order].astype(float), y[order].astype(float)
    return float(BSpline.construct_fast(np.r_[xs[0], xs, xs[-1]], ys, 1)(at))


def _accuracy(threshold, dist, same):
    predict = np.less(dist, threshold)
    tp = np.sum(predict & same)
    fp = np.sum(predict & ~same)
    tn = np.sum(~predict & ~same)
    return float(tp + tn) / dist.size


def _val_far(threshold, dist, same):
    predict = np.less(dist, threshold)
    return np.sum(predict & same) / np.sum(same), np.sum(predict & ~same) / np.sum(~same)


def insightface_kfold(dist: np.ndarray, same: np.ndarray, folds: int = 10, far_target: float = 1e-3) -> dict:
    """Accuracy mean/std, per-fold thresholds, VAL mean/std, FAR mean: insightface's evaluate()."""
    thresholds = np.arange(0, 4, 0.01)
    kfold = KFold(n_splits=folds, shuffle=False)
    idx = np.arange(dist.size)
    acc, best = [], []
    for train, test in kfold.split(idx):
        acc_train = np.array([_accuracy(t, dist[train], same[train]) for t in thresholds])
        b = thresholds[np.argmax(acc_train)]
        best.append(b)
        acc.append(_accuracy(b, dist[test], same[test]))
    thresholds = np.arange(0, 4, 0.001)
    val, far = [], []
    for train, test in kfold.split(idx):
        far_train = np.array([_val_far(t, dist[train], same[train])[1] for t in thresholds])
        t = old_scipy_slinear(far_train, thresholds, far_target) if far_train.max() >= far_target else 0.0
        v, f = _val_far(t, dist[test], same[test])
        val.append(v)
        far.append(f)
    return {"accuracy": np.mean(acc), "accuracy_std": np.std(acc), "thresholds": np.array(best),
            "val": np.mean(val), "val_std": np.std(val), "far": np.mean(far)}


def insightface_tar_at_far(scores: np.ndarray, same: np.ndarray, fars) -> np.ndarray:
    """eval_ijbc.py's table: flipped sklearn ROC, min over (|fpr - far|, index)."""
    fpr, tpr, _ = roc_curve(same, scores)
    fpr, tpr = np.flipud(fpr), np.flipud(tpr)
    out = []
    for x in fars:
        _, i = min(zip(abs(fpr - x), range(len(fpr))))
        out.append(tpr[i])
    return np.array(out)


def strict_tar_at_far(scores: np.ndarray, same: np.ndarray, fars) -> np.ndarray:
    fpr, tpr, _ = roc_curve(same, scores, drop_intermediate=False)
    return np.array([tpr[fpr <= x].max() for x in fars])


def insightface_templates(img_feats: np.ndarray, templates: np.ndarray, medias: np.ndarray):
    """image2template_feature(): per template, mean per media, sum over media, L2 normalise."""
    unique_templates = np.unique(templates)
    out = np.zeros((len(unique_templates), img_feats.shape[1]))
    for c, t in enumerate(unique_templates):
        (ind_t,) = np.where(templates == t)
        feats, meds = img_feats[ind_t], medias[ind_t]
        media_feats = []
        for u in np.unique(meds):
            (ind_m,) = np.where(meds == u)
            media_feats.append(feats[ind_m].mean(0) if ind_m.size > 1 else feats[ind_m][0])
        out[c] = np.sum(media_feats, axis=0)
    return out / np.linalg.norm(out, axis=1, keepdims=True), unique_templates


def insightface_1n(probe_feats: np.ndarray, gallery_feats: np.ndarray, mask: list[int], fars=(0.01, 0.1)) -> dict:
    """ijb_1n.py's evaluation(): top-1/5/10 from a full argsort per probe, and for each FAR the threshold
    at the ceil(probes * far)-th largest non-mate similarity (heapq), TPIR = share of mate scores above it."""
    import heapq
    import math

    q = probe_feats.shape[0]
    sim = probe_feats @ gallery_feats.T
    order = np.argsort(-sim, axis=1)
    out = {f"rank{k}": sum(mask[i] in order[i, :k] for i in range(q)) / q for k in (1, 5, 10)}
    top = sim.copy()
    pos = []
    for i in range(q):
        pos.append(top[i, mask[i]])
        top[i, mask[i]] = -2.0
    pos = np.array(pos)
    need = [math.ceil(q * far) for far in fars]
    neg = heapq.nlargest(max(need), top[np.where(top > -2.0)])
    out["tpir"] = [float(np.sum(pos > neg[k - 1]) / q) for k in need]
    return out
