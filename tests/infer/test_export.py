"""ONNX export: names, dynamic batch, metadata, atomic write, parity vs onnxruntime."""
from __future__ import annotations

import copy
import json

import numpy as np
import onnx
import pytest
import torch
from PIL import Image

from broadface.infer.export import check_onnx_parity, export_onnx, onnx_session
from broadface.models import build_model, recalibrate_batchnorm
from broadface.paths import data_root


def calibrated(name: str, size: int, **kwargs) -> torch.nn.Module:
    """Random weights, but realistic BN running stats (as a trained net has)."""
    torch.manual_seed(0)
    model = build_model(name, input_size=size, **kwargs)
    return recalibrate_batchnorm(model, [torch.rand(8, 3, size, size) * 2 - 1 for _ in range(2)])


@pytest.fixture(scope="module")
def mbf():
    return calibrated("mobilefacenet", 112, embedding_size=128)


@pytest.fixture(scope="module")
def mbf_onnx(mbf, tmp_path_factory):
    return export_onnx(mbf, tmp_path_factory.mktemp("onnx") / "mbf.onnx")


def test_graph_io_names_dynamic_batch_and_metadata(mbf, mbf_onnx):
    proto = onnx.load(mbf_onnx)
    assert [i.name for i in proto.graph.input] == ["data"]
    assert [o.name for o in proto.graph.output] == ["embedding"]
    assert proto.opset_import[0].version == 17
    assert not any(n.op_type == "BatchNormalization" for n in proto.graph.node)
    meta = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(meta["broadface.config"]) == mbf.config
    session = onnx_session(mbf_onnx)
    for batch in (1, 5):
        out = session.run(["embedding"], {"data": np.zeros((batch, 3, 112, 112), np.float32)})[0]
        assert out.shape == (batch, 128)
    assert [p.name for p in mbf_onnx.parent.iterdir()] == ["mbf.onnx"]  # no temp files left


def test_parity_on_real_lfw_faces(mbf, mbf_onnx):
    root = data_root() / "lfw" / "aligned-112x112"
    files = sorted(root.glob("A*/*.jpg"))[:6]
    assert len(files) == 6
    x = np.stack([np.asarray(Image.open(f).convert("RGB"), np.float32) for f in files])
    x = torch.from_numpy((x - 127.5) / 127.5).permute(0, 3, 1, 2).contiguous()
    assert check_onnx_parity(mbf, mbf_onnx, inputs=x) < 1e-5


def test_parity_detects_a_different_model(mbf, mbf_onnx):
    other = copy.deepcopy(mbf)
    assert check_onnx_parity(other, mbf_onnx, n=2) < 1e-5
    with torch.no_grad():
        other.fc.weight.mul_(-1.0)
    assert check_onnx_parity(other, mbf_onnx, n=2) > 0.1


@pytest.mark.parametrize("fold", [True, False])
def test_iresnet_small_input_export(tmp_path, fold):
    model = calibrated("iresnet", 56, layers=[1, 1, 2, 1], base_width=16, embedding_size=64)
    path = export_onnx(model, tmp_path / "r.onnx", fold_bn=fold)  # input size from model.config
    assert check_onnx_parity(model, path, n=4) < 1e-5
    assert model.training is False and model.bn2.__class__.__name__ == "BatchNorm2d"  # model untouched


def test_static_batch_export(tmp_path):
    model = calibrated("tinycnn", 28, embedding_size=32)
    path = export_onnx(model, tmp_path / "t.onnx", input_size=28, dynamic_batch=False)
    dims = onnx.load(path).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims] == [1, 3, 28, 28]
    assert check_onnx_parity(model, path, n=3) < 1e-5  # runs image by image


def test_bad_inputs_are_clear_errors(tmp_path, mbf):
    with pytest.raises(ValueError, match="112 x 112"):
        export_onnx(mbf, tmp_path / "x.onnx", input_size=96)
    assert list(tmp_path.iterdir()) == []  # nothing half-written
    with pytest.raises(ValueError, match="opset"):
        export_onnx(mbf, tmp_path / "x.onnx", opset=17, dynamo=True)
    with pytest.raises(FileNotFoundError):
        check_onnx_parity(mbf, tmp_path / "missing.onnx")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="junk.onnx"):
        check_onnx_parity(mbf, junk)


def test_non_finite_embeddings_are_reported_not_compared(tmp_path):
    """A model whose outputs are NaN (as an untrained iResNet's overflow can be) makes parity refuse, not print 0."""
    model = calibrated("tinycnn", 28, embedding_size=32)
    path = export_onnx(model, tmp_path / "t.onnx")
    assert check_onnx_parity(model, path, n=2) < 1e-5
    with torch.no_grad():
        next(model.parameters()).fill_(float("nan"))
    with pytest.raises(ValueError, match="non-finite embeddings"):
        check_onnx_parity(model, path, n=2)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["iresnet50", "mobilefacenet"])
def test_full_size_parity(tmp_path, name):
    model = calibrated(name, 112)
    path = export_onnx(model, tmp_path / f"{name}.onnx")
    assert check_onnx_parity(model, path, n=8) < 1e-5
