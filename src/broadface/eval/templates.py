"""IJB-B / IJB-C 1:1 template verification (insightface ``eval_ijbc.py`` protocol).

Files under ``root`` (the insightface release layout)::

    meta/<name>_face_tid_mid.txt          image  template_id  media_id       (one line per image)
    meta/<name>_template_pair_label.txt   template1  template2  label(0/1)
    meta/<name>_name_5pts_score.txt       image  x1 y1 ... x5 y5  faceness   (optional)
    loose_crop/<image>                    (or images/<image>: already aligned crops)

With the 5-point file, each loose crop is aligned to the ArcFace template by the
least-squares similarity transform (as skimage's ``SimilarityTransform``), and
its faceness score is available. Image features are ``f(x) + f(flip(x))``
(``flip``, insightface "F2"), kept un-normalised so the feature norm weights the
image (``norm_score``, "N1"; False L2-normalises each image first), optionally
multiplied by the faceness score (``detector_score``, "D1"). Within a template,
images of the same media (video) are averaged, the media features summed, and
the template feature L2-normalised; a pair's score is the cosine of its two
templates. insightface's defaults are flip + N1 + D1. TAR@FAR uses
:func:`broadface.metrics.tar_at_far` (``rule="nearest"`` reproduces its table).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from broadface.eval.images import EvalImages
from broadface.eval.verification import model_input_size
from broadface.models.embed import embed_dataset
from broadface.metrics import DEFAULT_FARS, roc, tar_at_far

__all__ = ["IJBMeta", "read_ijb_meta", "template_features", "template_scores", "evaluate_templates"]


@dataclass(frozen=True)
class IJBMeta:
    """Parsed IJB meta data; per-image arrays are aligned with ``images``."""

    images: list[Path]
    templates: np.ndarray
    medias: np.ndarray
    pairs: np.ndarray            # P x 2 template ids
    labels: np.ndarray           # P bools
    landmarks: np.ndarray | None  # N x 5 x 2, or None when crops are pre-aligned
    faceness: np.ndarray | None


def _table(path: Path, columns: int | None, what: str) -> list[list[str]]:
    if not path.is_file():
        raise FileNotFoundError(f"IJB meta file {path} does not exist ({what})")
    rows = [ln.split() for ln in path.read_text().splitlines() if ln.strip()]
    if not rows:
        raise ValueError(f"{path}: empty ({what})")
    for i, r in enumerate(rows):
        if columns is not None and len(r) != columns:
            raise ValueError(f"{path}:{i + 1}: expected {columns} columns ({what}), got {len(r)}")
    return rows


def _ints(rows: list[list[str]], cols: slice, path: Path) -> np.ndarray:
    try:
        return np.array([[int(v) for v in r[cols]] for r in rows], dtype=np.int64)
    except ValueError as err:
        raise ValueError(f"{path}: expected integer ids ({err})") from None


def read_ijb_meta(root: str | os.PathLike, name: str = "IJBC") -> IJBMeta:
    """Read ``root/meta/<name>_*.txt`` (see module doc); images from loose_crop/ or images/."""
    root, key = Path(root), name.lower()
    meta = root / "meta"
    tid_path = meta / f"{key}_face_tid_mid.txt"
    tid = _table(tid_path, 3, "image template_id media_id")
    ids = _ints(tid, slice(1, 3), tid_path)
    pair_path = meta / f"{key}_template_pair_label.txt"
    pr = _ints(_table(pair_path, 3, "template1 template2 label"), slice(0, 3), pair_path)
    if not np.isin(pr[:, 2], (0, 1)).all():
        raise ValueError(f"{pair_path}: labels (3rd column) must be 0 or 1")
    unknown = np.setdiff1d(pr[:, :2], ids[:, 0])
    if unknown.size:
        raise ValueError(f"{pair_path}: {unknown.size} template id(s) not in {tid_path.name}, e.g. {unknown[0]}")
    lmk_path, landmarks, faceness = meta / f"{key}_name_5pts_score.txt", None, None
    if lmk_path.is_file():
        rows = _table(lmk_path, 12, "image, 10 landmark coordinates, faceness")
        if len(rows) != len(tid) or any(a[0] != b[0] for a, b in zip(rows, tid)):
            raise ValueError(f"{lmk_path}: must list the images of {tid_path.name} in the same order")
        try:
            values = np.array([[float(v) for v in r[1:]] for r in rows])
        except ValueError as err:
            raise ValueError(f"{lmk_path}: non-numeric landmark/score ({err})") from None
        landmarks, faceness = values[:, :10].reshape(-1, 5, 2), values[:, 10]
    folder = next((root / d for d in ("loose_crop", "images") if (root / d).is_dir()), None)
    if folder is None:
        raise FileNotFoundError(f"{root}: no loose_crop/ or images/ folder holding the IJB images")
    images = [folder / r[0] for r in tid]
    missing = [p for p in images if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} IJB image(s) missing under {folder}, e.g. {missing[0]}")
    return IJBMeta(images, ids[:, 0], ids[:, 1], pr[:, :2], pr[:, 2].astype(bool), landmarks, faceness)


def template_features(features: np.ndarray, templates: np.ndarray, medias: np.ndarray
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Media-averaged, template-summed, L2-normalised features: ``(T x D, template ids)``."""
    feats = np.asarray(features, dtype=np.float64)
    utid, t_idx = np.unique(templates, return_inverse=True)
    # one group per (template, media)
    _, g_idx = np.unique(np.stack([t_idx.reshape(-1), np.asarray(medias)], 1), axis=0, return_inverse=True)
    g_idx = g_idx.reshape(-1)
    n_groups = int(g_idx.max()) + 1
    sums = np.zeros((n_groups, feats.shape[1]))
    np.add.at(sums, g_idx, feats)
    media = sums / np.bincount(g_idx, minlength=n_groups)[:, None]
    g_template = np.zeros(n_groups, dtype=np.int64)
    g_template[g_idx] = t_idx.reshape(-1)
    tfeat = np.zeros((utid.size, feats.shape[1]))
    np.add.at(tfeat, g_template, media)
    norms = np.linalg.norm(tfeat, axis=1, keepdims=True)
    return tfeat / np.where(norms == 0, 1.0, norms), utid


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


