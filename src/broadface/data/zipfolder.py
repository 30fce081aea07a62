"""``ZipFolder``: labelled images read straight out of zip archives, never extracted.

Each process opens its own ``zipfile.ZipFile`` handles on first use (handles are dropped when
the dataset is pickled and reopened after a fork), so DataLoader workers never share a file
offset.
"""
from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Sequence

from PIL import Image

from broadface.data.base import ImageDataset, Transform, check_classes
from broadface.data.images import ImageDecodeError, decode_image


class ZipFolder(ImageDataset):
    """Dataset over ``members = [(zip path, member name, label), ...]`` with ``classes[label]``."""

    def __init__(
        self,
        members: Sequence[tuple[str | os.PathLike, str, int]],
        classes: Sequence[str],
        transform: Transform | None = None,
        on_error: str = "raise",
    ):
        if not members:
            raise ValueError("ZipFolder: empty member list")
        self.classes = check_classes(classes, "ZipFolder")
        self.members = [(os.fspath(z), m, int(label)) for z, m, label in members]
        bad = next((m for m in self.members if not 0 <= m[2] < len(self.classes)), None)
        if bad is not None:
            raise ValueError(f"{bad[0]}:{bad[1]}: label {bad[2]} outside the {len(self.classes)} classes")
        super().__init__(len(self.members), transform, on_error)
        self.samples = [(f"{z}:{m}", label) for z, m, label in self.members]
        self._targets = [label for _, _, label in self.members]
        self.origin = ", ".join(sorted({Path(z).name for z, _, _ in self.members}))
        self._zips: dict[str, zipfile.ZipFile] = {}
        self._pid = os.getpid()

    @property
    def targets(self) -> list[int]:
        return self._targets

    def __len__(self) -> int:
        return len(self.members)

    def source(self, index: int) -> str:
        return self.samples[index][0]

    def _zip(self, path: str) -> zipfile.ZipFile:
        if self._pid != os.getpid():  # forked: never reuse the parent's handles
            self._zips, self._pid = {}, os.getpid()
        zf = self._zips.get(path)
        if zf is None:
            zf = self._zips[path] = zipfile.ZipFile(path)
        return zf

    def _read(self, index: int) -> tuple[Image.Image, int]:
        path, member, label = self.members[index]
        name = f"{path}:{member}"
        try:
            data = self._zip(path).read(member)
        except (OSError, KeyError, zipfile.BadZipFile) as err:
            raise ImageDecodeError(f"{name}: cannot read zip member ({type(err).__name__}: {err})") from None
        return decode_image(data, name), label

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_zips"] = {}
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._pid = os.getpid()
