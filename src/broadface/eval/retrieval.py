"""Retrieval evaluation of a model on a labelled dataset: Recall@K and MAP@R.

Self-retrieval (SOP / CUB / CelebA-299 protocol): every image queries all the
others. Query-vs-gallery (In-Shop): pass ``gallery``; identities are matched by
class *name* when the datasets have ``classes`` (separate folders number their
classes independently), else by label.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from broadface.models.embed import embed_dataset
from broadface.metrics import map_at_r, recall_at_k
from broadface.metrics.search import Backend

__all__ = ["evaluate_retrieval", "embed_labelled"]


def embed_labelled(model: nn.Module, dataset: Dataset, *, flip: bool = True, batch_size: int = 128,
                   device: str | torch.device | None = None, num_workers: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Embeddings and identity keys (class names when ``dataset.classes`` exists, else labels)."""
    emb, labels = embed_dataset(model, dataset, batch_size=batch_size, flip=flip, device=device,
                                num_workers=num_workers, return_labels=True)
    classes = getattr(dataset, "classes", None)
    if classes is not None:
        labels = np.asarray(classes, dtype=object)[labels.astype(np.int64)].astype(str)
    return emb, labels


def evaluate_retrieval(model: nn.Module, dataset: Dataset, *, gallery: Dataset | None = None,
                       ks: Sequence[int] = (1, 2, 4, 8), flip: bool = True, batch_size: int = 128,
                       device: str | torch.device | None = None, num_workers: int = 0,
                       backend: Backend = "auto") -> dict[str, Any]:
    """``{"recall@1": ..., "map@r": ..., "queries": n, ...}`` for ``dataset`` (see module doc)."""
    kw = dict(flip=flip, batch_size=batch_size, device=device, num_workers=num_workers)
    q, qy = embed_labelled(model, dataset, **kw)
    g, gy = embed_labelled(model, gallery, **kw) if gallery is not None else (None, None)
    recall = recall_at_k(q, qy, ks, gallery=g, gallery_labels=gy, backend=backend)
    out: dict[str, Any] = {"queries": int(q.shape[0]), "gallery": int(q.shape[0] if g is None else g.shape[0]),
                           "identities": int(np.unique(qy).size), "flip": flip}
    out.update({f"recall@{k}": v for k, v in recall.items()})
    out["map@r"] = map_at_r(q, qy, gallery=g, gallery_labels=gy, backend=backend)
    return out