def _align(img: np.ndarray, i: int, landmarks: np.ndarray, size: int) -> np.ndarray:
    from broadface.infer.align import warp_face

    return warp_face(img, landmarks[i], size, method="lstsq")


def evaluate_templates(model: nn.Module, root: str | os.PathLike, name: str = "IJBC", *, flip: bool = True,
                       norm_score: bool = True, detector_score: bool = True, batch_size: int = 128,
                       device: str | torch.device | None = None, num_workers: int = 0,
                       fars: Sequence[float] = DEFAULT_FARS, input_size: int | None = None) -> dict[str, Any]:
    """Run the IJB 1:1 protocol on ``root`` (see module doc); TAR@FAR by both rules, raw scores."""
    meta = read_ijb_meta(root, name)
    size = input_size or model_input_size(model)
    prepare = None if meta.landmarks is None else partial(_align, landmarks=meta.landmarks, size=size)
    data = EvalImages(meta.images, size, prepare=prepare)
    feats = embed_dataset(model, data, batch_size=batch_size, flip=flip, device=device, num_workers=num_workers,
                          normalize=not norm_score, dtype=np.float64)
    used_detector = detector_score and meta.faceness is not None
    if used_detector:
        feats = feats * meta.faceness[:, None]
    tfeat, tids = template_features(feats, meta.templates, meta.medias)
    scores = template_scores(tfeat, tids, meta.pairs)
    nearest, strict = tar_at_far(scores, meta.labels, fars, "nearest"), tar_at_far(scores, meta.labels, fars, "strict")
    fpr, tpr, _ = roc(scores, meta.labels)
    return {"name": name, "images": len(meta.images), "templates": int(tids.size), "pairs": int(scores.size),
            "flip": flip, "norm_score": norm_score, "detector_score": used_detector,
            "tar_at_far": nearest.to_dict(), "tar_at_far_strict": strict.to_dict(),
            "auc": float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2)), "scores": scores, "issame": meta.labels.copy()}
