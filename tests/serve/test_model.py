"""The service's model door: each kind of file embeds real faces as the reference convention says."""
from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from broadface.data.images import read_rgb
from broadface.models import build_model
from broadface.serve.model import FaceModel
from tests.serve.harness import reference_embeddings


@pytest.fixture(scope="module")
def crops(aligned):
    return sorted((aligned / "Al_Gore").iterdir())[:3] + sorted((aligned / "Adrien_Brody").iterdir())[:2]


def test_checkpoint_embeds_like_the_reference_and_reports_itself(tiny_model, tiny_ckpt, crops):
    m = FaceModel.load(tiny_ckpt)
    emb = m.embed([read_rgb(p) for p in crops])
    assert emb.dtype == np.float32 and emb.shape == (5, 32)
    np.testing.assert_allclose(emb, reference_embeddings(tiny_model, crops, 56), atol=1e-5)
    assert m.kind == "broadface" and m.dim == 32
    assert m.fingerprint == hashlib.sha256(tiny_ckpt.read_bytes()).hexdigest()
    assert m.preprocessing == {"size": [56, 56], "mean": [127.5] * 3, "std": [127.5] * 3, "bgr": False, "flip": True}


def test_flip_and_bgr_options_change_what_is_computed(tiny_ckpt, crops):
    rgb = [read_rgb(p) for p in crops[:2]]
    plain = FaceModel.load(tiny_ckpt).embed(rgb)
    assert not np.allclose(FaceModel.load(tiny_ckpt, flip=False).embed(rgb), plain, atol=1e-3)
    bgr = FaceModel.load(tiny_ckpt, bgr=True)
    np.testing.assert_allclose(bgr.embed([im[:, :, ::-1] for im in rgb]), plain, atol=1e-6)
    assert bgr.preprocessing["bgr"] is True


@pytest.mark.parametrize("dynamic", [True, False])
def test_onnx_export_embeds_like_its_checkpoint(tiny_model, tiny_ckpt, crops, tmp_path, dynamic):
    pytest.importorskip("onnxruntime")
    from broadface.infer.export import export_onnx

    path = export_onnx(tiny_model, tmp_path / "tiny.onnx", dynamic_batch=dynamic)  # static: batch of 2, run in chunks
    m = FaceModel.load(path)
    assert m.kind == "onnx" and m.dim == 32 and m.input_size == (56, 56)
    rgb = [read_rgb(p) for p in crops]
    np.testing.assert_allclose(m.embed(rgb), FaceModel.load(tiny_ckpt).embed(rgb), atol=1e-4)


def test_insightface_state_dict_is_served_at_the_given_input_size(tmp_path, crops):
    torch.manual_seed(2)
    net = build_model("iresnet", layers=[1, 1, 1, 1], base_width=8, embedding_size=24, input_size=112).eval()
    path = tmp_path / "backbone.pth"
    torch.save(net.state_dict(), path)
    m = FaceModel.load(path, input_size=112)
    assert m.kind == "insightface" and m.dim == 24
    np.testing.assert_allclose(m.embed([read_rgb(p) for p in crops]), reference_embeddings(net, crops, 112),
                               atol=1e-5)


def test_files_that_are_not_models_are_refused_by_name(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        FaceModel.load(tmp_path / "nope.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="junk.pt"):
        FaceModel.load(junk)
    other = tmp_path / "list.pt"
    torch.save([1, 2, 3], other)
    with pytest.raises(ValueError, match="list.pt: a torch file, but neither a broadface checkpoint"):
        FaceModel.load(other)
    bad_onnx = tmp_path / "bad.onnx"
    bad_onnx.write_bytes(b"\x00\x01garbage")
    with pytest.raises(ValueError, match="bad.onnx: not a model file broadface can read"):
        FaceModel.load(bad_onnx)
