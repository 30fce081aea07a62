"""Warping a face onto the ArcFace 5-point template (the geometry of alignment, no detection).

A face is aligned by the similarity transform (rotation, uniform scale, translation) that maps
its five landmarks (left eye, right eye, nose, left and right mouth corner, in image
coordinates) onto the ArcFace template, followed by ``cv2.warpAffine``. The transform is fitted
with ``cv2.estimateAffinePartial2D(method=cv2.LMEDS)`` by default: least median of squares
tolerates one badly placed landmark and reproduces the shipped ``lfw/aligned-112x112`` images
(mean abs difference ~1.2 grey levels, JPEG noise). ``method="lstsq"`` is the closed-form
least-squares fit (Umeyama; = skimage's ``SimilarityTransform``, which insightface's IJB code
uses). OpenCV's default RANSAC is *not* offered: with 5 points and a 3 px threshold it often
fits a subset and rotates the face. Detection lives in :mod:`broadface.infer.align`.
"""
from __future__ import annotations

from typing import Literal, Sequence

import cv2
import numpy as np

# ArcFace / insightface template for a 112x112 crop: left eye, right eye, nose, mouth left, mouth right.
ARCFACE_TEMPLATE_112 = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float32,
)
LANDMARK_NAMES = ("left_eye", "right_eye", "nose", "mouth_left", "mouth_right")

Method = Literal["lmeds", "lstsq"]


def template(size: int = 112) -> np.ndarray:
    """The 5-point template scaled to a ``size`` x ``size`` crop (float32, shape 5x2)."""
    if int(size) <= 0:
        raise ValueError(f"size must be a positive number of pixels, got {size}")
    return ARCFACE_TEMPLATE_112 * (float(size) / 112.0)


def _check_landmarks(landmarks: np.ndarray | Sequence) -> np.ndarray:
    lm = np.asarray(landmarks, dtype=np.float32)
    if lm.shape == (10,):
        lm = lm.reshape(5, 2)
    if lm.shape != (5, 2) or not np.isfinite(lm).all():
        raise ValueError(f"landmarks must be 5 finite (x, y) points, got shape {lm.shape}")
    return lm


def _umeyama(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Closed-form least-squares similarity transform src -> dst (Umeyama 1991), as 2x3."""
    src, dst = src.astype(np.float64), dst.astype(np.float64)
    ms, md = src.mean(0), dst.mean(0)
    s, d = src - ms, dst - md
    var = (s**2).sum() / len(src)
    if var < 1e-12:
        raise ValueError("landmarks are degenerate: all points coincide")
    u, sig, vt = np.linalg.svd(d.T @ s / len(src))
    flip = np.diag([1.0, -1.0 if np.linalg.det(u) * np.linalg.det(vt) < 0 else 1.0])
    rot = u @ flip @ vt
    scale = np.trace(np.diag(sig) @ flip) / var
    return np.hstack([scale * rot, (md - scale * rot @ ms)[:, None]])


def estimate_norm(landmarks: np.ndarray | Sequence, size: int = 112, method: Method = "lmeds") -> np.ndarray:
    """2x3 similarity matrix mapping the 5 ``landmarks`` onto the template for a ``size`` crop."""
    lm, dst = _check_landmarks(landmarks), template(size)
    if method == "lstsq":
        return _umeyama(lm, dst)
    if method != "lmeds":
        raise ValueError(f"method must be 'lmeds' or 'lstsq', got {method!r}")
    matrix, _ = cv2.estimateAffinePartial2D(lm, dst, method=cv2.LMEDS)
    if matrix is None:  # degenerate points (e.g. all equal): fall back to the closed form
        matrix = _umeyama(lm, dst)
    if not np.isfinite(matrix).all() or abs(np.linalg.det(matrix[:, :2])) < 1e-8:
        raise ValueError("landmarks are degenerate: no similarity transform maps them onto the template")
    return matrix


def warp_face(image: np.ndarray, landmarks: np.ndarray | Sequence, size: int = 112,
              method: Method = "lmeds") -> np.ndarray:
    """Warp ``image`` (H x W x C, any channel order) to the aligned ``size`` x ``size`` crop."""
    matrix = estimate_norm(landmarks, size, method)
    return cv2.warpAffine(image, matrix, (int(size), int(size)), flags=cv2.INTER_LINEAR, borderValue=0.0)
