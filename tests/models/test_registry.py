"""build_model registry: names, errors, config round trip."""
from __future__ import annotations

import io

import pytest
import torch
import yaml

from broadface.models import available_models, build_model


def test_available_models_lists_the_zoo():
    names = available_models()
    for name in ("iresnet18", "iresnet50", "iresnet100", "iresnet200", "iresnet120", "iresnet1200",
                 "mobilefacenet", "resnet50", "tinycnn", "iresnet"):
        assert name in names


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match="iresnet50.*mobilefacenet"):
        build_model("resnet9000")


def test_unknown_option_and_fixed_option_rejected():
    with pytest.raises(ValueError, match="unknown option.*widht"):
        build_model("mobilefacenet", widht=3)
    with pytest.raises(ValueError, match="layers"):
        build_model("iresnet50", layers=[1, 1, 1, 1])  # depth is fixed by the name
    with pytest.raises(ValueError, match="layers="):
        build_model("iresnet")


@pytest.mark.parametrize("name", [n for n in available_models() if n != "iresnet"] + ["iresnet"])
def test_config_rebuilds_same_architecture(name):
    kwargs = {"layers": [1, 2, 3]} if name == "iresnet" else {}
    with torch.device("meta"):
        model = build_model(name, embedding_size=64, **kwargs)
        again = build_model(**model.config)
    assert {k: v.shape for k, v in model.state_dict().items()} == \
           {k: v.shape for k, v in again.state_dict().items()}
    # config is plain data: YAML- and weights_only-checkpoint friendly
    assert yaml.safe_load(yaml.safe_dump(model.config)) == model.config
    buf = io.BytesIO()
    torch.save({"model": model.config}, buf)
    buf.seek(0)
    assert torch.load(buf, weights_only=True)["model"] == model.config


def test_forward_contract_raw_embeddings():
    model = build_model("tinycnn", input_size=28, embedding_size=24).eval()
    with torch.no_grad():
        out = model(torch.rand(5, 3, 28, 28) * 2 - 1)
    assert out.shape == (5, 24) and out.dtype == torch.float32
    assert not torch.allclose(out.norm(dim=1), torch.ones(5))  # raw, not L2-normalised
