"""insightface RecordIO face sets: ``train.rec`` + ``train.idx`` + ``property``, read and written.

Layout written by :func:`pack_folder` (and found in insightface's ``faces_*`` sets)::

    record 0          header: flag=2, label=[N+1, N+1+C]   (image keys 1..N, identity keys N+1..N+C)
    records 1..N      flag=0, label=float(class), payload = the encoded image (JPEG/PNG bytes as-is)
    records N+1+c     flag=2, label=[first, last+1) image keys of class c
    property          "C,H,W"
    classes.txt       class names, one per line in label order (broadface extra; mxnet ignores it)

:class:`RecordIODataset` takes the image keys from record 0 when it is such a header and
otherwise uses every key of the ``.idx``. Labels (``label``, or ``label[0]`` for ``flag > 0``
image records) must be integral and ``< C``; anything else raises ValueError naming the file
and record. Labels are read from the record headers on first use of ``targets``.
"""
from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from broadface.data.base import ImageDataset, Transform
from broadface.data.folder import FaceFolder
from broadface.data.images import IMG_EXTENSIONS, ImageDecodeError, decode_image
from broadface.data.mxrecord import IR_SIZE, RecordReader, RecordWriter, pack, read_index, unpack
from broadface.fileio import atomic_write


def _rec_paths(prefix_or_dir: str | os.PathLike) -> tuple[Path, Path, Path]:
    p = Path(prefix_or_dir)
    if p.is_dir():
        return p / "train.rec", p / "train.idx", p / "property"
    prefix = p.with_suffix("") if p.suffix in (".rec", ".idx") else p
    return prefix.with_name(prefix.name + ".rec"), prefix.with_name(prefix.name + ".idx"), prefix.parent / "property"


def read_property(path: Path) -> tuple[int, int, int]:
    """``property`` file -> (num_classes, height, width)."""
    text = path.read_text().strip()
    try:
        c, h, w = (int(v) for v in text.split(","))
        if c < 1 or h < 1 or w < 1:
            raise ValueError
    except ValueError:
        raise ValueError(f"{path}: expected 'num_classes,height,width' (positive ints), got {text[:60]!r}") from None
    return c, h, w


class RecordIODataset(ImageDataset):
    """insightface RecordIO set as a dataset of ``(tensor, int label)``.

    ``prefix_or_dir``: a folder with ``train.rec``/``train.idx``/``property``, or a prefix /
    ``.rec`` path (``X.rec`` + ``X.idx``, ``property`` beside them). Without ``property`` the
    class count comes from the record-0 identity range, else from the largest label + 1.
    """

    def __init__(self, prefix_or_dir: str | os.PathLike, transform: Transform | None = None, on_error: str = "raise"):
        self.rec_path, self.idx_path, prop = _rec_paths(prefix_or_dir)
        if not self.rec_path.is_file():
            raise FileNotFoundError(f"RecordIO file {self.rec_path} does not exist")
        if not self.idx_path.is_file():
            raise FileNotFoundError(f"RecordIO index {self.idx_path} is missing: it is needed to read "
                                    f"{self.rec_path.name} by key (rebuild with `broadface data pack`)")
        self.reader = RecordReader(self.rec_path)
        self.index = read_index(self.idx_path)
        self._targets: list[int] | None = None
        self.property = read_property(prop) if prop.is_file() else None
        self.header0 = None
        keys = sorted(self.index)
        if 0 in self.index:
            h0, _ = unpack(self.reader.read(self.index[0], IR_SIZE + 8), self._name(0))
            if h0.flag > 0:
                if h0.flag < 2:
                    raise ValueError(f"{self._name(0)}: header record needs 2 labels [images end, ids end], "
                                     f"has {h0.flag}")
                self.header0 = (int(h0.label[0]), int(h0.label[1]))
                keys = list(range(1, self.header0[0]))
                missing = [k for k in (keys[:1] + keys[-1:]) if k not in self.index]
                if missing or len(keys) == 0:
                    raise ValueError(f"{self.idx_path}: header record 0 says images are keys 1..{self.header0[0] - 1}, "
                                     f"but key {missing[0] if missing else 1} is not in the index")
        self.keys = keys
        if self.property is not None:
            num_classes = self.property[0]
        elif self.header0 is not None:
            num_classes = self.header0[1] - self.header0[0]
        else:
            num_classes = int(max(self.targets)) + 1 if keys else 0
        self._limit = num_classes
        names_file = self.rec_path.parent / "classes.txt"
        names = names_file.read_text().splitlines() if names_file.is_file() else []
        self.classes = names if len(names) == num_classes else [str(i) for i in range(num_classes)]
        self.origin = str(self.rec_path)
        super().__init__(len(keys), transform, on_error)

    def _name(self, key: int) -> str:
        return f"{self.rec_path} record {key}"

    def source(self, index: int) -> str:
        return self._name(self.keys[index])

    def __len__(self) -> int:
        return len(self.keys)

    def _label(self, key: int, header) -> int:
        raw = float(header.label[0]) if header.flag > 0 else float(header.label)
        limit = getattr(self, "_limit", None)
        if not raw.is_integer() or raw < 0 or (limit is not None and raw >= limit):
            bound = f"0..{limit - 1}" if limit is not None else "a non-negative integer"
            raise ValueError(f"{self._name(key)}: label {raw} is not an integer class id in {bound}"
                             + (f" (class count from {self.idx_path.parent / 'property'})" if self.property else ""))
        return int(raw)

    @property
    def targets(self) -> list[int]:
        """Labels of all images, read from their headers once (a few µs per record)."""
        if self._targets is None:
            self._targets = [self._label(k, unpack(self.reader.read(self._offset(k), 256), self._name(k))[0])
                             for k in self.keys]
        return self._targets

    def _offset(self, key: int) -> int:
        try:
            return self.index[key]
        except KeyError:
            raise ValueError(f"{self.idx_path}: image key {key} is not in the index") from None

    def read_record(self, index: int) -> tuple[int, bytes]:
        """``(label, encoded image bytes)`` of sample ``index``, undecoded."""
        key = self.keys[index]
        header, payload = unpack(self.reader.read(self._offset(key)), self._name(key))
        return self._label(key, header), payload

    def encoded(self, index: int) -> tuple[bytes, int]:
        label, payload = self.read_record(index)
        return payload, label


