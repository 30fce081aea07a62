"""Teacher embeddings computed once and memory-mapped: ``cache.npy`` (N x 2 x D) + ``cache.npy.json``.

Row ``[i, 0]`` is the teacher's unit embedding of sample ``i`` (prepared by the image pipeline
for the teacher: its size and normalisation, no augmentation), ``[i, 1]`` of its horizontal flip, so a training view is
looked up by ``key = 2 * i + flipped`` (see :mod:`broadface.train.distill_data`). Synthetic
masks are *not* in the cache: with ``data.mask_prob`` a masked student view is pulled towards
the teacher's embedding of the unmasked face.

Both files are written atomically (temporary file, fsync, rename). The JSON sidecar names
the teacher (file SHA-256, input size, dimension), the data (sample count and SHA-256 of
sources and labels) and the dtype; opening a cache whose sidecar differs from this run's is
a ``ValueError`` naming the field, so a stale cache is never used silently.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from broadface.data.pipeline import Preprocessing
from broadface.fileio import atomic_path, atomic_write_json
from broadface.train.teacher import Teacher

FORMAT = "broadface-teacher-cache"
VERSION = 1


def sidecar_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path.with_name(path.name + ".json")


class _TeacherView(Dataset):
    """Sample ``index`` of a concatenation of image data sets, un-augmented, prepared for the teacher."""

    def __init__(self, parts: list[Dataset], preprocessing: Preprocessing):
        self.parts, self.transform = parts, preprocessing
        self.bounds = np.cumsum([0] + [len(p) for p in parts])  # type: ignore[arg-type]

    def __len__(self) -> int:
        return int(self.bounds[-1])

    def __getitem__(self, index: int) -> torch.Tensor:
        k = int(np.searchsorted(self.bounds, index, side="right") - 1)
        part = self.parts[k]
        image = getattr(part, "image", None)
        if image is None:
            raise ValueError(f"distill.cache: {type(part).__name__} has no .image(i) (PIL image, label) accessor")
        return self.transform(image(index - int(self.bounds[k]))[0])


def build_cache(path: str | os.PathLike, teacher: Teacher, parts: list[Dataset], identity: dict[str, Any],
                batch_size: int = 128, dtype: str = "float16") -> np.ndarray:
    """Embed every sample (plain and flipped) with ``teacher``; write ``path`` and its sidecar; return the memmap."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    view = _TeacherView(parts, teacher.preprocessing)
    n = len(view)

    def write(tmp: str) -> None:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.dtype(dtype), shape=(n, 2, teacher.dim))
        row = 0
        # its own generator: building the cache must not move the global RNG (a fresh run == a run on a cache)
        for images in DataLoader(view, batch_size=batch_size, shuffle=False, generator=torch.Generator()):
            for f in (0, 1):
                emb = teacher.embed_prepared(images.flip(-1) if f else images)
                out[row:row + len(images), f] = emb.cpu().numpy().astype(dtype)
            row += len(images)
        out.flush()
        del out

    with atomic_path(path) as tmp:
        write(str(tmp))
    meta = {"format": FORMAT, "version": VERSION, **identity, "dtype": dtype, "shape": [n, 2, teacher.dim]}
    atomic_write_json(sidecar_path(path), meta)
    return open_cache(path, identity, dtype)


def open_cache(path: str | os.PathLike, identity: dict[str, Any], dtype: str = "float16") -> np.ndarray:
    """The cache memory-mapped read-only, after checking its sidecar against ``identity`` (ValueError if stale)."""
    path, side = Path(path), sidecar_path(path)
    if not side.is_file():
        raise ValueError(f"distill.cache {path}: sidecar {side} is missing, so the cache cannot be checked; "
                         "delete the .npy to rebuild it")
    try:
        meta = json.loads(side.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"distill.cache sidecar {side}: unreadable ({err}); delete both files to rebuild") from None
    expected = {"format": FORMAT, "version": VERSION, "dtype": dtype,
                **{k: v for k, v in identity.items() if k != "teacher"}}  # a moved teacher file is still the same
    for key, want in expected.items():
        if meta.get(key) != want:
            raise ValueError(f"distill.cache {path} is stale: sidecar field '{key}' is {meta.get(key)!r} but this run "
                             f"needs {want!r}; delete {path} and {side.name} (it is rebuilt) or set another "
                             "distill.cache")
    try:
        cache = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as err:
        raise ValueError(f"distill.cache {path}: not a readable .npy ({err})") from None
    if list(cache.shape) != list(meta.get("shape", [])) or cache.dtype != np.dtype(dtype):
        raise ValueError(f"distill.cache {path}: holds {cache.dtype} {list(cache.shape)}, sidecar says "
                         f"{meta.get('dtype')} {meta.get('shape')}; delete both files to rebuild")
    return cache


def open_or_build(path: str | os.PathLike, teacher: Teacher, parts: list[Dataset], identity: dict[str, Any],
                  batch_size: int = 128, dtype: str = "float16") -> np.ndarray:
    """Open ``path`` if it exists (refusing a stale one), else build it."""
    if Path(path).exists():
        return open_cache(path, identity, dtype)
    return build_cache(path, teacher, parts, identity, batch_size, dtype)
