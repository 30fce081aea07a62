"""IJB-B / IJB-C 1:1 template verification (insightface ``eval_ijbc.py`` protocol).

Meta files, image and template features are :mod:`broadface.eval.ijb`; a pair's score is the
cosine of its two template features. TAR@FAR uses :func:`broadface.metrics.tar_at_far`
(``rule="nearest"`` reproduces insightface's table; ``"strict"`` never exceeds the FAR).
"""
from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from broadface.data.pipeline import Preprocessing
from broadface.eval.ijb import IJBMeta, ijb_image_features, read_ijb_meta, template_features
from broadface.metrics import DEFAULT_FARS, roc, tar_at_far

__all__ = ["IJBMeta", "read_ijb_meta", "template_features", "template_scores", "evaluate_templates",
           "verify_templates"]


def template_scores(tfeat: np.ndarray, template_ids: np.ndarray, pairs: np.ndarray, chunk: int = 100_000
                    ) -> np.ndarray:
    """Cosine score of each template pair (rows of ``pairs``), in chunks."""
    pos = np.searchsorted(template_ids, pairs)
    if (pos >= template_ids.size).any() or (template_ids[np.minimum(pos, template_ids.size - 1)] != pairs).any():
        raise ValueError("template_scores: a pair names a template without features")
    out = np.empty(pairs.shape[0])
    for s in range(0, pairs.shape[0], chunk):
        a, b = pos[s:s + chunk, 0], pos[s:s + chunk, 1]
        out[s:s + chunk] = np.einsum("ij,ij->i", tfeat[a], tfeat[b])
    return out


def verify_templates(feats: np.ndarray, meta: IJBMeta, name: str = "IJBC",
                     fars: Sequence[float] = DEFAULT_FARS) -> dict[str, Any]:
    """The 1:1 protocol on already computed image features (see :func:`evaluate_templates`)."""
    if meta.pairs is None or meta.labels is None:
        raise FileNotFoundError(f"{name}: the 1:1 protocol needs meta/{name.lower()}_template_pair_label.txt")
    tfeat, tids = template_features(feats, meta.templates, meta.medias)
    scores = template_scores(tfeat, tids, meta.pairs)
    nearest, strict = tar_at_far(scores, meta.labels, fars, "nearest"), tar_at_far(scores, meta.labels, fars, "strict")
    fpr, tpr, _ = roc(scores, meta.labels)
    return {"name": name, "images": len(meta.images), "templates": int(tids.size), "pairs": int(scores.size),
            "tar_at_far": nearest.to_dict(), "tar_at_far_strict": strict.to_dict(),
            "auc": float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2)), "scores": scores,
            "issame": meta.labels.copy()}


def evaluate_templates(model: nn.Module, root: str | os.PathLike, name: str = "IJBC", *, flip: bool = True,
                       norm_score: bool = True, detector_score: bool = True, batch_size: int = 128,
                       device: str | torch.device | None = None, num_workers: int = 0,
                       fars: Sequence[float] = DEFAULT_FARS, preprocessing: Preprocessing | None = None
                       ) -> dict[str, Any]:
    """Run the IJB 1:1 protocol on ``root``: TAR@FAR by both rules, AUC and the raw pair scores."""
    meta = read_ijb_meta(root, name)
    feats, used_detector = ijb_image_features(model, meta, flip=flip, norm_score=norm_score,
                                              detector_score=detector_score, batch_size=batch_size, device=device,
                                              num_workers=num_workers, preprocessing=preprocessing)
    return {**verify_templates(feats, meta, name, fars), "flip": flip, "norm_score": norm_score,
            "detector_score": used_detector}
