"""A run owns its output folder: locked while it lives, another run's results never replaced or mixed
unless asked to, stale temporary files removed, logs appended, a bad path refused before any work."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from broadface.models.checkpoint import load_checkpoint
from broadface.train.trainer import Trainer, train


def test_a_second_run_into_a_live_runs_folder_is_refused_naming_the_owner(tmp_path, faces, make_config):
    first = Trainer(make_config(tmp_path), train_set=faces, progress=False)  # holds the folder from here on
    with pytest.raises(ValueError, match=rf"in use by another run \(pid {os.getpid()} on .* since .*\)"):
        Trainer(make_config(tmp_path, "train.seed=1"), train_set=faces, progress=False)
    first.fit()  # the refused run changed nothing: the first one trains and publishes as usual
    assert load_checkpoint(tmp_path / "final.pt")["config"]["train"]["seed"] == 0
    assert not (tmp_path / ".lock").exists()  # released at the end of fit


def test_the_lock_is_held_by_another_process_until_it_dies(tmp_path, faces, make_config):
    code = ("import sys, time; from broadface.train.trainer import Trainer; from tests.helpers import tiny_config, "
            "celeba_faces; Trainer(tiny_config(sys.argv[1]), train_set=celeba_faces(0, 8, 6, True), progress=False); "
            "print('locked', flush=True); time.sleep(60)")
    owner = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                             cwd=Path(__file__).resolve().parents[2])
    try:
        assert owner.stdout.readline().strip() == "locked"
        with pytest.raises(ValueError, match=rf"in use by another run \(pid {owner.pid} "):
            Trainer(make_config(tmp_path), train_set=faces, progress=False)
    finally:
        owner.kill()
        owner.wait()
    train(make_config(tmp_path), train_set=faces, progress=False)  # a dead owner's lock is free (flock)


def test_a_folder_holding_only_final_pt_is_not_overwritten(tmp_path, faces, make_config):
    train(make_config(tmp_path, "train.steps=2"), train_set=faces, progress=False)
    before = (tmp_path / "final.pt").read_bytes()
    for name in ("checkpoints", "summary.json", "train.csv", "config.yaml", "train.log"):
        p = tmp_path / name
        p.unlink() if p.is_file() else __import__("shutil").rmtree(p)
    for resume in ([], ["train.resume=auto"]):  # auto has nothing to resume: a finished result is no restart
        with pytest.raises(ValueError, match=r"holds the results of another run \(final.pt\).*--overwrite"):
            Trainer(make_config(tmp_path, "train.seed=1", *resume), train_set=faces, progress=False)
    assert (tmp_path / "final.pt").read_bytes() == before


def test_overwrite_replaces_exactly_the_earlier_runs_results(tmp_path, faces, make_config):
    train(make_config(tmp_path, "train.steps=2"), train_set=faces, progress=False)
    (tmp_path / "notes.txt").write_text("mine")
    result = train(make_config(tmp_path, "train.steps=4", "train.overwrite=true"), train_set=faces, progress=False)
    assert load_checkpoint(result.checkpoint)["step"] == 4
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [f"step_000000{s}.pt" for s in (2, 4)]
    assert [r["step"] for r in csv.DictReader((tmp_path / "train.csv").open())] == ["1", "2", "3", "4"]
    assert (tmp_path / "notes.txt").read_text() == "mine"  # not a result of ours: left alone
    with pytest.raises(ValueError, match="train.overwrite=True: expected false when train.resume is set"):
        make_config(tmp_path, "train.overwrite=true", "train.resume=auto").validate()


def test_resume_auto_restarts_a_run_killed_before_its_first_checkpoint_only_if_it_is_the_same_run(
        tmp_path, faces, make_config):
    class Crash(Exception):
        pass

    def crash(kind, record):
        raise Crash

    with pytest.raises(Crash):  # dies at step 1, before the first checkpoint (every 2 steps)
        train(make_config(tmp_path), train_set=faces, progress=False, callbacks=[crash])
    assert not list((tmp_path / "checkpoints").glob("*.pt"))
    with pytest.raises(ValueError, match="holds the results of another run"):
        Trainer(make_config(tmp_path, "train.resume=auto", "train.seed=5"), train_set=faces, progress=False)
    result = train(make_config(tmp_path, "train.resume=auto"), train_set=faces, progress=False)
    assert result.summary["status"] == "completed"
    assert [r["step"] for r in csv.DictReader((tmp_path / "train.csv").open())] == [str(s) for s in range(1, 7)]


def test_resume_from_another_folders_checkpoint_into_a_folder_with_results_is_refused(tmp_path, faces, make_config):
    train(make_config(tmp_path / "a"), train_set=faces, progress=False)
    train(make_config(tmp_path / "b"), train_set=faces, progress=False)
    with pytest.raises(ValueError, match=r"train.resume=.*a/checkpoints/step_0000002.pt is not one of its checkpoints"):
        Trainer(make_config(tmp_path / "b", f"train.resume={tmp_path / 'a/checkpoints/step_0000002.pt'}"),
                train_set=faces, progress=False)


def test_stale_temporary_files_are_removed_at_start(tmp_path, faces, make_config):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)  # a process that has exited
    (tmp_path / "checkpoints").mkdir(parents=True)
    stale = tmp_path / "checkpoints" / f".step_0000002.pt.{pid}.abc123.tmp"
    stale.write_bytes(b"half a checkpoint")
    live = tmp_path / f".summary.json.{os.getpid()}.x1.tmp"  # ours: still being written
    live.write_text("{")
    train(make_config(tmp_path), train_set=faces, progress=False)
    assert not stale.exists() and live.exists()
    assert stale.name in (tmp_path / "train.log").read_text()


def test_train_log_is_appended_across_resumes(tmp_path, faces, make_config):
    train(make_config(tmp_path, "train.steps=2"), train_set=faces, progress=False)
    first = (tmp_path / "train.log").read_text()
    train(make_config(tmp_path, "train.steps=4", "train.resume=auto", "train.resume_allow=[train.steps]"),
          train_set=faces, progress=False)
    text = (tmp_path / "train.log").read_text()
    assert text.startswith(first) and "resumed from step 2" in text and "train.steps 2 -> 4" in text


@pytest.mark.parametrize("where, reason", [
    ("file", "is a file, expected a folder"),
    ("file/sub", "is a file, not a folder"),
])
def test_a_bad_output_path_is_one_line_before_any_work(tmp_path, faces, make_config, where, reason):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match=f"train.output {tmp_path / where}: .*{reason}"):
        Trainer(make_config(tmp_path / where), train_set=faces, progress=False)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_output_parent_is_refused(tmp_path, faces, make_config):
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o555)
    with pytest.raises(ValueError, match="is not writable"):
        Trainer(make_config(ro / "run"), train_set=faces, progress=False)


def test_run_folder_results_and_release(tmp_path):
    from broadface.train.outdir import RunFolder

    folder = RunFolder(tmp_path / "run")
    folder.claim()
    (tmp_path / "run" / "checkpoints").mkdir()
    assert folder.results() == []  # an empty checkpoints/ is no result
    (tmp_path / "run" / "summary.json").write_text(json.dumps({}))
    assert folder.results() == ["summary.json"]
    assert (tmp_path / "run" / ".lock").read_text().startswith(f"pid {os.getpid()} ")
    folder.release()
    assert not (tmp_path / "run" / ".lock").exists()
    again = RunFolder(tmp_path / "run")
    again.claim()
    again.release()
