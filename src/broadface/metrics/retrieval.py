"""Retrieval metrics for deep metric learning: Recall@K and MAP@R.

Similarity is cosine (embeddings are L2-normalised here). Two settings:

* self-retrieval (SOP, CUB-200, Cars-196; ``gallery=None``): every item queries
  all *other* items (``exclude_self=True``);
* query vs gallery (In-Shop; pass ``gallery`` and ``gallery_labels``).

Recall@K (Song et al. 2016 protocol): fraction of queries with at least one
same-label item among their K nearest neighbours; queries without any
relevant item count as misses. MAP@R (Musgrave et al., "A Metric Learning
Reality Check", 2020): with R = number of relevant items of the query,
``AP@R = (1/R) * sum_{i<=R} P@i * rel(i)`` over the R nearest neighbours,
averaged over queries with R > 0 (as pytorch-metric-learning). Neighbours come
from the exact chunked search in :mod:`broadface.metrics.search`.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from broadface.metrics import _arrays
from broadface.metrics.search import Backend, knn

__all__ = ["recall_at_k", "map_at_r", "encode_labels"]


def encode_labels(*label_arrays: np.ndarray) -> list[np.ndarray]:
    """Map labels of any type (ints, strings) to shared int codes >= 0."""
    sizes = [a.shape[0] for a in label_arrays]
    try:
        _, codes = np.unique(np.concatenate(label_arrays), return_inverse=True)
    except TypeError as err:
        raise ValueError(f"labels must be comparable values (ints or strings): {err}") from None
    return np.split(codes.reshape(-1).astype(np.int64), np.cumsum(sizes)[:-1])


def _setup(emb: Any, labels: Any, gallery: Any, gallery_labels: Any, exclude_self: bool | None):
    q = _arrays.embeddings(emb, "emb")
    qy = _arrays.labels(labels, q.shape[0], "labels")
    if (gallery is None) != (gallery_labels is None):
        raise ValueError("pass both gallery and gallery_labels, or neither (self-retrieval)")
    if gallery is None:
        g, gy = q, qy
        exclude_self = True if exclude_self is None else exclude_self
    else:
        g = _arrays.embeddings(gallery, "gallery")
        gy = _arrays.labels(gallery_labels, g.shape[0], "gallery_labels")
        if exclude_self and g.shape[0] != q.shape[0]:
            raise ValueError("exclude_self needs the gallery to be the query set itself (same length)")
        exclude_self = bool(exclude_self)
    qc, gc = encode_labels(qy, gy)
    return q, qc, g, gc, exclude_self


def _check_ks(ks: Sequence[int], name: str) -> list[int]:
    ks = [int(k) for k in ks]
    if not ks or min(ks) < 1:
        raise ValueError(f"{name} must be positive integers, got {ks}")
    return ks


def recall_at_k(emb: Any, labels: Any, ks: Sequence[int] = (1, 2, 4, 8), *, gallery: Any = None,
                gallery_labels: Any = None, exclude_self: bool | None = None, backend: Backend = "auto",
                chunk: int = 1024) -> dict[int, float]:
    """``{k: Recall@k}``; self-retrieval unless ``gallery`` is given (see module doc)."""
    ks = _check_ks(ks, "ks")
    q, qc, g, gc, excl = _setup(emb, labels, gallery, gallery_labels, exclude_self)
    nb = knn(q, [g], max(ks), exclude_self=excl, backend=backend, chunk=chunk)
    hit = (gc[nb.indices] == qc[:, None]) & (nb.indices >= 0)
    first = np.where(hit.any(1), hit.argmax(1), hit.shape[1])  # 0-based rank of first relevant item
    return {k: float(np.mean(first < k)) for k in ks}


def map_at_r(emb: Any, labels: Any, *, gallery: Any = None, gallery_labels: Any = None,
             exclude_self: bool | None = None, backend: Backend = "auto", chunk: int = 1024) -> float:
    """MAP@R (Musgrave et al. 2020); self-retrieval unless ``gallery`` is given."""
    q, qc, g, gc, excl = _setup(emb, labels, gallery, gallery_labels, exclude_self)
    counts = np.bincount(gc, minlength=int(max(qc.max(), gc.max())) + 1)
    r = counts[qc] - (1 if excl else 0)
    valid = r > 0
    if not valid.any():
        raise ValueError("MAP@R: no query has a relevant item in the gallery")
    k = int(r.max())
    if excl:  # self-exclusion is by row number, so search with every query
        nb_idx = knn(q, [g], k, exclude_self=True, backend=backend, chunk=chunk).indices[valid]
    else:
        nb_idx = knn(q[valid], [g], k, backend=backend, chunk=chunk).indices
    qv, rv = qc[valid], r[valid]
    pos = np.arange(1, k + 1)
    rel = (gc[nb_idx] == qv[:, None]) & (nb_idx >= 0) & (pos[None, :] <= rv[:, None])
    precision = np.cumsum(rel, axis=1) / pos
    ap = (precision * rel).sum(1) / rv
    return float(ap.mean())