@dataclass
class PackSummary:
    out_dir: Path
    num_images: int
    num_classes: int
    size: tuple[int, int]  # (h, w) written to ``property``: the most common image size
    mixed_sizes: int = 0  # images whose size differs from ``size``
    skipped: list[str] = field(default_factory=list)


def pack_folder(
    folder: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    skip_bad: bool = False,
    overwrite: bool = False,
    extensions: Iterable[str] = IMG_EXTENSIONS,
    progress: Callable[[int, int], None] | None = None,
) -> PackSummary:
    """Pack a folder-per-identity tree into insightface RecordIO (``train.rec/.idx``, ``property``).

    Images are stored byte-for-byte after checking they decode; an undecodable one raises
    (naming the file) or, with ``skip_bad``, is left out and listed in the summary.
    """
    ds = FaceFolder(folder, extensions=extensions)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"output {out} exists and is not a directory")
    if (out / "train.rec").exists() and not overwrite:
        raise ValueError(f"{out / 'train.rec'} already exists (pass overwrite=True / --overwrite to replace it)")
    out.mkdir(parents=True, exist_ok=True)
    items: list[tuple[int, bytes]] = []
    sizes: Counter = Counter()
    skipped: list[str] = []
    for i, (path, label) in enumerate(ds.samples):
        data = Path(path).read_bytes()
        try:
            im = decode_image(data, path)
        except ImageDecodeError:
            if not skip_bad:
                raise
            skipped.append(path)
            continue
        sizes[(im.height, im.width)] += 1
        items.append((label, data))
        if progress is not None:
            progress(i + 1, len(ds))
    if not items:
        raise ValueError(f"{folder}: no decodable image to pack")
    n, c = len(items), len(ds.classes)
    labels = np.array([label for label, _ in items])
    starts = np.searchsorted(labels, np.arange(c + 1))  # samples are grouped by class, in label order

    def write_rec(f) -> None:
        w = RecordWriter(f)
        w.write(0, pack([n + 1, n + 1 + c], b""))
        for key, (label, data) in enumerate(items, 1):
            w.write(key, pack(float(label), data, id=key))
        for cls in range(c):
            w.write(n + 1 + cls, pack([starts[cls] + 1, starts[cls + 1] + 1], b"", id=n + 1 + cls))
        write_rec.index = w  # type: ignore[attr-defined]

    atomic_write(out / "train.rec", write_rec)
    atomic_write(out / "train.idx", write_rec.index.write_index)  # type: ignore[attr-defined]
    (h, w), count = sizes.most_common(1)[0]
    atomic_write(out / "property", lambda f: f.write(f"{c},{h},{w}\n".encode()))
    atomic_write(out / "classes.txt", lambda f: f.write("".join(x + "\n" for x in ds.classes).encode()))
    return PackSummary(out, n, c, (h, w), n - count, skipped)
