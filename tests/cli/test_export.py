"""`broadface export onnx` / `broadface export from-insightface` end to end."""
from __future__ import annotations

import onnx
import torch

from broadface.cli.main import main
from broadface.models import build_model, recalibrate_batchnorm
from broadface.models.checkpoint import load_backbone
from tests.helpers import save_backbone


def make_checkpoint(path, name="tinycnn", size=28, **kwargs):
    torch.manual_seed(0)
    model = build_model(name, input_size=size, embedding_size=32, **kwargs)
    recalibrate_batchnorm(model, [torch.rand(8, 3, size, size) * 2 - 1])
    save_backbone(model, path)
    return model


def test_export_onnx_prints_parity(tmp_path, capsys):
    make_checkpoint(tmp_path / "m.pt", "iresnet", 28, layers=[1, 1, 1, 1], base_width=8)
    rc = main(["export", "onnx", str(tmp_path / "m.pt"), str(tmp_path / "m.onnx"), "--opset", "16"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "parity:" in out
    diff = float(out.split("=")[-1])
    assert diff < 1e-5
    assert onnx.load(tmp_path / "m.onnx").opset_import[0].version == 16


def _batchnorm_nodes(path) -> int:
    return sum(n.op_type == "BatchNormalization" for n in onnx.load(path).graph.node)


def test_export_onnx_no_fold_keeps_batchnorm_in_the_graph(tmp_path, capsys):
    """tinycnn: the exporter fuses conv -> BN on its own; the final BatchNorm1d stays a graph node unless
    folded (docs/models.md: 0 / 1)."""
    make_checkpoint(tmp_path / "m.pt")
    assert main(["export", "onnx", str(tmp_path / "m.pt"), str(tmp_path / "kept.onnx"), "--no-fold-bn"]) == 0
    assert "fold_bn=False" in capsys.readouterr().out
    assert main(["export", "onnx", str(tmp_path / "m.pt"), str(tmp_path / "folded.onnx")]) == 0
    assert _batchnorm_nodes(tmp_path / "kept.onnx") == 1
    assert _batchnorm_nodes(tmp_path / "folded.onnx") == 0


def test_export_reads_an_insightface_state_dict_and_refuses_onnx(tmp_path, capsys):
    src = make_checkpoint(tmp_path / "m.pt", "iresnet", 28, layers=[1, 1, 1, 1], base_width=8)
    torch.save(src.state_dict(), tmp_path / "backbone.pth")
    assert main(["export", "onnx", str(tmp_path / "backbone.pth"), str(tmp_path / "b.onnx"), "--parity-n", "0"]) == 2
    assert "does not fit input_size=112" in capsys.readouterr().err  # 28-px weights: the size is needed
    assert main(["export", "onnx", str(tmp_path / "backbone.pth"), str(tmp_path / "b.onnx"), "--input-size", "28"]) == 0
    assert "input 28x28" in capsys.readouterr().out
    assert main(["export", "onnx", str(tmp_path / "m.pt"), str(tmp_path / "m.onnx"), "--parity-n", "0"]) == 0
    assert main(["export", "onnx", str(tmp_path / "m.onnx"), str(tmp_path / "again.onnx")]) == 2
    assert "already an ONNX model" in capsys.readouterr().err


def test_bad_checkpoint_and_size_are_one_line_errors(tmp_path, capsys):
    (tmp_path / "bad.pt").write_bytes(b"garbage")
    assert main(["export", "onnx", str(tmp_path / "bad.pt"), str(tmp_path / "o.onnx")]) == 2
    assert "bad.pt" in capsys.readouterr().err
    assert main(["export", "onnx", str(tmp_path / "nope.pt"), str(tmp_path / "o.onnx")]) == 2
    assert "does not exist" in capsys.readouterr().err
    make_checkpoint(tmp_path / "m.pt", "iresnet", 28, layers=[1, 1, 1, 1], base_width=8)
    assert main(["export", "onnx", str(tmp_path / "m.pt"), str(tmp_path / "o.onnx"), "--input-size", "56"]) == 2
    assert "--input-size 56 but the broadface model was built for 28" in capsys.readouterr().err
    assert not (tmp_path / "o.onnx").exists()


def test_from_insightface_then_export(tmp_path, capsys):
    src = build_model("iresnet18", input_size=56).eval()
    torch.save(src.state_dict(), tmp_path / "backbone.pth")
    args = ["export", "from-insightface", str(tmp_path / "backbone.pth"), str(tmp_path / "r18.pt"),
            "--input-size", "56"]
    assert main(args) == 0, capsys.readouterr().err
    model = load_backbone(tmp_path / "r18.pt")
    assert model.config == {"name": "iresnet18", "embedding_size": 512, "input_size": 56}
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        assert torch.equal(model(x), src(x))
