"""Omniglot (Lake, Salakhutdinov & Tenenbaum 2015), read from its zips without extracting.

Two named sets (:mod:`broadface.data.sets`), class = ``"<alphabet>/<character>"``, 20 drawers each:

* ``omniglot`` -- the FULL set with the standard split: train = ``images_background.zip``
  (30 alphabets, 964 characters, 19,280 images), test = ``images_evaluation.zip`` (20 other
  alphabets, 659 characters, 13,180 images). The many-class set: a batch of 128 shows at most
  ~13 % of the training classes.
* ``omniglot_small`` -- the official "small" background subsets, for fast tests.
  ``images_background_small1.zip`` and ``images_background_small2.zip`` hold 5 alphabets each;
  Greek and Latin are in both, byte-identical, and are counted once: 8 alphabets, 242 characters,
  4,840 images. Train = the five alphabets of ``small1`` (Balinese, Early_Aramaic, Greek, Korean,
  Latin; 136 characters), test = the three only in ``small2`` (Japanese_(katakana), Sanskrit,
  Tagalog; 106 characters).

Both splits are by alphabet, so no character (and no alphabet) is on both sides. The rotation
classes of the few-shot literature (each character at 0/90/180/270° is its own class) are
:class:`broadface.data.rotations.RotatedClasses`, ``open_dataset(..., rotations=4)``.
"""
from __future__ import annotations

import hashlib
import zipfile
from collections import defaultdict
from pathlib import Path

from broadface.data.base import Transform
from broadface.data.zipfolder import ZipFolder

FULL_ZIPS = {"train": "images_background.zip", "test": "images_evaluation.zip"}
SMALL_ZIPS = ("images_background_small1.zip", "images_background_small2.zip")
TRAIN_ALPHABETS = ("Balinese", "Early_Aramaic", "Greek", "Korean", "Latin")  # small set's train side
SPLITS = ("train", "test", "all")


def _alphabet_members(zip_path: Path) -> dict[str, list[str]]:
    """alphabet -> sorted PNG member names (``<top>/<alphabet>/<character>/<file>.png``)."""
    out: dict[str, list[str]] = defaultdict(list)
    try:
        with zipfile.ZipFile(zip_path) as zf:
            names = zf.namelist()
    except zipfile.BadZipFile as err:
        raise ValueError(f"{zip_path}: not a readable zip archive ({err})") from None
    for name in names:
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
    """The small set: alphabet -> (zip, members) over both small zips, byte-identical duplicates once.

    Raises ValueError if two zips hold different alphabets under the same name."""
    root = Path(root)
    found: dict[str, tuple[Path, list[str]]] = {}
    for zname in SMALL_ZIPS:
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
        raise ValueError(f"{root}: no Omniglot PNGs found in {', '.join(SMALL_ZIPS)}")
    return dict(sorted(found.items()))


def split_alphabets(alphabets: list[str], split: str = "all") -> list[str]:
    """The sorted alphabets of ``split`` ("train", "test" or "all") of the small set among ``alphabets``."""
    _check_split(split)
    missing = sorted(set(TRAIN_ALPHABETS) - set(alphabets))
    if missing and split != "all":
        raise ValueError(f"train alphabets {missing} not found in the Omniglot zips")
    if split == "train":
        return sorted(TRAIN_ALPHABETS)
    if split == "test":
        return sorted(a for a in alphabets if a not in TRAIN_ALPHABETS)
    return sorted(alphabets)


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def _folder(members: list[tuple[Path, str, str]], transform: Transform | None, on_error: str) -> ZipFolder:
    """``[(zip, member, class name)]`` -> a ZipFolder with classes sorted by name."""
    classes = sorted({c for _, _, c in members})
    label = {c: i for i, c in enumerate(classes)}
    return ZipFolder([(z, m, label[c]) for z, m, c in members], classes, transform, on_error)


def _class_name(member: str) -> str:
    return "/".join(member.split("/")[1:3])  # "<alphabet>/<character>"


def open_omniglot_small(root: str | Path, split: str = "all", transform: Transform | None = None,
                        on_error: str = "raise") -> ZipFolder:
    """The small set's characters of ``split`` as a :class:`ZipFolder` (classes sorted by name)."""
    index = omniglot_index(root)
    members: list[tuple[Path, str, str]] = []
    for alphabet in split_alphabets(list(index), split):
        zpath, names = index[alphabet]
        members.extend((zpath, m, _class_name(m)) for m in names)
    return _folder(members, transform, on_error)


def has_full_omniglot(root: str | Path) -> bool:
    """True when both full zips (background and evaluation) are under ``root``."""
    return all((Path(root) / z).is_file() for z in FULL_ZIPS.values())


def open_omniglot_full(root: str | Path, split: str = "all", transform: Transform | None = None,
                       on_error: str = "raise") -> ZipFolder:
    """The full set: train = background (964 characters), test = evaluation (659), all = both."""
    _check_split(split)
    root = Path(root)
    missing = [str(root / z) for z in FULL_ZIPS.values() if not (root / z).is_file()]
    if missing:
        raise FileNotFoundError(f"full Omniglot zip(s) not found: {', '.join(missing)} (the standard "
                                f"background/evaluation split); the small subsets are the set 'omniglot_small'")
    sides = ("train", "test") if split == "all" else (split,)
    members: list[tuple[Path, str, str]] = []
    for side in sides:
        zpath = root / FULL_ZIPS[side]
        by_alphabet = _alphabet_members(zpath)
        if not by_alphabet:
            raise ValueError(f"{zpath}: no Omniglot PNGs (<top>/<alphabet>/<character>/<file>.png) found")
        members.extend((zpath, m, _class_name(m)) for a in sorted(by_alphabet) for m in by_alphabet[a])
    return _folder(members, transform, on_error)
