"""decode_pixels: the loaders' array decode gives decode_image's pixels exactly, takes libjpeg-turbo's
direct path only for plain JPEGs, and fails as loudly as Pillow."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from broadface.data import FaceFolder, TrainTransform
from broadface.data import images
from broadface.data.images import ImageDecodeError, decode_image, decode_pixels

pytest.importorskip("simplejpeg")


@pytest.fixture
def face_file(lfw_dir):
    return lfw_dir / "Al_Gore" / "Al_Gore_0001.jpg"


@pytest.fixture
def fast_calls(monkeypatch):
    """Count the calls into the direct JPEG decoder."""
    calls = []
    real = images._simplejpeg.decode_jpeg

    def counted(data, **kw):
        calls.append(len(data))
        return real(data, **kw)

    monkeypatch.setattr(images._simplejpeg, "decode_jpeg", counted)
    return calls


def _jpeg(img: Image.Image, **save) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90, **save)
    return buf.getvalue()


def test_real_faces_decode_to_pillows_pixels_through_the_direct_path(lfw_dir, fast_calls):
    from broadface.paths import data_root

    files = [p for p, _ in FaceFolder(lfw_dir).samples[::400]]
    files += [p for p, _ in FaceFolder(data_root() / "celeba299" / "aligned-112x112").samples[::300]]
    for f in files:
        got, ref = decode_pixels(f), np.asarray(decode_image(f))
        assert got.dtype == np.uint8 and got.shape == ref.shape and np.array_equal(got, ref), f
    assert len(fast_calls) == len(files) > 40


def test_an_exif_rotated_jpeg_goes_to_pillow_and_comes_out_upright(face_file, fast_calls):
    upright = Image.open(face_file).convert("RGB").crop((0, 0, 112, 80))  # not square: a rotation shows
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: view after turning 90 degrees clockwise
    data = _jpeg(upright.transpose(Image.ROTATE_90), exif=exif.tobytes())
    got = decode_pixels(data)
    assert got.shape == (80, 112, 3) and np.array_equal(got, np.asarray(decode_image(data)))
    assert fast_calls == []


@pytest.mark.parametrize("mode", ["L", "CMYK"])
def test_grayscale_and_cmyk_jpegs_equal_pillows_rgb(face_file, mode):
    data = _jpeg(Image.open(face_file).convert(mode))
    got = decode_pixels(data)
    assert got.shape == (112, 112, 3) and np.array_equal(got, np.asarray(decode_image(data)))


def test_png_and_grayscale_output_equal_decode_image(face_file, fast_calls):
    buf = io.BytesIO()
    Image.open(face_file).save(buf, format="PNG")
    assert np.array_equal(decode_pixels(buf.getvalue()), np.asarray(decode_image(buf.getvalue())))
    gray = decode_pixels(face_file, mode="L")
    assert gray.shape == (112, 112) and np.array_equal(gray, np.asarray(decode_image(face_file, mode="L")))
    assert fast_calls == []  # neither is a plain RGB JPEG decode


def test_truncated_and_missing_files_raise_naming_the_file(face_file, tmp_path):
    data = open(face_file, "rb").read()
    bad = tmp_path / "cut.jpg"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageDecodeError, match="cut.jpg"):
        decode_pixels(bad)
    with pytest.raises(ImageDecodeError, match="record 7"):
        decode_pixels(data[: len(data) // 2], "record 7")
    with pytest.raises(ImageDecodeError, match="gone.jpg"):
        decode_pixels(tmp_path / "gone.jpg")


def test_a_folder_hands_arrays_only_to_transforms_that_take_them(lfw_dir):
    seen = []
    ds = FaceFolder(lfw_dir, transform=lambda im: seen.append(type(im)) or 0)
    ds[0]
    assert len(seen) == 1 and issubclass(seen[0], Image.Image)
    assert isinstance(ds.image(0)[0], Image.Image)
    pix = FaceFolder(lfw_dir, TrainTransform(112, pixels=True))
    assert isinstance(pix._decoded(0)[0], np.ndarray)


def test_read_bytes_is_the_whole_file_whatever_its_size(tmp_path):
    """One descriptor read for a regular file, more until end of file: empty, small and > 1 MiB files come back
    whole (compared with Python's own file read); a folder or a missing file raises OSError."""
    from broadface.data.images import read_bytes

    rng = np.random.default_rng(0)
    for n in (0, 1, 5000, (1 << 20) * 3 + 7):
        p = tmp_path / f"f{n}"
        p.write_bytes(rng.integers(0, 256, n, dtype=np.uint8).tobytes())
        assert read_bytes(p) == p.read_bytes()
    for bad in (tmp_path, tmp_path / "gone"):
        with pytest.raises(OSError):
            read_bytes(bad)
