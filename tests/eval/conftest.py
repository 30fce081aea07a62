"""Fixtures: the real LFW folder and an instant deterministic model (see pixelnet.py)."""
from __future__ import annotations

import pytest

from broadface.paths import data_root
from tests.eval.pixelnet import PixelNet


@pytest.fixture(scope="session")
def lfw_root():
    return data_root() / "lfw"


@pytest.fixture()
def pixelnet():
    return PixelNet()
