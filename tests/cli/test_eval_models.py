"""Any embedding model through the same commands: an exported ONNX model against its checkpoint, a model
that wants other preprocessing (flags shown to matter), and an insightface state dict against its conversion."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from torch import nn

from broadface.cli.main import main
from broadface.data.pipeline import Preprocessing
from broadface.eval.verification import evaluate_pairs, lfw_pair_set
from broadface.infer.export import export_onnx
from broadface.models import build_model, recalibrate_batchnorm
from broadface.models.loader import load_model
from tests.helpers import fisher_net, save_backbone

PAIRS = "240"


def _eval(model_path, tmp_path, tag: str, *flags: str) -> tuple[dict, np.ndarray, str]:
    out = tmp_path / f"{tag}.json"
    argv = ["eval", str(model_path), "--lfw", "--max-pairs", PAIRS, "--json", str(out), "--scores",
            str(tmp_path / tag), *flags]
    assert main(argv) == 0
    report = json.loads(out.read_text())
    scores = np.loadtxt(tmp_path / tag / "lfw.csv", delimiter=",", skiprows=1)[:, 2]
    return report, scores, report["model"]["input"]


@pytest.fixture(scope="module")
def faces(lfw_root, tmp_path_factory):
    root = tmp_path_factory.mktemp("faces")
    for name in ("Abdullah_Gul", "Adrien_Brody", "Al_Gore"):
        (root / name).mkdir()
        for f in sorted((lfw_root / "aligned-112x112" / name).iterdir())[:3]:
            shutil.copy(f, root / name / f.name)
    return root


@pytest.fixture(scope="module")
def iresnet(lfw_root):
    """A small iResNet with BatchNorm statistics from real faces (a trained net's are real too)."""
    from broadface.data.pipeline import load_images

    torch.manual_seed(0)
    model = build_model("iresnet", layers=[1, 1, 1, 1], base_width=4, embedding_size=32, input_size=112)
    files = sorted((lfw_root / "aligned-112x112").glob("B*/*.jpg"))[:64]
    return recalibrate_batchnorm(model, [load_images(files[i:i + 16]) for i in range(0, 64, 16)]).eval()


def test_onnx_export_equals_its_checkpoint(iresnet, faces, tmp_path, capsys):
    save_backbone(iresnet, tmp_path / "m.pt")
    assert main(["export", "onnx", str(tmp_path / "m.pt"), str(tmp_path / "m.onnx")]) == 0
    pt, pt_scores, _ = _eval(tmp_path / "m.pt", tmp_path, "pt", "--no-flip")
    ox, ox_scores, ox_input = _eval(tmp_path / "m.onnx", tmp_path, "onnx", "--no-flip")
    assert (pt["model"]["kind"], ox["model"]["kind"]) == ("broadface", "onnx")
    assert ox_input == "112x112 RGB, (x - 127.5) / 127.5"  # size read from the graph, the common conventions
    assert ox["results"]["lfw"]["accuracy"] == pt["results"]["lfw"]["accuracy"]
    np.testing.assert_allclose(ox_scores, pt_scores, atol=1e-4, rtol=0)
    assert np.ptp(pt_scores) > 0.05  # real, varied scores, not a constant output
    for name in ("pt", "onnx"):
        assert main(["embed", str(tmp_path / f"m.{name}" if name == "onnx" else tmp_path / "m.pt"), str(faces),
                     "--out", str(tmp_path / f"{name}.npy")]) == 0
    assert "model: m.onnx (onnx, 32-d" in capsys.readouterr().out
    np.testing.assert_allclose(np.load(tmp_path / "onnx.npy"), np.load(tmp_path / "pt.npy"), atol=1e-4, rtol=0)


class TakesBGRPixels(nn.Module):
    """A model trained the Caffe way: B, G, R channels of raw 0..255 pixels (mean 0, std 1)."""

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base, self.config = base, {"name": "bgr-pixels", "input_size": 112}

    def forward(self, x):
        return self.base(x.flip(1) / 127.5 - 1.0)


def test_other_preprocessing_needs_its_flags(lfw_root, tmp_path, capsys):
    base = fisher_net()
    path = export_onnx(TakesBGRPixels(base), tmp_path / "bgr.onnx", preprocessing=Preprocessing(112, 0, 1, True))
    ps = lfw_pair_set(lfw_root / "pairs.txt", lfw_root / "aligned-112x112", "lfw").subset(int(PAIRS))
    truth = evaluate_pairs(base, ps)  # the underlying model on the inputs it expects
    right, scores, described = _eval(path, tmp_path, "right", "--bgr", "--mean", "0", "--std", "1")
    assert described == "112x112 BGR, (x - 0) / 1"
    assert "bgr.onnx (onnx, 64-d, sha256" in capsys.readouterr().out  # printed with the results
    assert right["results"]["lfw"]["accuracy"] == truth["accuracy"] > 0.7
    np.testing.assert_allclose(scores, truth["scores"], atol=1e-4, rtol=0)
    wrong, _, _ = _eval(path, tmp_path, "defaults")
    rgb, _, _ = _eval(path, tmp_path, "rgb", "--mean", "0", "--std", "1")
    # without the flags the model sees the wrong inputs and is measurably worse
    assert wrong["results"]["lfw"]["accuracy"] < truth["accuracy"] - 0.2
    assert rgb["results"]["lfw"]["accuracy"] < truth["accuracy"] - 0.02


def test_insightface_state_dict_equals_its_conversion(iresnet, tmp_path):
    torch.save({f"module.{k}": v for k, v in iresnet.state_dict().items()}, tmp_path / "backbone.pth")
    assert main(["export", "from-insightface", str(tmp_path / "backbone.pth"), str(tmp_path / "r.pt")]) == 0
    direct, direct_scores, _ = _eval(tmp_path / "backbone.pth", tmp_path, "direct", "--no-flip")
    converted, converted_scores, _ = _eval(tmp_path / "r.pt", tmp_path, "converted", "--no-flip")
    assert (direct["model"]["kind"], converted["model"]["kind"]) == ("insightface", "broadface")
    np.testing.assert_array_equal(direct_scores, converted_scores)
    assert direct["results"] == converted["results"]
    assert load_model(tmp_path / "backbone.pth").config == load_model(tmp_path / "r.pt").config
