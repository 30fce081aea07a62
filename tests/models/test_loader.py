"""``load_model``: one loader for broadface checkpoints, ONNX models and insightface state dicts."""
from __future__ import annotations

import hashlib
import warnings

import pytest
import torch
from torch import nn

from broadface.data.pipeline import Preprocessing
from broadface.infer.export import export_onnx
from broadface.models import build_model, recalibrate_batchnorm
from broadface.models.loader import LoadedModel, detect_format, input_size_of, load_model, preprocessing_of, wrap_module
from tests.helpers import save_backbone


def calibrated(name="iresnet", size=28, **kw):
    torch.manual_seed(0)
    kw = kw or dict(layers=[1, 1, 1, 1], base_width=8)
    model = build_model(name, input_size=size, embedding_size=32, **kw)
    return recalibrate_batchnorm(model, [torch.rand(8, 3, size, size) * 2 - 1]).eval()


@pytest.fixture(scope="module")
def model():
    return calibrated()


@pytest.fixture(scope="module")
def files(model, tmp_path_factory):
    d = tmp_path_factory.mktemp("models")
    save_backbone(model, d / "ckpt.pt")
    torch.save(model.state_dict(), d / "backbone.pth")  # arcface_torch's format: a bare state dict
    torch.save({f"module.{k}": v for k, v in model.state_dict().items()}, d / "ddp.pth",
               _use_new_zipfile_serialization=False)  # legacy (pickle) layout, DDP prefix
    export_onnx(model, d / "model.onnx")
    return d


def _onnx(module: nn.Module, path, dummy, dynamic: dict):
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), (dummy,), path, input_names=["data"], output_names=["embedding"],
                          dynamic_axes=dynamic, dynamo=False)
    return path


def test_each_format_is_recognised_from_the_file(files, model):
    x = torch.rand(3, 3, 28, 28) * 2 - 1
    with torch.no_grad():
        ref = model(x)
    for name, kind in [("ckpt.pt", "broadface"), ("backbone.pth", "insightface"), ("ddp.pth", "insightface"),
                       ("model.onnx", "onnx")]:
        loaded = load_model(files / name, input_size=28 if name.endswith(".pth") else None)
        assert isinstance(loaded, LoadedModel) and loaded.kind == kind, name
        assert loaded.preprocessing == Preprocessing(28) and loaded.dim == 32, name
        assert loaded.sha256 == hashlib.sha256((files / name).read_bytes()).hexdigest()
        assert not loaded.training
        with torch.no_grad():
            out = loaded(x)
        tol = 1e-4 if kind == "onnx" else 0.0
        torch.testing.assert_close(out, ref, atol=tol, rtol=tol, msg=name)
    assert detect_format(files / "ckpt.pt") == detect_format(files / "ddp.pth") == "torch"
    assert detect_format(files / "model.onnx") == "onnx"


def test_normalisation_overrides_and_summary(files):
    loaded = load_model(files / "model.onnx", mean=(0, 0, 0), std=255, bgr=True)
    assert loaded.preprocessing == Preprocessing(28, (0, 0, 0), (255, 255, 255), True)
    assert loaded.summary().startswith("model.onnx (onnx, 32-d, sha256 ")
    assert loaded.summary().endswith("28x28 BGR, (x - 0) / 255")
    d = loaded.describe()
    assert d["preprocessing"] == {"size": [28, 28], "mean": [0.0] * 3, "std": [255.0] * 3, "bgr": True}
    assert d["kind"] == "onnx" and len(d["sha256"]) == 64


def test_insightface_at_another_input_size(tmp_path):
    src = calibrated("iresnet", 56, layers=[1, 1, 1, 1], base_width=8)
    torch.save(src.state_dict(), tmp_path / "b.pth")
    loaded = load_model(tmp_path / "b.pth", input_size=56)
    assert loaded.kind == "insightface" and loaded.preprocessing.size == (56, 56)
    with pytest.raises(ValueError, match=r"b.pth.*does not fit input_size=112.*--input-size S, 49 <= S <= 64"):
        load_model(tmp_path / "b.pth")


