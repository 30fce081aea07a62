"""Uploaded bytes -> an aligned RGB face crop: size limits, decoding, and detection + alignment on request.

``align`` is ``"auto"`` (a square image of the crop size, 112 x 112 by default, is taken as an
aligned crop; anything else is detected and aligned), ``"yes"`` (always detect) or ``"no"`` (take the
image as it is, resized by the model). Detection is the offline MTCNN of :mod:`broadface.infer.align`,
loaded on first use and run under a lock (its ``cv2.dnn`` nets are not shared between threads).
"""
from __future__ import annotations

import io
import threading
from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image, UnidentifiedImageError

from broadface.serve.errors import BadInput, TooLarge

Align = Literal["auto", "yes", "no"]
ALIGN_CHOICES = ("auto", "yes", "no")


@dataclass(frozen=True)
class Face:
    """An aligned crop, how it was obtained (``given`` or ``detected``) and the detection, if any."""

    crop: np.ndarray
    status: Literal["given", "detected"]
    box: list[float] | None = None
    score: float | None = None

    def info(self) -> dict:
        out: dict = {"face": self.status}
        if self.box is not None:
            out.update(box=[round(v, 1) for v in self.box], detection_score=round(float(self.score), 4))
        return out


def encode_jpeg(rgb: np.ndarray, quality: int = 92) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


class FaceReader:
    """Turns one uploaded file into a :class:`Face`, enforcing ``max_bytes`` and ``max_pixels``."""

    def __init__(self, max_bytes: int, max_pixels: int, crop_size: int = 112):
        self.max_bytes, self.max_pixels, self.crop_size = int(max_bytes), int(max_pixels), int(crop_size)
        self._detector = None
        self._lock = threading.Lock()

    def decode(self, data: bytes, name: str) -> np.ndarray:
        """Bytes -> H x W x 3 uint8 RGB, or a 413 / 422 naming the file."""
        from broadface.data.images import ImageDecodeError, decode_image

        if len(data) == 0:
            raise BadInput(f"{name}: empty upload, expected an image file (JPEG, PNG, BMP, ...)")
        if len(data) > self.max_bytes:
            raise TooLarge(f"{name}: larger than the limit of {self.max_bytes} bytes per image")
        try:
            with Image.open(io.BytesIO(data)) as im:  # header only: refuse huge images before decoding them
                w, h = im.size
        except UnidentifiedImageError:
            raise BadInput(f"{name}: not an image (unrecognised format; expected JPEG, PNG, BMP, WebP, ...)") from None
        except Exception as err:  # Pillow raises OSError, SyntaxError, ValueError on broken headers
            raise BadInput(f"{name}: not an image ({type(err).__name__}: {err})") from None
        if w * h > self.max_pixels:
            raise TooLarge(f"{name}: {w} x {h} pixels, over the limit of {self.max_pixels} pixels per image")
        try:
            return np.asarray(decode_image(data, name))
        except ImageDecodeError as err:
            raise BadInput(f"not an image: {err}") from None

    def read(self, data: bytes, name: str, align: str = "auto") -> Face:
        """Decode and, as ``align`` says, take as an aligned crop or detect and align the main face."""
        if align not in ALIGN_CHOICES:
            raise BadInput(f"align={align!r}: expected one of {', '.join(ALIGN_CHOICES)}")
        rgb = self.decode(data, name)
        given = align == "no" or (align == "auto" and rgb.shape[:2] == (self.crop_size, self.crop_size))
        if given:
            return Face(np.ascontiguousarray(rgb), "given")
        return self._align(rgb, name)

    def _align(self, rgb: np.ndarray, name: str) -> Face:
        from broadface.infer.align import pick_face, warp_face

        with self._lock:
            detections = self._get_detector()(rgb)
        face = pick_face(detections, rgb.shape)
        if face is None:
            raise BadInput(f"{name}: no face found in the {rgb.shape[1]} x {rgb.shape[0]} image (send a photo with "
                           f"a visible face, or an aligned {self.crop_size} x {self.crop_size} crop with align=no)")
        crop = warp_face(rgb, face.landmarks, self.crop_size)
        return Face(crop, "detected", [float(v) for v in face.box], face.score)

    def _get_detector(self):
        from broadface.infer.align import DetectorUnavailable, FaceDetector

        if self._detector is None:
            try:
                self._detector = FaceDetector()
            except DetectorUnavailable as err:
                raise BadInput(f"this server cannot detect faces ({err}); send aligned "
                               f"{self.crop_size} x {self.crop_size} crops or align=no") from None
        return self._detector
