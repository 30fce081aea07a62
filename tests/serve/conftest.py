"""Fixtures of the service tests: a tiny real checkpoint, real LFW faces, servers that are always stopped."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from broadface.models import build_model
from tests.helpers import save_backbone
from tests.serve.harness import Server

pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install 'broadface[serve]'")


@pytest.fixture(scope="session")
def tiny_model() -> torch.nn.Module:
    """A randomly initialised iResNet (one block per stage, width 8, 56x56 input, 32-d): instant to run."""
    torch.manual_seed(0)
    return build_model("iresnet", layers=[1, 1, 1, 1], base_width=8, embedding_size=32, input_size=56).eval()


@pytest.fixture(scope="session")
def tiny_ckpt(tiny_model, tmp_path_factory) -> Path:
    return save_backbone(tiny_model, tmp_path_factory.mktemp("model") / "tiny.pt")


@pytest.fixture(scope="session")
def other_ckpt(tmp_path_factory) -> Path:
    torch.manual_seed(1)
    model = build_model("iresnet", layers=[1, 1, 1, 1], base_width=8, embedding_size=32, input_size=56)
    return save_backbone(model, tmp_path_factory.mktemp("model") / "other.pt")


@pytest.fixture(scope="session")
def aligned(lfw_root: Path) -> Path:
    return lfw_root / "aligned-112x112"


@pytest.fixture(scope="session")
def raw(lfw_root: Path) -> Path:
    return lfw_root / "raw-sample"


@pytest.fixture
def servers(tmp_path):
    """``servers(model, gallery, *args)`` -> a started :class:`Server`; every one is killed at the end."""
    started: list[Server] = []

    def start(model, gallery, *args, **kw) -> Server:
        server = Server(model, gallery, tmp_path, *args, **kw)
        started.append(server)
        return server.start()

    yield start
    for s in started:
        s.kill()
