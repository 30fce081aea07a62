"""Every command that writes checks its output paths before any work, with one line naming the path and
the reason; a directory given where a file is expected is named as such (issue 16)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from broadface.cli.main import main
from broadface.models import build_model
from tests.helpers import save_backbone

OMNIGLOT = str(Path(__file__).resolve().parents[2] / "configs" / "omniglot_tinycnn.yaml")
SMALL = ["data.name=omniglot_small", "train.steps=2", "train.batch_size=8", "model.embedding_size=16",
         "model.kwargs={width: 8}", "head.queue_size=16", "data.val_split=null", "train.tensorboard=false"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    return save_backbone(build_model("tinycnn", embedding_size=16, input_size=28, width=8), path)


@pytest.fixture
def places(tmp_path) -> dict[str, Path]:
    """A file, a folder, and a path under a file."""
    (tmp_path / "file.txt").write_text("x")
    (tmp_path / "folder.npy").mkdir()
    return {"file": tmp_path / "file.txt", "dir": tmp_path / "folder.npy", "under": tmp_path / "file.txt" / "x.npy"}


def one_line_error(capsys, argv: list[str], *expected: str) -> str:
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("broadface ") and "Traceback" not in err, err
    for text in expected:
        assert text in err, err
    return err


def test_export_onnx_never_replaces_its_input(ckpt, tmp_path, capsys):
    before = ckpt.read_bytes()
    one_line_error(capsys, ["export", "onnx", ckpt, ckpt], f"output {ckpt}: is the input {ckpt}: writing it would "
                   "replace it")
    link = tmp_path / "same.pt"
    os.link(ckpt, link)  # another name of the same file
    one_line_error(capsys, ["export", "onnx", ckpt, link], "is the input")
    assert ckpt.read_bytes() == before


@pytest.mark.parametrize("where, reason", [("dir", "is a directory, expected a file name"),
                                           ("under", "file.txt is a file, not a folder")])
def test_export_and_import_outputs_are_checked_first(ckpt, places, capsys, where, reason):
    one_line_error(capsys, ["export", "onnx", ckpt, places[where]], reason)
    one_line_error(capsys, ["export", "from-insightface", ckpt, places[where]], reason)


def test_a_read_only_output_file_is_refused(ckpt, tmp_path, capsys):
    target = tmp_path / "model.onnx"
    target.write_bytes(b"keep me")
    target.chmod(0o444)
    one_line_error(capsys, ["export", "onnx", ckpt, target], f"output {target}: is read-only")
    assert target.read_bytes() == b"keep me"


@pytest.mark.parametrize("where, reason", [("dir", "is a directory, expected a file name"),
                                           ("under", "is a file, not a folder")])
def test_embed_out_is_checked_before_embedding(ckpt, small_folder, places, capsys, where, reason):
    one_line_error(capsys, ["embed", ckpt, small_folder, "--out", places[where]], f"--out {places[where]}", reason)


@pytest.mark.parametrize("flag, where, reason", [
    ("--json", "dir", "is a directory, expected a file name"), ("--json", "under", "is a file, not a folder"),
    ("--csv", "dir", "is a directory"), ("--plots", "file", "is a file, expected a folder"),
    ("--scores", "under", "is a file, not a folder"),
])
def test_eval_outputs_are_checked_before_the_evaluation(ckpt, places, capsys, flag, where, reason, monkeypatch):
    import broadface.cli.eval as cli_eval

    monkeypatch.setattr(cli_eval, "_evaluate", lambda *a: pytest.fail("evaluated before checking the outputs"))
    one_line_error(capsys, ["eval", ckpt, "--lfw", flag, places[where]], f"{flag} {places[where]}", reason)


def test_data_pack_identify_and_align_outputs(ckpt, small_folder, places, capsys):
    one_line_error(capsys, ["data", "pack", small_folder, places["under"]], "OUT", "is a file, not a folder")
    one_line_error(capsys, ["data", "pack", small_folder, places["file"]], "is a file, expected a folder")
    probe = next((small_folder / "Al_Gore").iterdir())
    cache = places["dir"].with_suffix(".npz")
    cache.mkdir()
    one_line_error(capsys, ["identify", ckpt, probe, "--gallery", small_folder, "--gallery-cache", cache],
                   f"--gallery-cache {cache}: is a directory")
    one_line_error(capsys, ["align", probe, places["under"]], f"OUT {places['under']}: ", "is a file, not a folder")


@pytest.mark.parametrize("where, reason", [("file", "is a file, expected a folder"),
                                           ("under", "is a file, not a folder")])
def test_train_output_is_checked_before_any_work(places, capsys, where, reason):
    one_line_error(capsys, ["train", OMNIGLOT, *SMALL, f"train.output={places[where]}"],
                   f"train.output {places[where]}", reason)


def test_directories_given_as_files_are_named_as_directories(ckpt, small_folder, tmp_path, capsys):
    image = next((small_folder / "Al_Gore").iterdir())
    one_line_error(capsys, ["embed", small_folder, small_folder, "--out", tmp_path / "e.npy"],
                   f"model {small_folder} is a directory, expected a model file")
    one_line_error(capsys, ["verify", ckpt, image, small_folder], f"image {small_folder} is a directory, expected an "
                   "image file")
    one_line_error(capsys, ["identify", ckpt, small_folder, "--gallery", small_folder], "probe image",
                   "is a directory")
    one_line_error(capsys, ["export", "onnx", small_folder, tmp_path / "m.onnx"], "is a directory")
    one_line_error(capsys, ["train", OMNIGLOT, *SMALL, f"train.output={tmp_path / 'run'}",
                            f"train.resume={small_folder}"], "is a directory, expected a .pt file")


def test_a_read_only_output_folder_is_refused(ckpt, tmp_path, capsys, monkeypatch):
    """Simulated (the tests may run as root, who writes anywhere): the folder refuses writing."""
    import broadface.fileio as fileio

    ro = tmp_path / "ro"
    ro.mkdir()
    real = os.access
    monkeypatch.setattr(fileio.os, "access", lambda p, mode: False if Path(p) == ro else real(p, mode))
    one_line_error(capsys, ["export", "onnx", ckpt, ro / "m.onnx"], f"output {ro / 'm.onnx'}: {ro} is not writable "
                   "(permission denied)")
    one_line_error(capsys, ["train", OMNIGLOT, *SMALL, f"train.output={ro / 'run'}"], f"{ro} is not writable")
    assert not list(ro.iterdir())
