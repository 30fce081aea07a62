"""SIGTERM and SIGINT stop a run at a step boundary with a checkpoint and a message; the run resumes from it
exactly as if it had never stopped. A second signal acts at once."""
from __future__ import annotations

import os
import signal

import pytest

from broadface.models.checkpoint import load_checkpoint
from broadface.train.trainer import train
from tests.train.test_trainer import assert_same_state


def send_at(step: int, signum: int):
    def callback(kind, record):
        if kind == "train" and record["step"] == step:
            os.kill(os.getpid(), signum)  # delivered while the loop runs, like a kill from outside
    return callback


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_after_the_step_with_a_checkpoint_and_resumes_exactly(tmp_path, faces, make_config, signum):
    opts = ["head.queue_size=20", "train.steps=6", "train.checkpoint_every=4"]
    before = signal.getsignal(signum)
    straight = train(make_config(tmp_path / "a", *opts), train_set=faces, progress=False)
    stopped = train(make_config(tmp_path / "b", *opts), train_set=faces, progress=False,
                    callbacks=[send_at(3, signum)])
    name = signal.Signals(signum).name
    assert stopped.summary["status"] == "interrupted" and stopped.summary["signal"] == name
    assert stopped.summary["step"] == 3 and [r["step"] for r in stopped.history] == [1, 2, 3]
    assert stopped.summary["checkpoint"].endswith("step_0000003.pt") and stopped.checkpoint is None
    assert f"stopped by {name} after step 3" in (tmp_path / "b" / "train.log").read_text()
    assert signal.getsignal(signum) == before  # the handlers are put back
    resumed = train(make_config(tmp_path / "b", *opts, "train.resume=auto"), train_set=faces, progress=False)
    assert [r["step"] for r in resumed.history] == [4, 5, 6]
    a, b = load_checkpoint(straight.checkpoint), load_checkpoint(resumed.checkpoint)
    for key in ("backbone", "head", "optimizer", "rng"):
        assert_same_state(a[key], b[key], key)


def test_a_second_sigint_interrupts_at_once():
    from broadface.train.signals import StopSignals

    before = signal.getsignal(signal.SIGINT)  # default_int_handler; SIG_IGN where started in the background
    with StopSignals() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested() and stop.name == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before  # restored
