"""Errors that were tracebacks, silent wrong results or misleading messages (issue 16), each now one precise
line: non-finite models, a full disk, a corrupt image in a loader worker, config and checkpoint mistakes."""
from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
import torch

from broadface.cli.main import main
from broadface.models import build_model
from tests.cli.test_paths import OMNIGLOT, SMALL, one_line_error
from tests.helpers import save_backbone


@pytest.fixture(scope="module")
def nan_ckpt(tmp_path_factory) -> Path:
    model = build_model("tinycnn", embedding_size=16, input_size=28, width=8)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
    return save_backbone(model, tmp_path_factory.mktemp("nan") / "nan.pt")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = build_model("tinycnn", embedding_size=16, input_size=28, width=8)
    return save_backbone(model, tmp_path_factory.mktemp("ok") / "ok.pt")


def test_a_model_with_nan_weights_is_refused_by_every_model_command(nan_ckpt, small_folder, tmp_path, capsys):
    image = next((small_folder / "Al_Gore").iterdir())
    for argv in (["embed", nan_ckpt, small_folder, "--out", tmp_path / "e.npy"],
                 ["verify", nan_ckpt, image, image, "--json"],
                 ["identify", nan_ckpt, image, "--gallery", small_folder],
                 ["eval", nan_ckpt, "--retrieval", small_folder]):
        one_line_error(capsys, argv, f"model {nan_ckpt}: ", "hold NaN or inf (e.g. body.0.weight)")
    assert not (tmp_path / "e.npy").exists()


def test_a_non_finite_embedding_is_an_error_not_a_result(ckpt, small_folder, tmp_path, capsys, monkeypatch):
    """A model with finite weights whose output is not finite (an ONNX graph, an overflow) is stopped too."""
    from broadface.models import loader

    real = loader.load_model

    def overflowing(*args, **kwargs):
        model = real(*args, **kwargs)
        model.net.register_forward_hook(lambda m, i, out: out * float("inf"))
        return model

    monkeypatch.setattr(loader, "load_model", overflowing)
    one_line_error(capsys, ["embed", ckpt, small_folder, "--out", tmp_path / "e.npy"],
                   "non-finite embeddings (NaN or inf) for 9 of 9 images")
    assert not (tmp_path / "e.npy").exists()


def test_a_full_disk_is_one_line_naming_the_file(ckpt, small_folder, tmp_path, capsys, monkeypatch):
    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr("broadface.fileio.os.fsync", full)
    out = tmp_path / "e.npy"
    one_line_error(capsys, ["embed", ckpt, small_folder, "--out", out], f"cannot write {out}: No space left on device")
    one_line_error(capsys, ["train", OMNIGLOT, *SMALL, f"train.output={tmp_path / 'run'}", "--no-progress"],
                   "cannot write", "No space left on device")
    assert not [p for p in tmp_path.rglob("*.tmp")]  # no temporary file left behind


def test_a_corrupt_image_in_a_loader_worker_is_one_line(small_folder, tmp_path, capsys):
    broken = small_folder / "Al_Gore" / "Al_Gore_9999.jpg"
    broken.write_bytes(b"not a jpeg")
    one_line_error(capsys, ["train", OMNIGLOT, *SMALL, "data.name=folder", f"data.root={small_folder}",
                            "data.num_workers=2", "train.batch_size=2", "train.steps=6", "head.queue_size=0",
                            f"train.output={tmp_path / 'run'}", "--no-progress"], f"{broken}: cannot decode image")


def test_config_mistakes_are_named(tmp_path, capsys):
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes("model:\n  name: tinycnn  # caf\xe9\n".encode("latin-1"))
    one_line_error(capsys, ["train", bad], f"{bad}: not UTF-8 text (byte 0xe9")
    dup = tmp_path / "dup.yaml"
    dup.write_text("model:\n  name: tinycnn\nhead:\n  margin: 0.3\nmodel:\n  embedding_size: 8\n")
    one_line_error(capsys, ["train", dup], "line 5, column 1: duplicate key 'model' (first at line 1)")
    one_line_error(capsys, ["train", OMNIGLOT, "head.margin=-0.1"], "config head.margin=-0.1: expected a margin >= 0")
    one_line_error(capsys, ["train", OMNIGLOT, "head.loss=cosface", "head.margin=-0.1"], "head.margin=-0.1")
    one_line_error(capsys, ["train", OMNIGLOT, "data.test_fold=3"], "data.test_fold=3", "with data.name=lfw")


