"""The training step syncs with the host only where it must: never between log lines in one process."""
from __future__ import annotations

import traceback

import pytest
import torch

from broadface.train.trainer import Trainer

CONVERSIONS = ("item", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__")


class SyncCounter:
    """Records every Tensor -> Python conversion (each one waits for the device) with its calling function."""

    def __init__(self, monkeypatch):
        self.calls: list[tuple[str, str]] = []
        for name in CONVERSIONS:
            original = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self._wrap(name, original))

    def _wrap(self, name, original):
        def counted(t, *args, **kwargs):
            caller = traceback.extract_stack(limit=2)[0].name
            self.calls.append((name, caller))
            return original(t, *args, **kwargs)
        return counted


OPTIONS = {  # every step variant that runs without a sync in one process
    "broadface": ["head.queue_size=16", "optim.clip_grad=5.0"],
    "grad_accum": ["head.queue_size=16", "train.grad_accum=2", "train.batch_size=4"],
    "micro_batch": ["head.queue_size=16", "train.micro_batch=3", "train.amp=bf16"],
    "diagnostics": ["head.queue_size=16", "head.diagnostics=true", "head.storage=full", "optim.name=adamw"],
    "plain": ["head.queue_size=0", "optim.name=lars"],
}


@pytest.mark.parametrize("name", list(OPTIONS))
def test_steps_between_logs_never_sync(faces, make_config, monkeypatch, name):
    tr = Trainer(make_config(None, *OPTIONS[name], "train.steps=5"), train_set=faces, progress=False)
    tr.train_step()  # the first step creates optimizer state
    batches = [[next(tr.stream) for _ in range(tr.cfg.train.grad_accum)] for _ in range(3)]
    counter = SyncCounter(monkeypatch)
    stats = [tr.step_fn(b, step) for step, b in enumerate(batches, start=2)]
    monkeypatch.undo()
    # allowed: the label check, once per step, on the loader's CPU labels; AdamW's step count, which
    # torch.optim keeps in host memory (torch.optim.adamw._get_value), also on CUDA
    assert [c for c in counter.calls if c[1] not in ("check_labels", "_get_value")] == []
    assert [c for c in counter.calls if c[1] == "check_labels"] == [("__bool__", "check_labels")] * 3
    assert all(s.batch_loss.requires_grad is False and s.finite.dtype == torch.bool for s in stats)
    assert stats[-1].as_dict()["queue_fill"] == (16 if "queue_size=16" in OPTIONS[name][0] else 0)


def test_the_counter_sees_a_sync(faces, make_config, monkeypatch):
    """Guard for the test above: a step that converts its loss is counted."""
    tr = Trainer(make_config(None, "head.queue_size=16"), train_set=faces, progress=False)
    tr.train_step()
    counter = SyncCounter(monkeypatch)
    float(tr.train_step().batch_loss)
    monkeypatch.undo()
    assert ("__float__", "test_the_counter_sees_a_sync") in counter.calls


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["broadface", "micro_batch", "diagnostics"])
def test_cuda_steps_do_not_synchronize(faces, make_config, name):
    """On CUDA, torch's sync debug mode turns any synchronising call of the step into an error."""
    tr = Trainer(make_config(None, *OPTIONS[name], "train.steps=5", "train.device=cuda"), train_set=faces,
                 progress=False)
    tr.train_step()
    batches = [[next(tr.stream) for _ in range(tr.cfg.train.grad_accum)] for _ in range(3)]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step, b in enumerate(batches, start=2):
            tr.step_fn(b, step)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    tr.check_finite()
