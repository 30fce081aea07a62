"""Fixtures: the real data root and small folders copied (to tmp) from real LFW images."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from broadface.paths import data_root


@pytest.fixture(scope="session")
def root() -> Path:
    try:
        return data_root()
    except FileNotFoundError as err:
        pytest.skip(f"real data not available: {err}")


@pytest.fixture(scope="session")
def lfw_dir(root: Path) -> Path:
    return root / "lfw" / "aligned-112x112"


def copy_identities(lfw_dir: Path, dst: Path, names: list[str], per_class: int = 3) -> Path:
    """``dst/<name>/<file>`` with the first ``per_class`` real images of each LFW identity."""
    for name in names:
        (dst / name).mkdir(parents=True)
        for f in sorted((lfw_dir / name).iterdir())[:per_class]:
            shutil.copy(f, dst / name / f.name)
    return dst


NAMES = ["Abdullah_Gul", "Adrien_Brody", "Al_Gore"]  # >= 3 images each


@pytest.fixture
def small_folder(lfw_dir: Path, tmp_path: Path) -> Path:
    return copy_identities(lfw_dir, tmp_path / "faces", NAMES)
