"""Input checks shared by the metrics: numpy or torch in, validated numpy out."""
from __future__ import annotations

from typing import Any

import numpy as np


def to_numpy(x: Any, name: str, dtype: Any = None) -> np.ndarray:
    """numpy/torch/list -> numpy (detached, on CPU)."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # torch.Tensor without importing torch
        x = x.detach().cpu().numpy()
    try:
        arr = np.asarray(x) if dtype is None else np.asarray(x, dtype=dtype)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name}: cannot convert to an array ({err})") from None
    return arr


def scores_labels(scores: Any, issame: Any) -> tuple[np.ndarray, np.ndarray]:
    """Validate a 1-D finite score array and a same-length boolean label array."""
    s = to_numpy(scores, "scores")
    y = to_numpy(issame, "issame")
    if s.ndim != 1 or y.ndim != 1:
        raise ValueError(f"scores and issame must be 1-D, got shapes {s.shape} and {y.shape}")
    if s.shape != y.shape:
        raise ValueError(f"scores ({s.shape[0]}) and issame ({y.shape[0]}) differ in length")
    if s.size == 0:
        raise ValueError("scores is empty")
    if not np.issubdtype(s.dtype, np.floating):
        s = s.astype(np.float64)
    if not np.isfinite(s).all():
        raise ValueError(f"scores holds {int((~np.isfinite(s)).sum())} non-finite value(s) (NaN/inf)")
    if y.dtype != bool:
        if not np.isin(y, (0, 1)).all():
            raise ValueError("issame must be boolean or 0/1")
        y = y.astype(bool)
    return s, y


def embeddings(x: Any, name: str) -> np.ndarray:
    """2-D finite float32 embedding matrix, L2-normalised row-wise (cosine = inner product)."""
    e = to_numpy(x, name, np.float32)
    if e.ndim != 2 or e.shape[0] == 0 or e.shape[1] == 0:
        raise ValueError(f"{name} must be a non-empty N x D array, got shape {e.shape}")
    if not np.isfinite(e).all():
        raise ValueError(f"{name} holds non-finite values (NaN/inf)")
    norms = np.linalg.norm(e, axis=1, keepdims=True)
    if (norms == 0).any():
        raise ValueError(f"{name} has {int((norms == 0).sum())} all-zero row(s); cannot normalise")
    return np.ascontiguousarray(e / norms, dtype=np.float32)


def labels(x: Any, n: int, name: str) -> np.ndarray:
    """1-D label array of length ``n``."""
    y = to_numpy(x, name)
    if y.ndim != 1 or y.shape[0] != n:
        raise ValueError(f"{name} must be 1-D with {n} entries (one per embedding), got shape {y.shape}")
    return y
