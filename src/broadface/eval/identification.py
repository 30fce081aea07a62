"""1:N identification evaluation: CMC (closed set) and TPIR@FPIR (open set).

Either give a single labelled dataset, split into a gallery (the first
``gallery_per_class`` images of each identity, in dataset order) and probes
(the rest), or separate ``probes`` and ``gallery`` datasets (identities matched
by class name). ``distractors`` (MegaFace style) join the gallery as
non-matching items. Probes whose identity is absent from the gallery are
non-mated: CMC is computed on the mated probes, TPIR@FPIR on all.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from broadface.eval.retrieval import embed_labelled
from broadface.metrics import cmc, tpir_at_fpir
from broadface.metrics.search import Backend

__all__ = ["gallery_probe_split", "evaluate_identification"]


def gallery_probe_split(labels: Sequence, gallery_per_class: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Indices ``(gallery, probes)``: the first ``gallery_per_class`` items of each label go to the gallery."""
    if gallery_per_class < 1:
        raise ValueError(f"gallery_per_class must be >= 1, got {gallery_per_class}")
    labels = np.asarray(labels)
    _, codes = np.unique(labels, return_inverse=True)
    order = np.argsort(codes.reshape(-1), kind="stable")
    sorted_codes = codes.reshape(-1)[order]
    first = np.searchsorted(sorted_codes, sorted_codes, side="left")
    rank_in_class = np.empty(labels.size, dtype=np.int64)
    rank_in_class[order] = np.arange(labels.size) - first
    is_gallery = rank_in_class < gallery_per_class
    return np.flatnonzero(is_gallery), np.flatnonzero(~is_gallery)


def evaluate_identification(model: nn.Module, gallery: Dataset, probes: Dataset | None = None, *,
                            distractors: Dataset | None = None, ranks: Sequence[int] = (1, 5, 10),
                            fpirs: Sequence[float] = (1e-2, 1e-1), gallery_per_class: int = 1, flip: bool = True,
                            batch_size: int = 128, device: str | torch.device | None = None, num_workers: int = 0,
                            backend: Backend = "auto") -> dict[str, Any]:
    """CMC at ``ranks`` (mated probes) and, with non-mated probes, TPIR at ``fpirs`` (see module doc)."""
    kw = dict(flip=flip, batch_size=batch_size, device=device, num_workers=num_workers)
    g, gy = embed_labelled(model, gallery, **kw)
    if probes is None:
        gi, pi = gallery_probe_split(gy, gallery_per_class)
        if pi.size == 0:
            raise ValueError(f"no probes: every identity has at most {gallery_per_class} image(s)")
        p, py, g, gy = g[pi], gy[pi], g[gi], gy[gi]
    else:
        p, py = embed_labelled(model, probes, **kw)
    d = embed_labelled(model, distractors, **kw)[0] if distractors is not None else None
    mated = np.isin(py, gy)
    if not mated.any():
        raise ValueError("no probe identity appears in the gallery")
    out: dict[str, Any] = {"gallery": int(g.shape[0]), "distractors": 0 if d is None else int(d.shape[0]),
                           "probes": int(p.shape[0]), "mated_probes": int(mated.sum()), "flip": flip}
    curve = cmc(p[mated], py[mated], g, gy, ranks, distractors=d, backend=backend)
    out.update({f"rank{r}": v for r, v in curve.items()})
    out["cmc"] = {int(r): v for r, v in curve.items()}
    if not mated.all():
        open_set = tpir_at_fpir(p, py, g, gy, fpirs, distractors=d, backend=backend)
        out["tpir_at_fpir"] = open_set.to_dict()
    return out
