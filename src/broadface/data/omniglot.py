"""Omniglot "small" background sets, read from their zips without extracting.

``images_background_small1.zip`` and ``images_background_small2.zip`` hold 5 alphabets each;
Greek and Latin are in both, byte-identical, and are counted once: 8 alphabets, 242
characters, 4,840 images (20 drawers each). Class = ``"<alphabet>/<character>"``.

Split by alphabet (no alphabet, hence no character, on both sides):

* train: the five alphabets of ``small1`` -- Balinese, Early_Aramaic, Greek, Korean, Latin
  (136 characters, 2,720 images);
* test: the alphabets only in ``small2`` -- Japanese_(katakana), Sanskrit, Tagalog
  (106 characters, 2,120 images).
"""
from __future__ import annotations

import hashlib
import zipfile
from collections import defaultdict
from pathlib import Path

from broadface.data.base import Transform
from broadface.data.zipfolder import ZipFolder

ZIP_NAMES = ("images_background_small1.zip", "images_background_small2.zip")
TRAIN_ALPHABETS = ("Balinese", "Early_Aramaic", "Greek", "Korean", "Latin")
SPLITS = ("train", "test", "all")


def _alphabet_members(zip_path: Path) -> dict[str, list[str]]:
    """alphabet -> sorted PNG member names (``<top>/<alphabet>/<character>/<file>.png``)."""
    out: dict[str, list[str]] = defaultdict(list)
    with zipfile.ZipFile(zip_path) as zf:
        for name in zf.namelist():
            parts = name.split("/")
            if len(parts) == 4 and parts[3].lower().endswith(".png"):
                out[parts[1]].append(name)
    return {a: sorted(m) for a, m in out.items()}


def _fingerprint(zip_path: Path, members: list[str]) -> str:
    """Hash of an alphabet's relative names and bytes (to find byte-identical duplicates)."""
    h = hashlib.sha256()
    with zipfile.ZipFile(zip_path) as zf:
        for m in members:
            h.update(m.split("/", 1)[1].encode() + b"\0")
            h.update(zf.read(m))
    return h.hexdigest()


def omniglot_index(root: str | Path) -> dict[str, tuple[Path, list[str]]]:
    """alphabet -> (zip, members) over both zips, byte-identical duplicates counted once.

    Raises ValueError if two zips hold different alphabets under the same name."""
    root = Path(root)
    found: dict[str, tuple[Path, list[str]]] = {}
    for zname in ZIP_NAMES:
        zpath = root / zname
        if not zpath.is_file():
            raise FileNotFoundError(f"Omniglot zip {zpath} not found")
        for alphabet, members in _alphabet_members(zpath).items():
            if alphabet not in found:
                found[alphabet] = (zpath, members)
                continue
            first = found[alphabet]
            if _fingerprint(*first) != _fingerprint(zpath, members):
                raise ValueError(f"alphabet {alphabet!r} differs between {first[0]} and {zpath}: cannot count it once")
    if not found:
        raise ValueError(f"{root}: no Omniglot PNGs found in {', '.join(ZIP_NAMES)}")
    return dict(sorted(found.items()))


def split_alphabets(alphabets: list[str], split: str = "all") -> list[str]:
    """The sorted alphabets of ``split`` ("train", "test" or "all") among ``alphabets``."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    missing = sorted(set(TRAIN_ALPHABETS) - set(alphabets))
    if missing and split != "all":
        raise ValueError(f"train alphabets {missing} not found in the Omniglot zips")
    if split == "train":
        return sorted(TRAIN_ALPHABETS)
    if split == "test":
        return sorted(a for a in alphabets if a not in TRAIN_ALPHABETS)
    return sorted(alphabets)


def open_omniglot(root: str | Path, split: str = "all", transform: Transform | None = None,
                  on_error: str = "raise") -> ZipFolder:
    """Omniglot characters of ``split`` as a :class:`ZipFolder` (classes sorted by name)."""
    index = omniglot_index(root)
    members: list[tuple[Path, str, str]] = []
    for alphabet in split_alphabets(list(index), split):
        zpath, names = index[alphabet]
        members.extend((zpath, m, "/".join(m.split("/")[1:3])) for m in names)
    classes = sorted({c for _, _, c in members})
    label = {c: i for i, c in enumerate(classes)}
    return ZipFolder([(z, m, label[c]) for z, m, c in members], classes, transform, on_error)
