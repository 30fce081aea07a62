"""``FaceFolder``: one sub-folder per identity, images decoded lazily; and the one folder listing.

Layout ``root/<class>/<image>``; classes are the sub-folder names in sorted (code-point)
order and label ``i`` is ``classes[i]``; images inside a class are sorted by file name, so
the sample list is identical on every machine. Listing uses ``os.scandir`` and never opens
an image (LFW's 13,233 files list in well under a second). :func:`find_images` lists a whole
tree the same way (``broadface embed`` / ``align``, unlabeled distillation images). An image is
a file with a suffix in :data:`broadface.data.images.IMG_EXTENSIONS`, hidden names excluded.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Sequence


from broadface.data.base import ImageDataset, Transform, check_classes
from broadface.data.images import IMG_EXTENSIONS, read_encoded


def _norm_exts(extensions: Iterable[str]) -> tuple[str, ...]:
    exts = tuple(e.lower() if e.startswith(".") else "." + e.lower() for e in extensions)
    if not exts:
        raise ValueError("extensions must not be empty")
    return exts


def list_classes(root: str | os.PathLike) -> list[str]:
    """Sorted names of the (non-hidden) sub-folders of ``root``."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist or is not a directory")
    with os.scandir(root) as it:
        return sorted(e.name for e in it if e.is_dir() and not e.name.startswith("."))


def list_images(folder: str | os.PathLike, extensions: Iterable[str] = IMG_EXTENSIONS) -> list[str]:
    """Sorted file names in ``folder`` with an image extension (case-insensitive), hidden files excluded."""
    exts = _norm_exts(extensions)
    with os.scandir(folder) as it:
        return sorted(
            e.name for e in it if e.is_file() and not e.name.startswith(".") and e.name.lower().endswith(exts)
        )


def find_images(root: str | os.PathLike, extensions: Iterable[str] = IMG_EXTENSIONS) -> list[Path]:
    """Every image under ``root``, recursively, sorted by relative path (folder by folder); hidden
    files and folders skipped. FileNotFoundError if ``root`` is not a folder; the list may be empty."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist or is not a directory")
    exts = _norm_exts(extensions)
    out: list[tuple[tuple[str, ...], Path]] = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        rel = Path(folder).relative_to(root).parts
        out += [((*rel, f), Path(folder) / f) for f in files if not f.startswith(".") and f.lower().endswith(exts)]
    return [p for _, p in sorted(out)]


class FaceFolder(ImageDataset):
    """Folder-per-identity dataset.

    Args:
        root: folder holding one sub-folder per class.
        transform: callable PIL image -> tensor (see :mod:`broadface.data.transforms`);
            ``None`` gives float CHW in [0, 1].
        classes: optional subset/ordering of class folder names (e.g. one side of a split);
            label ``i`` is ``classes[i]``. Default: all sub-folders, sorted.
        extensions: file extensions counted as images (case-insensitive).
        on_error: ``"raise"`` (unreadable image -> :class:`ImageDecodeError` naming the file)
            or ``"skip"`` (substitute the next readable sample with its own label; see
            :attr:`skipped`).

    Raises ValueError naming the folder for an empty class folder, an unknown class name, or
    a root without class folders; FileNotFoundError if ``root`` is missing.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        transform: Transform | None = None,
        classes: Sequence[str] | None = None,
        extensions: Iterable[str] = IMG_EXTENSIONS,
        on_error: str = "raise",
    ):
        self.root = Path(root)
        found = list_classes(self.root)
        if classes is None:
            if not found:
                raise ValueError(f"{self.root}: no class sub-folders (expected ROOT/<class>/<image files>)")
            classes = found
        else:
            classes = check_classes(classes, f"{self.root} classes=")
            missing = sorted(set(classes) - set(found))
            if missing:
                more = " ..." if len(missing) > 5 else ""
                raise ValueError(f"{self.root}: class folder(s) not found: {missing[:5]}{more}")
        exts = _norm_exts(extensions)
        samples: list[tuple[str, int]] = []
        for label, name in enumerate(classes):
            folder = self.root / name
            files = list_images(folder, exts)
            if not files:
                raise ValueError(f"{folder}: class folder holds no image file ({', '.join(exts)})")
            samples.extend((str(folder / f), label) for f in files)
        self._init(samples, list(classes), transform, on_error, str(self.root))

    @classmethod
    def from_samples(
        cls,
        samples: Sequence[tuple[str | os.PathLike, int]],
        classes: Sequence[str] | None = None,
        transform: Transform | None = None,
        on_error: str = "raise",
    ) -> "FaceFolder":
        """Dataset over an explicit ``[(path, label), ...]`` list (labels index ``classes``;
        default classes are ``"0".."max label"``). Files are not touched until accessed."""
        samples = [(os.fspath(p), label) for p, label in samples]
        if not samples:
            raise ValueError("from_samples: empty sample list")
        for path, label in samples:
            if isinstance(label, bool) or not isinstance(label, int) or label < 0:
                raise ValueError(f"from_samples: label of {path} must be a non-negative int, got {label!r}")
        top = max(label for _, label in samples)
        classes = ([str(i) for i in range(top + 1)] if classes is None
                   else check_classes(classes, "from_samples classes="))
        if top >= len(classes):
            bad = next(p for p, label in samples if label >= len(classes))
            raise ValueError(f"from_samples: label {top} of {bad} is outside the {len(classes)} classes given")
        self = cls.__new__(cls)
        self.root = None
        self._init(samples, classes, transform, on_error, f"{len(samples)} listed files")
        return self

    def _init(self, samples, classes, transform, on_error, origin) -> None:
        ImageDataset.__init__(self, len(samples), transform, on_error)
        self.samples: list[tuple[str, int]] = samples
        self.classes = classes
        self.origin = origin
        self._targets = [label for _, label in samples]

    @property
    def targets(self) -> list[int]:
        return self._targets

    def __len__(self) -> int:
        return len(self.samples)

    def source(self, index: int) -> str:
        return self.samples[index][0]

    def encoded(self, index: int) -> tuple[bytes, int]:
        path, label = self.samples[index]
        return read_encoded(path), label
