"""insightface verification ``.bin`` files: ``pickle((list of encoded images, list of bools))``.

Images ``2k`` and ``2k+1`` form pair ``k``; ``issame[k]`` says whether they show one person.
Such files come from the internet, so they are read with :class:`DataOnlyUnpickler`: it
builds only plain data (bytes, str, list, tuple, bool, int, float, None) and refuses every
global (``find_class``), so a crafted pickle cannot run code. The one exception is the pair of
constructors a *protocol-2 pickle written by Python 3* needs for ``bytes``
(``_codecs.encode(str, "latin1")`` and ``__builtin__.bytes()``); they are mapped to local,
side-effect-free functions. Python-2 pickles are read with ``encoding="bytes"``.
"""
from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from broadface.data.images import decode_image
from broadface.fileio import atomic_write


class UnsafePickleError(ValueError):
    """The pickle references a global (code), which is never loaded."""


def _latin1_bytes(text: str = "", encoding: str = "latin1") -> bytes:
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"_codecs.encode only allowed as (str, 'latin1'), got encoding {encoding!r}")
    return text.encode("latin1")


def _empty_bytes(*args: Any) -> bytes:
    if args:
        raise pickle.UnpicklingError("bytes() only allowed without arguments")
    return b""


_DATA_CONSTRUCTORS = {("_codecs", "encode"): _latin1_bytes, ("__builtin__", "bytes"): _empty_bytes,
                      ("builtins", "bytes"): _empty_bytes}


class DataOnlyUnpickler(pickle.Unpickler):
    """Unpickler that refuses all globals except the two bytes constructors above."""

    def find_class(self, module: str, name: str) -> Any:
        fn = _DATA_CONSTRUCTORS.get((module, name))
        if fn is None:
            raise UnsafePickleError(f"refuses global {module}.{name}")
        return fn


def load_data_pickle(path: str | os.PathLike) -> Any:
    """Unpickle plain data from ``path`` without ever importing or calling code."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    try:
        with open(path, "rb") as f:
            return DataOnlyUnpickler(f, encoding="bytes").load()
    except UnsafePickleError as err:
        raise UnsafePickleError(f"{path}: unsafe pickle, {err}; not loaded") from None
    except Exception as err:  # truncated / not a pickle
        raise ValueError(f"{path}: not a readable pickle ({type(err).__name__}: {err})") from None


def load_bin(path: str | os.PathLike) -> tuple[list[bytes], np.ndarray]:
    """``(images, issame)``: the encoded images (2 per pair) and one bool per pair."""
    obj = load_data_pickle(path)
    if not isinstance(obj, (tuple, list)) or len(obj) != 2:
        raise ValueError(f"{path}: expected a pickled (images, issame) pair, got {type(obj).__name__}")
    images, issame = obj
    if not isinstance(images, (list, tuple)) or not all(isinstance(b, (bytes, bytearray)) for b in images):
        raise ValueError(f"{path}: images must be a list of encoded-image bytes")
    if not isinstance(issame, (list, tuple)) or not all(isinstance(s, (bool, int)) and s in (0, 1) for s in issame):
        raise ValueError(f"{path}: issame must be a list of booleans")
    if len(images) != 2 * len(issame):
        raise ValueError(f"{path}: {len(images)} images for {len(issame)} pairs (need exactly 2 per pair)")
    return [bytes(b) for b in images], np.asarray(issame, dtype=bool)


def write_bin(path: str | os.PathLike, images: Sequence[bytes], issame: Sequence[bool], protocol: int = 4) -> Path:
    """Write an insightface-style ``.bin`` (images in pair order, one bool per pair)."""
    images = [bytes(b) for b in images]
    issame = [bool(s) for s in issame]
    if len(images) != 2 * len(issame):
        raise ValueError(f"write_bin: {len(images)} images for {len(issame)} pairs (need exactly 2 per pair)")
    return atomic_write(path, lambda f: pickle.dump((images, issame), f, protocol=protocol))


def decode_bin_images(images: Sequence[bytes], path: str | os.PathLike = "bin") -> list:
    """Decode every image of a ``.bin`` to RGB PIL images (errors name the file and image index)."""
    return [decode_image(data, f"{path} image {i}") for i, data in enumerate(images)]


def lfw_bin_images(pairs: Sequence, image_root: str | os.PathLike) -> tuple[list[bytes], list[bool]]:
    """Encoded images and labels of LFW pairs (``broadface.data.pairs.LFWPair``), files as-is."""
    root = Path(image_root)
    images: list[bytes] = []
    for p in pairs:
        images += [(root / p.path1).read_bytes(), (root / p.path2).read_bytes()]
    return images, [p.same for p in pairs]
