"""Exact k-nearest-neighbour search by cosine similarity, chunked, on torch or faiss.

Every identification / retrieval metric reduces to "the k most similar gallery
items of each query". Queries are processed ``chunk`` rows at a time against
gallery blocks, keeping a running top-k, so a 60k x 60k search never
materialises the full similarity matrix (peak ~ chunk x 65536 floats).

``backend="faiss"`` uses ``faiss.IndexFlatIP`` (exact inner product, CPU);
``"auto"`` picks faiss when it is installed and the gallery holds at least
``FAISS_MIN_GALLERY`` items, torch otherwise. Both are exact; they can order
exact ties differently (arithmetic differs in the last float bit).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import numpy as np
import torch

__all__ = ["knn", "Neighbours", "faiss_available", "Backend", "FAISS_MIN_GALLERY"]

Backend = Literal["auto", "torch", "faiss"]
FAISS_MIN_GALLERY = 20_000
_GALLERY_BLOCK = 65536


@dataclass(frozen=True)
class Neighbours:
    """Top-k per query, most similar first; index -1 / score -inf where fewer than k exist."""

    scores: np.ndarray   # n x k float32
    indices: np.ndarray  # n x k int64, into the concatenation of the gallery parts


def faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def _resolve(backend: str, gallery_size: int) -> str:
    if backend not in ("auto", "torch", "faiss"):
        raise ValueError(f"backend must be 'auto', 'torch' or 'faiss', got {backend!r}")
    if backend == "faiss" and not faiss_available():
        raise ValueError("backend='faiss' needs faiss-cpu (pip install 'broadface[search]')")
    if backend == "auto":
        return "faiss" if gallery_size >= FAISS_MIN_GALLERY and faiss_available() else "torch"
    return backend


def _knn_torch(queries: np.ndarray, parts: Sequence[np.ndarray], k: int, exclude_self: bool,
               chunk: int) -> tuple[np.ndarray, np.ndarray]:
    n = queries.shape[0]
    out_s = np.empty((n, k), dtype=np.float32)
    out_i = np.empty((n, k), dtype=np.int64)
    blocks, offset = [], 0
    for part in parts:
        for start in range(0, part.shape[0], _GALLERY_BLOCK):
            blocks.append((offset + start, torch.from_numpy(part[start:start + _GALLERY_BLOCK])))
        offset += part.shape[0]
    with torch.inference_mode():
        for q0 in range(0, n, chunk):
            q = torch.from_numpy(queries[q0:q0 + chunk])
            rows = torch.arange(q0, q0 + q.shape[0])
            best_s = torch.full((q.shape[0], k), -torch.inf)
            best_i = torch.full((q.shape[0], k), -1, dtype=torch.int64)
            for g0, g in blocks:
                sim = q @ g.T
                if exclude_self:
                    local = rows - g0
                    hit = (local >= 0) & (local < g.shape[0])
                    sim[hit.nonzero().squeeze(1), local[hit]] = -torch.inf
                s, i = sim.topk(min(k, sim.shape[1]), dim=1)
                best_s, pick = torch.cat([best_s, s], 1).topk(k, dim=1)
                best_i = torch.cat([best_i, i + g0], 1).gather(1, pick)
            out_s[q0:q0 + q.shape[0]] = best_s.numpy()
            out_i[q0:q0 + q.shape[0]] = best_i.numpy()
    return out_s, out_i


def _knn_faiss(queries: np.ndarray, parts: Sequence[np.ndarray], k: int, exclude_self: bool,
               chunk: int) -> tuple[np.ndarray, np.ndarray]:
    import faiss

    index = faiss.IndexFlatIP(queries.shape[1])
    for part in parts:
        index.add(part)
    extra = 1 if exclude_self else 0
    kk = min(k + extra, index.ntotal)
    n = queries.shape[0]
    out_s = np.full((n, k), -np.inf, dtype=np.float32)
    out_i = np.full((n, k), -1, dtype=np.int64)
    for q0 in range(0, n, chunk):
        s, i = index.search(queries[q0:q0 + chunk], kk)
        if exclude_self:
            rows = np.arange(q0, q0 + s.shape[0])[:, None]
            self_hit = i == rows
            # drop the query itself if returned, else the (k+1)-th neighbour
            drop = np.where(self_hit.any(1), self_hit.argmax(1), kk - 1)
            keep = np.ones_like(self_hit)
            keep[np.arange(s.shape[0]), drop] = False
            s = s[keep].reshape(s.shape[0], kk - 1)
            i = i[keep].reshape(i.shape[0], kk - 1)
        m = min(k, s.shape[1])
        out_s[q0:q0 + s.shape[0], :m] = s[:, :m]
        out_i[q0:q0 + s.shape[0], :m] = i[:, :m]
    return out_s, out_i


def knn(queries: np.ndarray, gallery_parts: Sequence[np.ndarray], k: int, *, exclude_self: bool = False,
        backend: Backend = "auto", chunk: int = 1024) -> Neighbours:
    """Top-``k`` cosine neighbours of each L2-normalised query among the concatenated gallery parts.

    ``exclude_self``: query ``i`` is gallery item ``i`` (self-retrieval) and is skipped.
    Inputs must be float32, C-contiguous and already L2-normalised.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    size = sum(p.shape[0] for p in gallery_parts)
    if size == 0:
        raise ValueError("the gallery is empty")
    for p in gallery_parts:
        if p.shape[1] != queries.shape[1]:
            raise ValueError(f"embedding sizes differ: queries {queries.shape[1]}, gallery {p.shape[1]}")
    fn = _knn_faiss if _resolve(backend, size) == "faiss" else _knn_torch
    s, i = fn(queries, gallery_parts, k, exclude_self, chunk)
    i[~np.isfinite(s)] = -1
    return Neighbours(scores=s, indices=i)
