"""1:N identification: closed-set CMC and open-set TPIR@FPIR.

Gallery items carry identity labels; ``distractors`` (MegaFace style) are extra
gallery items belonging to no probe identity. Similarity is cosine.

* CMC (closed set): ``cmc[r]`` = fraction of probes with a same-identity
  gallery item among their r most similar gallery items (rank-r accuracy).
  Every probe must have a mate in the gallery.
* TPIR@FPIR (open set, NIST FRVT / IJB-C 1:N, ``rule="nist"``): probes whose
  identity is not in the gallery are *non-mated*. At threshold t, FPIR(t) =
  fraction of non-mated probes whose best gallery score exceeds t; TPIR(t) =
  fraction of mated probes whose mate is within ``rank`` and scores above t. For
  each target FPIR the threshold is the lowest one with FPIR <= target (strict,
  no interpolation).
* ``rule="insightface"`` (insightface ``ijb_1n.py``, every probe mated): the
  threshold is the ``ceil(F * n_probes)``-th highest of *all* non-mate
  comparison scores (probe x non-mated gallery item), i.e. F false alarms per
  search on average; TPIR = fraction of probes whose mate scores above it,
  whatever its rank. ``n_non_mated`` then counts comparisons, not probes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, Sequence

import numpy as np
import torch

from broadface.metrics import _arrays
from broadface.metrics.retrieval import encode_labels
from broadface.metrics.roc import _max_count
from broadface.metrics.search import Backend, knn

__all__ = ["cmc", "tpir_at_fpir", "OpenSetResult"]


@dataclass(frozen=True)
class OpenSetResult:
    fpirs: np.ndarray            # targets
    tpirs: np.ndarray
    thresholds: np.ndarray       # accept a search result when its score > threshold
    achieved_fpirs: np.ndarray
    rank: int
    n_mated: int
    n_non_mated: int

    def to_dict(self) -> dict[str, float]:
        return {f"{f:.0e}": float(t) for f, t in zip(self.fpirs, self.tpirs)}


def _prepare(probe_emb, probe_labels, gallery_emb, gallery_labels, distractors):
    p = _arrays.embeddings(probe_emb, "probe_emb")
    py = _arrays.labels(probe_labels, p.shape[0], "probe_labels")
    g = _arrays.embeddings(gallery_emb, "gallery_emb")
    gy = _arrays.labels(gallery_labels, g.shape[0], "gallery_labels")
    pc, gc = encode_labels(py, gy)
    parts = [g]
    if distractors is not None:
        d = _arrays.embeddings(distractors, "distractors")
        parts.append(d)
        gc = np.concatenate([gc, np.full(d.shape[0], -1, dtype=np.int64)])  # never a mate
    mated = np.isin(pc, gc)
    return p, pc, parts, gc, mated


def _mate_hits(p, pc, parts, gc, k, backend, chunk):
    nb = knn(p, parts, k, backend=backend, chunk=chunk)
    hit = (gc[nb.indices] == pc[:, None]) & (nb.indices >= 0)
    return nb, hit


def cmc(probe_emb: Any, probe_labels: Any, gallery_emb: Any, gallery_labels: Any,
        ranks: Sequence[int] = (1, 5, 10), distractors: Any = None, *, backend: Backend = "auto",
        chunk: int = 1024) -> dict[int, float]:
    """Closed-set ``{rank: identification rate}`` (see module doc)."""
    ranks = [int(r) for r in ranks]
    if not ranks or min(ranks) < 1:
        raise ValueError(f"ranks must be positive integers, got {ranks}")
    p, pc, parts, gc, mated = _prepare(probe_emb, probe_labels, gallery_emb, gallery_labels, distractors)
    if not mated.all():
        raise ValueError(f"CMC is closed-set but {int((~mated).sum())} of {mated.size} probes have no mate "
                         "in the gallery; drop them or use tpir_at_fpir (open set)")
    _, hit = _mate_hits(p, pc, parts, gc, max(ranks), backend, chunk)
    first = np.where(hit.any(1), hit.argmax(1), hit.shape[1])
    return {r: float(np.mean(first < r)) for r in ranks}


def tpir_at_fpir(probe_emb: Any, probe_labels: Any, gallery_emb: Any, gallery_labels: Any,
                 fpirs: Sequence[float] = (1e-3, 1e-2, 1e-1), rank: int = 1, distractors: Any = None, *,
                 backend: Backend = "auto", chunk: int = 1024, rule: Literal["nist", "insightface"] = "nist"
                 ) -> OpenSetResult:
    """Open-set TPIR at each target FPIR (see module doc for both rules)."""
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    if rule not in ("nist", "insightface"):
        raise ValueError(f"rule must be 'nist' or 'insightface', got {rule!r}")
    targets = np.asarray(fpirs, dtype=np.float64).reshape(-1)
    if targets.size == 0 or not np.all((targets >= 0) & (targets <= 1)):
        raise ValueError(f"fpirs must be values in [0, 1], got {list(fpirs)}")
    p, pc, parts, gc, mated = _prepare(probe_emb, probe_labels, gallery_emb, gallery_labels, distractors)
    if rule == "insightface":
        return _tpir_all_comparisons(p, pc, np.concatenate(parts), gc, mated, targets, chunk)
    n_m, n_nm = int(mated.sum()), int((~mated).sum())
    if n_m == 0 or n_nm == 0:
        raise ValueError(f"open-set identification needs mated and non-mated probes, got {n_m} and {n_nm}")
    nb, hit = _mate_hits(p, pc, parts, gc, rank, backend, chunk)
    non_mated_top = np.sort(nb.scores[~mated, 0].astype(np.float64))[::-1]
    mate_score = np.where(hit.any(1), np.take_along_axis(nb.scores, hit.argmax(1)[:, None], 1)[:, 0], -np.inf)
    mate_score = mate_score[mated].astype(np.float64)
    thr, tpir, achieved = (np.empty(targets.size) for _ in range(3))
    for i, f in enumerate(targets):
        k = _max_count(float(f), n_nm)          # false alarms allowed
        thr[i] = non_mated_top[k] if k < n_nm else -np.inf
        tpir[i] = np.mean(mate_score > thr[i])
        achieved[i] = np.mean(non_mated_top > thr[i])
    return OpenSetResult(targets, tpir, thr, achieved, int(rank), n_m, n_nm)


def _tpir_all_comparisons(p: np.ndarray, pc: np.ndarray, g: np.ndarray, gc: np.ndarray, mated: np.ndarray,
                          targets: np.ndarray, chunk: int) -> OpenSetResult:
    """``rule="insightface"``: thresholds from the highest non-mate comparison scores over all probes."""
    if not mated.all():
        raise ValueError(f"rule='insightface' needs every probe mated; {int((~mated).sum())} of {mated.size} are not")
    n = p.shape[0]
    need = [max(1, math.ceil(float(f) * n)) for f in targets]  # false alarms allowed over all searches
    keep = max(need)
    gallery, labels = torch.from_numpy(g), torch.from_numpy(gc)
    mate = np.empty(n)
    top = torch.empty(0)
    with torch.inference_mode():
        for q0 in range(0, n, chunk):
            sim = torch.from_numpy(p[q0:q0 + chunk]) @ gallery.T
            same = torch.from_numpy(pc[q0:q0 + chunk])[:, None] == labels[None, :]
            mate[q0:q0 + sim.shape[0]] = sim.masked_fill(~same, -torch.inf).amax(1).numpy()
            flat = sim.masked_fill(same, -torch.inf).flatten()
            top = torch.cat([top, flat.topk(min(keep, flat.numel())).values])
            top = top.topk(min(keep, top.numel())).values
    top_np = top.double().numpy()
    per_label = np.bincount(gc[gc >= 0], minlength=int(pc.max()) + 1)
    n_non = n * g.shape[0] - int(per_label[pc].sum())
    thr = np.array([top_np[k - 1] if k <= top_np.size else -np.inf for k in need])
    tpir = np.array([np.mean(mate > t) for t in thr])
    achieved = np.array([np.sum(top_np > t) / n for t in thr])
    return OpenSetResult(targets, tpir, thr, achieved, 0, n, n_non)
