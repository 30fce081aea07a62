"""Loading insightface-format backbone weights (plain state dict, weights_only)."""
from __future__ import annotations

import pickle

import pytest
import torch

from broadface.models import build_model
from broadface.models.insightface import iresnet_config_from_state_dict, load_insightface


def test_roundtrip_with_ddp_prefix(tmp_path):
    torch.manual_seed(0)
    src = build_model("iresnet18", input_size=56).eval()
    path = tmp_path / "backbone.pth"
    torch.save({f"module.{k}": v for k, v in src.state_dict().items()}, path)
    model = load_insightface(path, input_size=56)
    assert model.config == {"name": "iresnet18", "embedding_size": 512, "input_size": 56}
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        assert torch.equal(model(x), src(x))


def test_config_inference_for_unnamed_depth_and_width():
    with torch.device("meta"):
        src = build_model("iresnet", layers=[1, 2, 3, 1], base_width=16, embedding_size=128)
    cfg = iresnet_config_from_state_dict(src.state_dict())
    assert cfg == {"name": "iresnet", "embedding_size": 128, "input_size": 112,
                   "layers": [1, 2, 3, 1], "base_width": 16}
    with pytest.raises(ValueError, match="input_size=56"):
        iresnet_config_from_state_dict(src.state_dict(), input_size=56)


def test_rejects_non_weight_files(tmp_path):
    evil = tmp_path / "evil.pth"
    with open(evil, "wb") as f:
        pickle.dump({"x": print}, f, protocol=2)  # arbitrary object: must not be unpickled
    with pytest.raises(ValueError, match="evil.pth"):
        load_insightface(evil)
    other = tmp_path / "other.pth"
    torch.save({"weight": torch.zeros(3)}, other)
    with pytest.raises(ValueError, match="not an insightface iResNet"):
        load_insightface(other)
    with pytest.raises(FileNotFoundError):
        load_insightface(tmp_path / "missing.pth")
