"""``broadface serve``: the command line, its threshold sources and its one-line errors."""
from __future__ import annotations

import json

import pytest
import torch

from broadface.cli.main import build_parser, main
from broadface.models import build_model
from tests.helpers import save_backbone

pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install 'broadface[serve]'")


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    out = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = build_model("iresnet", layers=[1, 1, 1, 1], base_width=8, embedding_size=32, input_size=56)
        out.append(save_backbone(model, tmp_path_factory.mktemp("ckpt") / f"model{seed}.pt"))
    return out


def config(*argv):
    from broadface.cli.serve import config_from_args

    return config_from_args(build_parser().parse_args(["serve", *argv]))


def test_a_gallery_refuses_another_model_with_one_line(ckpts, tmp_path, capsys):
    from broadface.serve.config import ServeConfig
    from broadface.serve.service import FaceService

    db = tmp_path / "g.db"
    FaceService.open(ServeConfig(model=str(ckpts[0]), gallery=str(db))).close()
    assert main(["serve", str(ckpts[1]), "--gallery", str(db)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"broadface serve: error: gallery {db} was built with model 'model0.pt' (broadface")
    assert "not 'model1.pt'" in err and len(err.splitlines()) == 1
    assert main(["serve", str(ckpts[0]), "--gallery", str(db), "--no-flip"]) == 2
    assert "preprocessing" in capsys.readouterr().err


def test_the_threshold_calibrated_by_broadface_eval_is_served(ckpts, lfw_root, tmp_path):
    report = tmp_path / "eval.json"
    assert main(["eval", str(ckpts[0]), "--pairs", str(lfw_root / "pairs.txt"), "--images",
                 str(lfw_root / "aligned-112x112"), "--max-pairs", "40", "--folds", "2", "--json", str(report)]) == 0
    threshold = json.loads(report.read_text())["results"]["pairs"]["cosine_threshold"]
    c = config(str(ckpts[0]), "--gallery", "g.db", "--threshold-from", str(report))
    assert c.threshold == threshold and c.threshold_source == f"from {report} (results.pairs.cosine_threshold)"


def test_threshold_sources_and_api_key(ckpts, tmp_path, monkeypatch):
    report = tmp_path / "eval.json"
    report.write_text(json.dumps({"lfw": {"cosine_threshold": 0.4125, "accuracy": 0.8}}))
    c = config(str(ckpts[0]), "--gallery", "g.db", "--threshold-from", str(report))
    assert c.threshold == 0.4125 and "lfw.cosine_threshold" in c.threshold_source
    assert config(str(ckpts[0]), "--gallery", "g.db", "--threshold", "0.5").threshold == 0.5
    assert config(str(ckpts[0]), "--gallery", "g.db").threshold == 0.3
    assert c.host == "127.0.0.1" and c.loopback and c.api_key is None
    key = tmp_path / "key"
    key.write_text("s3cret-key-value\n")
    assert config(str(ckpts[0]), "--gallery", "g.db", "--api-key-file", str(key)).api_key == "s3cret-key-value"
    monkeypatch.setenv("BROADFACE_API_KEY", "from-the-environment")
    assert config(str(ckpts[0]), "--gallery", "g.db").api_key == "from-the-environment"
    assert config(str(ckpts[0]), "--gallery", "g.db", "--max-image-mb", "0.5").max_image_bytes == 1 << 19


@pytest.mark.parametrize("argv,message", [
    (["{m}", "--gallery", "{tmp}/g.db", "--threshold", "1.5"], "not a cosine similarity in [-1, 1]"),
    (["{tmp}/nope.pt", "--gallery", "{tmp}/g.db"], "nope.pt does not exist"),
    (["{m}", "--gallery", "{tmp}"], "is a directory"),
    (["{m}", "--gallery", "{tmp}/notes.txt"], "notes.txt: not an SQLite database"),
    (["{m}", "--gallery", "{tmp}/g.db", "--api-key-file", "{tmp}/empty"], "is empty"),
    (["{m}", "--gallery", "{tmp}/g.db", "--api-key-file", "{tmp}/missing"], "missing does not exist"),
    (["{m}", "--gallery", "{tmp}/g.db", "--threshold-from", "{tmp}/notes.txt"], "not a JSON file"),
    (["{m}", "--gallery", "{tmp}/g.db", "--max-files", "0"], "max_files must be >= 1"),
    (["{m}", "--gallery", "{tmp}/g.db", "--port", "70000"], "port 70000"),
])
def test_bad_arguments_are_one_line_errors(ckpts, tmp_path, capsys, argv, message):
    (tmp_path / "notes.txt").write_text("not a database, not JSON " * 50)
    (tmp_path / "empty").write_text("")
    args = [a.format(m=ckpts[0], tmp=tmp_path) for a in argv]
    assert main(["serve", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("broadface serve: error:") and message in err and len(err.splitlines()) == 1
    assert (tmp_path / "notes.txt").read_text() == "not a database, not JSON " * 50
