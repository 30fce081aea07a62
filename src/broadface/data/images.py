"""Decode image files or bytes into RGB (or grayscale) PIL images, with errors that name the source.

Every image broadface reads (training, evaluation, the CLI, alignment, the teacher) goes through
:func:`decode_image`: the EXIF orientation is applied (a phone photo stored sideways comes out
upright), grayscale, 16-bit, RGBA, palette and CMYK inputs all come out in one mode, and a
corrupt or truncated file raises :class:`ImageDecodeError` naming it rather than a bare Pillow
traceback. :data:`IMG_EXTENSIONS` is the one list of file suffixes counted as images.

:func:`decode_pixels` is its array twin for the data loaders: the same pixels as
``np.asarray(decode_image(src))``, but a plain JPEG (no EXIF block) is decoded by libjpeg-turbo
through ``simplejpeg`` straight into an array, skipping Pillow's Python-level header parsing and its
``tobytes`` copy (about 1.5-2.5x faster per 112 px face here). Anything else -- EXIF, CMYK, PNG, a
decoder error, ``simplejpeg`` not installed -- goes through :func:`decode_image`. tests/data/test_images.py
checks the equality on real faces and on each fallback.
"""
from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, ImageOps

from broadface.fileio import atomic_write_bytes

try:  # libjpeg-turbo straight into numpy; optional (decode_pixels falls back to Pillow)
    import simplejpeg as _simplejpeg
except ImportError:  # pragma: no cover - depends on the environment
    _simplejpeg = None

IMG_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".pgm", ".ppm", ".tif", ".tiff")
_ORIENTATION = 0x0112  # EXIF tag

Source = Union[str, os.PathLike, bytes]


class ImageDecodeError(ValueError):
    """An image file/record could not be read or decoded; the message names it."""


def _as_mode(im: Image.Image, mode: str) -> Image.Image:
    """Promote any Pillow mode to ``mode`` ("RGB" or "L"), always returning a new image."""
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N"):
        # 16-bit grayscale (e.g. PGM maxval 65535): keep the top 8 bits instead of clipping.
        im = Image.fromarray((np.asarray(im, dtype=np.uint16) >> 8).astype(np.uint8), "L")
    elif im.mode == "PA" or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
    return im.convert(mode)


def _upright(im: Image.Image) -> Image.Image:
    """Apply the EXIF orientation (only when it is not already upright: no copy in the common case)."""
    if im.getexif().get(_ORIENTATION, 1) in (1, None):
        return im
    return ImageOps.exif_transpose(im)


def read_bytes(path: str | os.PathLike) -> bytes:
    """A whole file's bytes, by file descriptor: a third to a half of ``open(path, "rb").read()``'s cost on a
    5 KB face (no buffered file object to build), which the loaders pay once per image."""
    fd = os.open(path, os.O_RDONLY)
    try:
        parts = [os.read(fd, os.fstat(fd).st_size + 1)]
        while parts[-1]:  # until end of file (a file that grew; Linux reads at most 2 GiB a call)
            parts.append(os.read(fd, 1 << 20))
        return b"".join(parts)
    finally:
        os.close(fd)


def _source_bytes(src: Source, name: str | None) -> tuple[bytes | bytearray | memoryview, str]:
    """``(encoded bytes, name for messages)`` of a path or bytes source: a file is read in one call (Pillow
    parsing a file object reads it in many small pieces); an unreadable one raises naming it."""
    if isinstance(src, (bytes, bytearray, memoryview)):
        return src, "<bytes>" if name is None else name
    name = os.fspath(src) if name is None else name
    try:
        return read_bytes(src), name
    except OSError as err:
        raise ImageDecodeError(f"{name}: cannot decode image ({type(err).__name__}: {err})") from None


def read_encoded(path: str | os.PathLike) -> bytes:
    """A file's encoded bytes, to decode later; an unreadable file raises :class:`ImageDecodeError` naming it."""
    return _source_bytes(path, None)[0]  # type: ignore[return-value]


