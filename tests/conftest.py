"""Fixtures shared by every test package (helpers in ``tests/helpers.py``)."""
from __future__ import annotations

from pathlib import Path

import pytest

from broadface.data.folder import FaceFolder
from broadface.paths import data_root
from tests.helpers import NAMES, PixelNet, celeba_faces, copy_identities, tiny_config


@pytest.fixture(scope="session")
def root() -> Path:
    """The real data root (``../shared/data``); the test is skipped where it is absent."""
    try:
        return data_root()
    except FileNotFoundError as err:
        pytest.skip(f"real data not available: {err}")


@pytest.fixture(scope="session")
def lfw_dir(root: Path) -> Path:
    return root / "lfw" / "aligned-112x112"


@pytest.fixture(scope="session")
def lfw_root(root: Path) -> Path:
    return root / "lfw"


@pytest.fixture
def small_folder(lfw_dir: Path, tmp_path: Path) -> Path:
    """Three real LFW identities x 3 images, copied to tmp."""
    return copy_identities(lfw_dir, tmp_path / "faces", NAMES)


@pytest.fixture(scope="session")
def faces(root) -> FaceFolder:
    """8 CelebA identities x 6 real images, 28x28, random flip: 6 batches of 8 per epoch."""
    return celeba_faces(0, 8, 6, flip=True)


@pytest.fixture(scope="session")
def val_faces(root) -> FaceFolder:
    """6 other identities x 4 images, no augmentation."""
    return celeba_faces(200, 6, 4, flip=False)


@pytest.fixture
def make_config():
    """``make_config(output_dir_or_None, "key=value", ...)`` -> a tiny tinycnn Config."""
    return tiny_config


@pytest.fixture
def make_faces():
    """``make_faces(first, ids, per_id, flip)`` -> a small real FaceFolder."""
    return celeba_faces


@pytest.fixture()
def pixelnet():
    return PixelNet()
