"""LFW ``pairs.txt`` (View 2): parse the 10 folds of matched / mismatched pairs.

Format: a header ``<folds> <pairs per side>`` (``10 300``), then per fold ``n`` matched lines
``name i j`` followed by ``n`` mismatched lines ``name1 i name2 j`` (1-based image numbers;
image ``i`` of ``name`` is ``name/name_%04d.jpg``).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class LFWPair:
    fold: int  # 0-based fold index
    same: bool
    name1: str
    num1: int  # 1-based image number
    name2: str
    num2: int

    @property
    def path1(self) -> str:
        """Path of the first image relative to the aligned-image root."""
        return lfw_image_path(self.name1, self.num1)

    @property
    def path2(self) -> str:
        return lfw_image_path(self.name2, self.num2)


def lfw_image_path(name: str, num: int) -> str:
    """``Name/Name_NNNN.jpg`` for 1-based image number ``num``."""
    return f"{name}/{name}_{num:04d}.jpg"


def read_lfw_pairs(pairs_txt: str | os.PathLike) -> list[LFWPair]:
    """All pairs of an LFW ``pairs.txt``, in file order; ValueError naming file:line on bad lines."""
    path = Path(pairs_txt)
    if not path.is_file():
        raise FileNotFoundError(f"LFW pairs file {path} does not exist")
    lines = [ln.split() for ln in path.read_text().splitlines()]
    lines = [(i + 1, f) for i, f in enumerate(lines) if f]  # keep line numbers, drop blank lines
    if not lines:
        raise ValueError(f"{path}: empty file (expected a '<folds> <pairs>' header line)")
    lineno, head = lines[0]
    try:
        folds, per_side = (int(v) for v in head)
    except ValueError:
        got = " ".join(head)
        raise ValueError(f"{path}:{lineno}: header must be '<folds> <pairs per side>', got {got!r}") from None
    body = lines[1:]
    if folds < 1 or per_side < 1 or len(body) != 2 * folds * per_side:
        raise ValueError(f"{path}: header says {folds} folds x 2 x {per_side} pairs = {2 * folds * per_side} "
                         f"lines, found {len(body)}")
    pairs = []
    for k, (lineno, f) in enumerate(body):
        fold, same = k // (2 * per_side), (k % (2 * per_side)) < per_side
        try:
            if same and len(f) == 3:
                pairs.append(LFWPair(fold, True, f[0], int(f[1]), f[0], int(f[2])))
            elif not same and len(f) == 4:
                pairs.append(LFWPair(fold, False, f[0], int(f[1]), f[2], int(f[3])))
            else:
                raise ValueError
        except ValueError:
            want = "'name i j' (matched)" if same else "'name1 i name2 j' (mismatched)"
            raise ValueError(f"{path}:{lineno}: expected {want}, got {' '.join(f)!r}") from None
        if pairs[-1].num1 < 1 or pairs[-1].num2 < 1:
            raise ValueError(f"{path}:{lineno}: image numbers are 1-based, got {' '.join(f)!r}")
    return pairs