def test_mapping_keys_and_flags_anywhere(tmp_path, capsys):
    assert main(["train", OMNIGLOT, "model.kwargs.width=4", "--print-config"]) == 0
    assert "width: 4" in capsys.readouterr().out
    assert main(["train", OMNIGLOT, "--print-config", "optim.lr=0.01", "model.kwargs.layers=[1,1]"]) == 0
    out = capsys.readouterr().out
    assert "lr: 0.01" in out and "layers:\n    - 1\n    - 1" in out
    one_line_error(capsys, ["train", OMNIGLOT, "--print-config", "optim.lrr=1"], "unknown config key 'optim.lrr' "
                   "(valid here: name, lr")
    with pytest.raises(SystemExit):  # argparse still rejects stray arguments elsewhere
        main(["verify", "a", "b", "c", "extra"])
    assert "unrecognized arguments: extra" in capsys.readouterr().err


def test_checkpoint_mistakes_are_named(ckpt, small_folder, tmp_path, capsys):
    from broadface.fileio import atomic_torch_save, load_torch

    c = load_torch(ckpt)
    misfit = atomic_torch_save({**c, "model": {**c["model"], "width": 16}}, tmp_path / "misfit.pt")
    image = next((small_folder / "Al_Gore").iterdir())
    for argv in (["embed", misfit, small_folder, "--out", tmp_path / "e.npy"], ["verify", misfit, image, image],
                 ["identify", misfit, image, "--gallery", small_folder], ["eval", misfit, "--retrieval", small_folder],
                 ["export", "onnx", misfit, tmp_path / "m.onnx"]):
        one_line_error(capsys, argv, "body.0.weight: [8, 3, 3, 3] in the checkpoint, [16, 3, 3, 3] in the model")
    pickled = tmp_path / "object.pt"
    torch.save({"format": "broadface", "thing": Path("x")}, pickled)  # an object outside the allow-list
    err = one_line_error(capsys, ["embed", pickled, small_folder, "--out", tmp_path / "e.npy"], "never unpickled")
    assert "weights_only" not in err
    for obj, kind in ((torch.zeros(3), "Tensor"), ([1, 2], "list")):
        torch.save(obj, tmp_path / "w.pt")
        one_line_error(capsys, ["export", "from-insightface", tmp_path / "w.pt", tmp_path / "o.pt"],
                       f"the file holds a {kind}, not a dict of tensors")


def test_insightface_conv1_shape_is_blamed_on_conv1(tmp_path, capsys):
    model = build_model("iresnet", layers=[1, 1, 1, 1], base_width=8, embedding_size=16, input_size=112)
    state = model.state_dict()
    state["conv1.weight"] = torch.zeros(16, 3, 3, 3)
    torch.save(state, tmp_path / "backbone.pth")
    one_line_error(capsys, ["export", "from-insightface", tmp_path / "backbone.pth", tmp_path / "o.pt"],
                   "conv1.weight has shape [16, 3, 3, 3], which does not fit the network after it")


def test_written_files_follow_the_umask(ckpt, tmp_path, capsys, faces, make_config):
    from broadface.train.trainer import train

    old = os.umask(0o022)
    try:
        assert main(["export", "onnx", str(ckpt), str(tmp_path / "m.onnx"), "--parity-n", "0"]) == 0
        result = train(make_config(tmp_path / "run", "train.steps=2"), train_set=faces, progress=False)
    finally:
        os.umask(old)
    capsys.readouterr()
    for path in (tmp_path / "m.onnx", result.checkpoint, tmp_path / "run" / "summary.json"):
        assert path.stat().st_mode & 0o777 == 0o644, path


def test_verify_json_is_valid_json(ckpt, small_folder, capsys):
    image = next((small_folder / "Al_Gore").iterdir())
    assert main(["verify", str(ckpt), str(image), str(image), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["same"] is True
