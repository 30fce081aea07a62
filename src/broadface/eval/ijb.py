"""IJB-B / IJB-C: meta files, image features and template features, shared by the 1:1 and 1:N protocols.

Files under ``root`` (the insightface release layout; ``<name>`` lower-case, e.g. ``ijbc``)::

    meta/<name>_face_tid_mid.txt          image  template_id  media_id       (one line per image)
    meta/<name>_name_5pts_score.txt       image  x1 y1 ... x5 y5  faceness   (optional)
    meta/<name>_template_pair_label.txt   template1  template2  label(0/1)   (1:1 protocol)
    meta/<name>_1N_gallery_G1.csv         TEMPLATE_ID,SUBJECT_ID,...          (1:N; IJB-B: _S1 / _S2)
    meta/<name>_1N_gallery_G2.csv
    meta/<name>_1N_probe_mixed.csv
    loose_crop/<image>                    (or images/<image>: already aligned crops)

With the 5-point file, each loose crop is aligned to the ArcFace template by the least-squares
similarity transform (as skimage's ``SimilarityTransform``), and its faceness score is
available. Image features are ``f(x) + f(flip(x))`` (``flip``, insightface "F2"), kept
un-normalised so the feature norm weights the image (``norm_score``, "N1"; False L2-normalises
each image first), optionally multiplied by the faceness score (``detector_score``, "D1").
Within a template, images of the same media (video) are averaged, the media features summed,
and the template feature L2-normalised. insightface's defaults are flip + N1 + D1.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch import nn

from broadface.data.pipeline import Preprocessing
from broadface.data.warp import warp_face
from broadface.eval.images import EvalImages
from broadface.models.embed import embed_dataset
from broadface.models.loader import preprocessing_of

__all__ = ["IJBMeta", "read_ijb_meta", "ijb_image_features", "template_features", "SEARCH_SETS"]

SEARCH_SETS = ("G1", "G2", "probe")  # 1:N lists; IJB-B names its galleries S1 / S2


@dataclass(frozen=True)
class IJBMeta:
    """Parsed IJB meta data; per-image arrays are aligned with ``images``."""

    images: list[Path]
    templates: np.ndarray
    medias: np.ndarray
    pairs: np.ndarray | None       # P x 2 template ids (1:1), None without the pair file
    labels: np.ndarray | None      # P bools
    landmarks: np.ndarray | None   # N x 5 x 2, or None when crops are pre-aligned
    faceness: np.ndarray | None
    search: dict[str, tuple[np.ndarray, np.ndarray]] | None = None  # 1:N: set -> (template ids, subject ids)


def _table(path: Path, columns: int | None, what: str, sep: str | None = None, skip: int = 0) -> list[list[str]]:
    if not path.is_file():
        raise FileNotFoundError(f"IJB meta file {path} does not exist ({what})")
    rows = [ln.split(sep) for ln in path.read_text().splitlines()[skip:] if ln.strip()]
    if not rows:
        raise ValueError(f"{path}: empty ({what})")
    for i, r in enumerate(rows):
        if columns is not None and len(r) != columns:
            raise ValueError(f"{path}:{i + 1 + skip}: expected {columns} columns ({what}), got {len(r)}")
    return rows


def _ints(rows: list[list[str]], cols: slice, path: Path) -> np.ndarray:
    try:
        return np.array([[int(v) for v in r[cols]] for r in rows], dtype=np.int64)
    except ValueError as err:
        raise ValueError(f"{path}: expected integer ids ({err})") from None


def _read_pairs(path: Path, known: np.ndarray, tid_name: str) -> tuple[np.ndarray, np.ndarray]:
    pr = _ints(_table(path, 3, "template1 template2 label"), slice(0, 3), path)
    if not np.isin(pr[:, 2], (0, 1)).all():
        raise ValueError(f"{path}: labels (3rd column) must be 0 or 1")
    unknown = np.setdiff1d(pr[:, :2], known)
    if unknown.size:
        raise ValueError(f"{path}: {unknown.size} template id(s) not in {tid_name}, e.g. {unknown[0]}")
    return pr[:, :2], pr[:, 2].astype(bool)


def _search_file(meta: Path, key: str, part: str) -> Path:
    if part == "probe":
        return meta / f"{key}_1N_probe_mixed.csv"
    g = meta / f"{key}_1N_gallery_{part}.csv"
    s = meta / f"{key}_1N_gallery_S{part[1]}.csv"
    return g if g.is_file() or not s.is_file() else s


def _read_search(meta: Path, key: str, known: np.ndarray, tid_name: str) -> dict | None:
    """The 1:N gallery and probe lists (template id -> subject id), or None when none is present."""
    paths = {part: _search_file(meta, key, part) for part in SEARCH_SETS}
    if not any(p.is_file() for p in paths.values()):
        return None
    out = {}
    for part, path in paths.items():
        rows = _table(path, None, "TEMPLATE_ID,SUBJECT_ID,... with a header line", sep=",", skip=1)
        ids = _ints(rows, slice(0, 2), path)
        tids, first = np.unique(ids[:, 0], return_index=True)
        subjects = ids[first, 1]
        if tids.size != np.unique(ids, axis=0).shape[0]:
            raise ValueError(f"{path}: a template is listed with two different subject ids")
        unknown = np.setdiff1d(tids, known)
        if unknown.size:
            raise ValueError(f"{path}: {unknown.size} template id(s) not in {tid_name}, e.g. {unknown[0]}")
        out[part] = (tids, subjects)
    return out


def read_ijb_meta(root: str | os.PathLike, name: str = "IJBC") -> IJBMeta:
    """Read ``root/meta/<name>_*`` (see module doc); images from loose_crop/ or images/."""
    root, key = Path(root), name.lower()
    meta = root / "meta"
    tid_path = meta / f"{key}_face_tid_mid.txt"
    tid = _table(tid_path, 3, "image template_id media_id")
    ids = _ints(tid, slice(1, 3), tid_path)
    pair_path = meta / f"{key}_template_pair_label.txt"
    pairs, labels = _read_pairs(pair_path, ids[:, 0], tid_path.name) if pair_path.is_file() else (None, None)
    search = _read_search(meta, key, ids[:, 0], tid_path.name)
    if pairs is None and search is None:
        raise FileNotFoundError(f"{meta}: neither {pair_path.name} (1:1) nor {key}_1N_*.csv (1:N) found")
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
    return IJBMeta(images, ids[:, 0], ids[:, 1], pairs, labels, landmarks, faceness, search)


def _align(img: np.ndarray, i: int, landmarks: np.ndarray, size: int) -> np.ndarray:
    return warp_face(img, landmarks[i], size, method="lstsq")


def ijb_image_features(model: nn.Module, meta: IJBMeta, *, flip: bool = True, norm_score: bool = True,
                       detector_score: bool = True, batch_size: int = 128, device: str | torch.device | None = None,
                       num_workers: int = 0, preprocessing: Preprocessing | None = None) -> tuple[np.ndarray, bool]:
    """Per-image float64 features (F2 / N1 / D1 as asked) and whether faceness weights were applied."""
    pre = preprocessing or preprocessing_of(model)
    prepare = None if meta.landmarks is None else partial(_align, landmarks=meta.landmarks, size=pre.side)
    data = EvalImages(meta.images, pre, prepare=prepare)
    feats = embed_dataset(model, data, batch_size=batch_size, flip=flip, device=device, num_workers=num_workers,
                          normalize=not norm_score, dtype=np.float64)
    used_detector = detector_score and meta.faceness is not None
    return (feats * meta.faceness[:, None] if used_detector else feats), used_detector


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
