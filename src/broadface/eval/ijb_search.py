"""IJB-B / IJB-C 1:N identification (mixed-media probes searched against gallery templates).

Meta files and features are :mod:`broadface.eval.ijb` (the same images, alignment and F2 / N1 /
D1 features as 1:1). Gallery templates come from ``<name>_1N_gallery_G1.csv`` and ``_G2.csv``
(IJB-B: ``_S1`` / ``_S2``), probe templates from ``<name>_1N_probe_mixed.csv``; a template's
feature aggregates every image of that template id in ``face_tid_mid`` (mean per media, sum
over media, L2). Three searches are reported:

* ``G1`` and ``G2`` -- the IJB-C open-set protocol: every probe searches one gallery; probes of
  subjects enrolled in the other gallery are non-mated. CMC rank-1/5/10 on the mated probes,
  TPIR at FPIR 1e-2 / 1e-1 by the NIST rule (:func:`broadface.metrics.tpir_at_fpir`).
* ``G1+G2`` -- insightface's ``ijb_1n.py``: both galleries together, so every probe is mated;
  CMC rank-1/5/10 on all probes and TPIR at FPIR by insightface's rule (the threshold is the
  ``ceil(F x probes)``-th highest non-mate comparison score).
"""
from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from broadface.data.pipeline import Preprocessing
from broadface.eval.ijb import IJBMeta, ijb_image_features, read_ijb_meta, template_features
from broadface.metrics import cmc, tpir_at_fpir

__all__ = ["search_templates", "evaluate_templates_1n", "RANKS", "FPIRS"]

RANKS = (1, 5, 10)
FPIRS = (1e-2, 1e-1)


def _select(tfeat: np.ndarray, tids: np.ndarray, wanted: np.ndarray, what: str) -> np.ndarray:
    pos = np.searchsorted(tids, wanted)
    if (pos >= tids.size).any() or (tids[np.minimum(pos, tids.size - 1)] != wanted).any():
        raise ValueError(f"{what}: a listed template has no image in face_tid_mid")
    return tfeat[pos]


def _search(p, py, g, gy, ranks, fpirs, rule: str) -> dict[str, Any]:
    mated = np.isin(py, gy)
    curve = cmc(p[mated], py[mated], g, gy, ranks, backend="torch")
    out: dict[str, Any] = {"gallery": int(g.shape[0]), "probes": int(p.shape[0]), "mated_probes": int(mated.sum()),
                           **{f"rank{r}": v for r, v in curve.items()}, "cmc": {int(r): v for r, v in curve.items()}}
    if rule == "insightface" or not mated.all():
        res = tpir_at_fpir(p, py, g, gy, fpirs, backend="torch", rule=rule)  # type: ignore[arg-type]
        out.update(tpir_at_fpir=res.to_dict(), fpir_rule=rule,
                   fpir_thresholds={f"{f:.0e}": float(t) for f, t in zip(res.fpirs, res.thresholds)})
    return out


def search_templates(feats: np.ndarray, meta: IJBMeta, name: str = "IJBC", ranks: Sequence[int] = RANKS,
                     fpirs: Sequence[float] = FPIRS) -> dict[str, Any]:
    """The 1:N protocol on already computed image features: ``{"G1": ..., "G2": ..., "G1+G2": ...}`` rows."""
    if meta.search is None:
        raise FileNotFoundError(f"{name}: the 1:N protocol needs meta/{name.lower()}_1N_gallery_G1.csv, "
                                f"_G2.csv and _probe_mixed.csv")
    tfeat, tids = template_features(feats, meta.templates, meta.medias)
    sets = {k: (_select(tfeat, tids, t, f"{name} 1:N {k}"), s) for k, (t, s) in meta.search.items()}
    (g1, s1), (g2, s2), (p, ps) = sets["G1"], sets["G2"], sets["probe"]
    if np.intersect1d(s1, s2).size:
        raise ValueError(f"{name} 1:N: galleries G1 and G2 share subjects; they must be disjoint")
    both, both_s = np.concatenate([g1, g2]), np.concatenate([s1, s2])
    unknown = np.setdiff1d(ps, both_s)
    if unknown.size:
        raise ValueError(f"{name} 1:N: {unknown.size} probe subject(s) in neither gallery, e.g. {unknown[0]}")
    searches = {"G1": _search(p, ps, g1, s1, ranks, fpirs, "nist"), "G2": _search(p, ps, g2, s2, ranks, fpirs, "nist"),
                "G1+G2": _search(p, ps, both, both_s, ranks, fpirs, "insightface")}
    return {"name": name, "images": len(meta.images), "probe_templates": int(p.shape[0]), "searches": searches}


def evaluate_templates_1n(model: nn.Module, root: str | os.PathLike, name: str = "IJBC", *, flip: bool = True,
                          norm_score: bool = True, detector_score: bool = True, batch_size: int = 128,
                          device: str | torch.device | None = None, num_workers: int = 0,
                          ranks: Sequence[int] = RANKS, fpirs: Sequence[float] = FPIRS,
                          preprocessing: Preprocessing | None = None) -> dict[str, Any]:
    """Run the IJB 1:N protocol on ``root`` (see module doc)."""
    meta = read_ijb_meta(root, name)
    feats, used_detector = ijb_image_features(model, meta, flip=flip, norm_score=norm_score,
                                              detector_score=detector_score, batch_size=batch_size, device=device,
                                              num_workers=num_workers, preprocessing=preprocessing)
    return {**search_templates(feats, meta, name, ranks, fpirs), "flip": flip, "norm_score": norm_score,
            "detector_score": used_detector}
