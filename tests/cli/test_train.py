"""``broadface train``: runs a preset end to end, prints the config, reports bad keys plainly."""
from __future__ import annotations

import csv
from pathlib import Path

import yaml

from broadface.cli.main import main
from broadface.models.checkpoint import load_checkpoint
from broadface.train.config import load_config

OMNIGLOT = str(Path(__file__).resolve().parents[2] / "configs" / "omniglot_tinycnn.yaml")
SMALL = ["train.steps=3", "train.batch_size=8", "model.embedding_size=16", "model.kwargs={width: 8}",
         "head.queue_size=16", "data.val_split=null", "train.log_every=1", "train.tensorboard=false"]


def test_train_preset_end_to_end(tmp_path, capsys):
    assert main(["train", OMNIGLOT, *SMALL, f"train.output={tmp_path}", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "done: step 3" in out and f"checkpoint: {tmp_path / 'final.pt'}" in out
    ckpt = load_checkpoint(tmp_path / "final.pt")
    assert ckpt["step"] == 3 and ckpt["model"]["name"] == "tinycnn" and ckpt["head"]["queue._extra_state"]["fill"] == 16
    assert ckpt["num_classes"] == 964  # the full Omniglot background set
    # resume=auto on a finished run: nothing left to do, same checkpoint
    assert main(["train", OMNIGLOT, *SMALL, f"train.output={tmp_path}", "train.resume=auto", "--no-progress"]) == 0


def test_print_config_round_trips(tmp_path, capsys):
    assert main(["train", OMNIGLOT, "optim.lr=0.01", "--print-config"]) == 0
    printed = capsys.readouterr().out
    (tmp_path / "c.yaml").write_text(printed)
    cfg = load_config(tmp_path / "c.yaml")
    assert cfg.optim.lr == 0.01 and cfg.model.name == "tinycnn"
    assert yaml.safe_load(printed)["optim"]["lr"] == 0.01


def test_bad_key_is_a_one_line_error(capsys):
    assert main(["train", OMNIGLOT, "optim.lerning_rate=0.1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("broadface train: error:") and "optim.lerning_rate" in err and "Traceback" not in err
    assert main(["train", "no/such.yaml"]) == 2
    assert "no/such.yaml does not exist" in capsys.readouterr().err


def test_a_resume_says_so_marks_its_partial_interval_and_overwrite_is_explicit(tmp_path, capsys):
    from tests.cli.test_paths import one_line_error

    args = ["train", OMNIGLOT, *SMALL, "train.steps=6", "train.log_every=3", "train.checkpoint_every=2",
            "train.keep_checkpoints=0", f"train.output={tmp_path}", "--no-progress"]
    steps = lambda: [(r["step"], r["interval_steps"]) for r in csv.DictReader((tmp_path / "train.csv").open())]  # noqa
    assert main(args) == 0
    capsys.readouterr()
    one_line_error(capsys, args, f"train.output {tmp_path}", "holds the results of another run", "--overwrite")
    ckpt = tmp_path / "checkpoints" / "step_0000004.pt"
    assert main([*args, f"train.resume={ckpt}"]) == 0
    assert f"resumed from step 4 ({ckpt})" in capsys.readouterr().out
    assert steps() == [("3", "3"), ("6", "2")]  # the first row after the resume averages steps 5-6 only
    assert "resumed from step 4" in (tmp_path / "train.log").read_text()
    assert main([*args, "--overwrite"]) == 0
    assert steps() == [("3", "3"), ("6", "3")]