def test_onnx_without_a_fixed_size_needs_input_size(tmp_path):
    net = build_model("tinycnn", input_size=28, embedding_size=16, width=8)
    path = _onnx(net, tmp_path / "dyn.onnx", torch.zeros(1, 3, 28, 28), {"data": {0: "n", 2: "h", 3: "w"}})
    with pytest.raises(ValueError, match=r"dyn.onnx.*no fixed height and width.*--input-size"):
        load_model(path)
    loaded = load_model(path, input_size=36)
    assert loaded.preprocessing.size == (36, 36) and loaded(torch.zeros(2, 3, 36, 36)).shape == (2, 16)


def test_onnx_inputs_that_are_not_face_images_are_refused(tmp_path):
    class NHWC(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = build_model("tinycnn", input_size=28, embedding_size=16, width=8)

        def forward(self, x):
            return self.net(x.permute(0, 3, 1, 2))

    path = _onnx(NHWC(), tmp_path / "nhwc.onnx", torch.zeros(1, 28, 28, 3), {"data": {0: "n"}})
    with pytest.raises(ValueError, match=r"nhwc.onnx: input data is NHWC; an N x 3 x H x W \(NCHW\)"):
        load_model(path)


def test_fixed_size_mismatch_and_bad_files(files, tmp_path):
    with pytest.raises(ValueError, match="--input-size 56 but the ONNX input is fixed at 28x28"):
        load_model(files / "model.onnx", input_size=56)
    with pytest.raises(ValueError, match="--input-size 56 but the broadface model was built for 28"):
        load_model(files / "ckpt.pt", input_size=56)
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"GIF89a....")
    with pytest.raises(ValueError, match="junk.bin: not a model file broadface can read"):
        load_model(junk)
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, other)
    with pytest.raises(ValueError, match="other.pt: a torch file, but neither a broadface checkpoint"):
        load_model(other)
    with pytest.raises(ValueError, match="not a broadface checkpoint"):
        load_model(files / "backbone.pth", format="broadface")
    with pytest.raises(ValueError, match="ckpt.pt: not an insightface iResNet state dict"):
        load_model(files / "ckpt.pt", format="insightface")
    with pytest.raises(ValueError, match="not a loadable ONNX model"):
        load_model(files / "ckpt.pt", format="onnx")
    with pytest.raises(FileNotFoundError, match="nowhere.onnx does not exist"):
        load_model(tmp_path / "nowhere.onnx")
    with pytest.raises(ValueError, match="format must be"):
        load_model(files / "ckpt.pt", format="tflite")


def test_a_pickle_with_code_is_refused_not_run(tmp_path):
    import pickle

    evil = tmp_path / "evil.pt"
    marker = tmp_path / "ran"
    with open(evil, "wb") as f:  # unpickling this would call os.system("touch ran")
        pickle.dump(type("Evil", (), {"__reduce__": lambda self: (__import__("os").system, (f"touch {marker}",))})(),
                    f, protocol=2)
    with pytest.raises(ValueError, match="evil.pt: not a loadable torch file"):
        load_model(evil)
    assert not marker.exists()


def test_input_size_lookup_and_wrapping(model):
    assert input_size_of(model) == 28 and preprocessing_of(model) == Preprocessing(28)
    wrapped = wrap_module(model)
    assert (wrapped.kind, wrapped.dim, wrapped.sha256, input_size_of(wrapped)) == ("module", 32, "", 28)
    with pytest.raises(ValueError, match="Linear has no config\\['input_size'\\].*pass input_size"):
        input_size_of(nn.Linear(2, 2))
    assert wrap_module(nn.Flatten(), Preprocessing(4)).dim == 48  # read from a forward pass
    with torch.no_grad():
        assert torch.equal(wrapped(torch.ones(1, 3, 28, 28)), model(torch.ones(1, 3, 28, 28)))