def decode_image(src: Source, name: str | None = None, mode: str = "RGB") -> Image.Image:
    """Fully decode ``src`` (path or encoded bytes) into an upright ``mode`` image.

    ``name`` is used in error messages (defaults to the path). Decoding is forced here
    (``Image.load``) so truncated files fail now, not later inside a transform.
    """
    data, name = _source_bytes(src, name)
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            return _as_mode(_upright(im), mode)
    except Exception as err:  # Pillow raises OSError, SyntaxError, ValueError, DecompressionBombError...
        raise ImageDecodeError(f"{name}: cannot decode image ({type(err).__name__}: {err})") from None


def _plain_jpeg(data: bytes | bytearray | memoryview) -> bool:
    """JPEG bytes without an EXIF block (nothing to rotate): what the fast path may decode. Conservative:
    the marker anywhere in the first 64 KiB (compressed data included) sends the image to Pillow."""
    head = bytes(data[:65536])
    return head[:2] == b"\xff\xd8" and head.find(b"Exif\x00\x00") < 0


def direct_jpeg_size(data: bytes | bytearray | memoryview) -> tuple[int, int] | None:
    """``(height, width)`` of an image libjpeg-turbo's direct path decodes to Pillow's pixels -- a plain JPEG in
    YCbCr or gray (its CMYK -> RGB rounds differently) -- else None (not such a JPEG, unreadable header, or no
    ``simplejpeg``)."""
    if _simplejpeg is None or not _plain_jpeg(data):
        return None
    try:
        h, w, colorspace, _ = _simplejpeg.decode_jpeg_header(data)
    except (ValueError, RuntimeError):
        return None
    return (h, w) if colorspace in ("YCbCr", "Gray") else None


def decode_direct(data: bytes | bytearray | memoryview, out: np.ndarray | None = None) -> np.ndarray | None:
    """The H x W x 3 RGB pixels of a JPEG that :func:`direct_jpeg_size` accepts, decoded by libjpeg-turbo (into
    ``out``, C-contiguous uint8 of exactly that shape, when given); None if the decoder rejects it (strict: a
    truncated file too), so the caller falls back to Pillow, which decodes it or names the error."""
    try:
        return _simplejpeg.decode_jpeg(data, colorspace="RGB", fastdct=False, fastupsample=False, strict=True,
                                       buffer=out)
    except (ValueError, RuntimeError):
        return None


def decode_pixels(src: Source, name: str | None = None, mode: str = "RGB") -> np.ndarray:
    """:func:`decode_image` as a uint8 array (H x W x 3 for RGB, H x W for L), equal pixel for pixel;
    plain RGB JPEGs take libjpeg-turbo's direct path (module docstring)."""
    data, name = _source_bytes(src, name)
    if mode == "RGB" and direct_jpeg_size(data) is not None:
        pixels = decode_direct(data)
        if pixels is not None:
            return pixels
    return np.asarray(decode_image(data, name, mode))


def read_rgb(source: str | os.PathLike | bytes, name: str | None = None) -> np.ndarray:
    """Decode an image file (or encoded bytes) to H x W x 3 uint8 RGB.

    Missing file -> FileNotFoundError; undecodable -> ValueError naming ``name``/the path.
    """
    if not isinstance(source, (bytes, bytearray, memoryview)) and not os.path.isfile(source):
        raise FileNotFoundError(f"image {os.fspath(source)} does not exist")
    return np.asarray(decode_image(source, name))


def write_image(rgb: np.ndarray, path: str | os.PathLike, quality: int = 95) -> Path:
    """Save an RGB uint8 array to ``path`` atomically (format from the suffix)."""
    path = Path(path)
    fmt = Image.registered_extensions().get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"{path}: unsupported image suffix {path.suffix!r}")
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format=fmt, **({"quality": quality} if fmt in ("JPEG", "WEBP") else {}))
    return atomic_write_bytes(path, buf.getvalue())
