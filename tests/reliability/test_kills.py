"""Kills at the worst moments (SIGKILL from inside, SIGTERM from outside) lose nothing: logs keep their
history, a finished run always has final.pt and summary.json, half-written files are cleaned up, and
every resumed run ends bit-identical to an uninterrupted one. Subprocesses: the slow suite."""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from broadface.models.checkpoint import load_checkpoint
from tests.train.test_trainer import assert_same_state

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
CONFIG = str(REPO / "configs" / "omniglot_tinycnn.yaml")
ARGS = ["data.name=omniglot_small", "train.batch_size=8", "model.embedding_size=16", "model.kwargs={width: 8}",
        "head.queue_size=16", "data.val_split=null", "train.log_every=1", "train.tensorboard=false",
        "train.checkpoint_every=2", "train.keep_checkpoints=0", "train.steps=6"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def run(point: str, out: Path, *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "tests.reliability.killer", point, CONFIG, *ARGS, f"train.output={out}", *extra,
           "--no-progress"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO, env=env or ENV)


def rows(path: Path) -> list[dict]:
    return list(csv.DictReader(path.open()))


def same_final(a: Path, b: Path) -> None:
    x, y = load_checkpoint(a / "final.pt"), load_checkpoint(b / "final.pt")
    for key in ("backbone", "head", "optimizer", "rng"):
        assert_same_state(x[key], y[key], key)


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("straight") / "run"
    done = run("none", out)
    assert done.returncode == 0, done.stderr
    return out


def test_a_kill_while_the_resume_opens_the_logs_keeps_their_history(tmp_path, straight):
    out = tmp_path / "run"
    first = run("mid-checkpoint", out)  # dies writing the step-4 checkpoint: rows 1..4, checkpoint at 2
    assert first.returncode == -signal.SIGKILL
    before = rows(out / "train.csv")
    assert [r["step"] for r in before] == ["1", "2", "3", "4"]
    killed = run("log-write", out, "train.resume=auto")  # the resume dies as it first changes a log
    assert killed.returncode == -signal.SIGKILL
    kept = rows(out / "train.csv")
    assert [r["step"] for r in kept] in (["1", "2"], ["1", "2", "3", "4"]) and kept == before[:len(kept)]
    done = run("none", out, "train.resume=auto")
    assert done.returncode == 0, done.stderr
    assert [r["step"] for r in rows(out / "train.csv")] == [str(s) for s in range(1, 7)]
    assert rows(out / "train.csv")[:2] == before[:2]
    same_final(straight, out)


def test_a_kill_before_final_pt_is_published_is_completed_by_the_resume(tmp_path, straight):
    out = tmp_path / "run"
    killed = run("publish", out)
    assert killed.returncode == -signal.SIGKILL
    assert (out / "checkpoints" / "step_0000006.pt").exists() and not (out / "final.pt").exists()
    done = run("none", out, "train.resume=auto")
    assert done.returncode == 0, done.stderr
    assert (out / "final.pt").exists() and (out / "final.pt").samefile(out / "checkpoints" / "step_0000006.pt") \
        or (out / "final.pt").read_bytes() == (out / "checkpoints" / "step_0000006.pt").read_bytes()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["step"] == 6
    same_final(straight, out)


def test_the_temp_file_of_a_checkpoint_killed_midway_is_removed_and_the_run_resumes_exactly(tmp_path, straight):
    out = tmp_path / "run"
    killed = run("mid-checkpoint", out)
    assert killed.returncode == -signal.SIGKILL
    temps = list((out / "checkpoints").glob(".step_0000004.pt.*.tmp"))
    assert len(temps) == 1 and sorted(p.name for p in (out / "checkpoints").glob("*.pt")) == ["step_0000002.pt"]
    done = run("none", out, "train.resume=auto")
    assert done.returncode == 0, done.stderr
    assert not list(out.rglob("*.tmp")) and temps[0].name in (out / "train.log").read_text()
    same_final(straight, out)


def test_sigterm_stops_the_cli_with_a_checkpoint_and_a_message(tmp_path, straight):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "broadface", "train", CONFIG, *ARGS, f"train.output={out}", "train.steps=600",
           "train.checkpoint_every=0", "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=ENV)
    deadline = time.monotonic() + 120
    while not (out / "train.csv").exists() or len(rows(out / "train.csv")) < 3:
        assert time.monotonic() < deadline and proc.poll() is None, proc.stderr.read() if proc.poll() else "slow"
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    summary = json.loads((out / "summary.json").read_text())
    step = summary["step"]
    assert summary["status"] == "interrupted" and summary["signal"] == "SIGTERM" and 3 <= step < 600
    assert f"stopped by SIGTERM after step {step}: checkpoint {out / 'checkpoints' / f'step_{step:07d}.pt'}" in err
    assert load_checkpoint(out / "checkpoints" / f"step_{step:07d}.pt")["step"] == step
    assert int(rows(out / "train.csv")[-1]["step"]) == step  # logged up to the step it stopped after
