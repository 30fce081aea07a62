"""The trainer on 2 gloo processes equals one process with the same global batch, and its
checkpoints resume on another number of ranks (2 -> 1, 1 -> 2), with ZeRO, micro-batching,
Partial FC sampling and the torchrun CLI path.

The backbone has no BatchNorm (per-rank batch statistics are the one thing a 2-rank step
legitimately computes differently), and both runs start from the same classifier through
``train.init`` (the sharded head's own initialisation is world-independent but not the
one-process head's).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from broadface.fileio import atomic_torch_save
from broadface.models.checkpoint import load_checkpoint
from broadface.train.trainer import Trainer
from tests.helpers import free_port, lfw_pairs_bin, spawn
from tests.helpers import tiny_config as make_config

BATCH, QUEUE, STEPS = 8, 16, 6  # global batch and queue (one process); per rank: halves
COMMON = [f"train.steps={STEPS}", "train.checkpoint_every=2", "train.keep_checkpoints=0", "optim.lr=0.2"]
REPO = Path(__file__).resolve().parents[2]


class PlainNet(nn.Module):
    """conv-ReLU-pool x2 -> linear: no batch-dependent layer, so rank slices add up exactly."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(4),
                                  nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(16, 16)

    def forward(self, x):
        return self.fc(self.body(x))


def net() -> PlainNet:
    torch.manual_seed(0)
    return PlainNet()


def run(faces, out, world, *extra, **kw):
    """Train (world = ranks the config is meant for); returns ([(step, batch_loss, union_loss)], trainer)."""
    records = []

    def keep(kind, r):
        if kind == "train":
            records.append((r["step"], r["batch_loss"], r["union_loss"]))
    cfg = make_config(out, *COMMON, f"train.batch_size={BATCH // world}", f"head.queue_size={QUEUE // world}", *extra)
    trainer = Trainer(cfg, train_set=faces, model=net(), progress=False, callbacks=[keep], **kw)
    trainer.evals = trainer.fit().evals
    return records, trainer


def _worker(rank, world, tmp, faces, val_faces, init):
    out = {}
    resume = f"train.resume={tmp / 'one/checkpoints/step_0000002.pt'}"
    for name, extra in {"two": [], "zero_micro": ["optim.zero=true", "train.micro_batch=2"],
                        "from_one": ["head.queue_mode=replicated", resume],
                        "sampled": ["head.sample_rate=0.5", "train.steps=2", f"train.val_bins=[{tmp / 'v.bin'}]"]
                        }.items():
        init_opt = [] if name == "from_one" else [f"train.init={init}"]
        records, trainer = run(faces, tmp / name, world, *init_opt, *extra,
                               val_set=val_faces if name == "sampled" else None)
        out[name] = records
        out[f"{name}_evals"] = trainer.evals  # sampled: evaluated on rank 0, result on every rank
        assert len(trainer.evals) == (name == "sampled")  # on every rank
        assert trainer.ctx.world_size == world and trainer.output == (None if rank else tmp / name)
    torch.save({"val_bins_evaluated": trainer.valsets.evaluated if trainer.valsets else 0,
                "eval_keys": sorted(trainer.evals[-1])}, tmp / f"rank{rank}.pt")  # the "sampled" run's
    if rank == 0:
        torch.save(out, tmp / "records.pt")


def close(a, b, atol=2e-5, rtol=2e-4):
    return torch.allclose(a.double(), b.double(), atol=atol, rtol=rtol)


def same_weights(a: dict, b: dict) -> None:
    for key in a["backbone"]:
        assert close(a["backbone"][key], b["backbone"][key]), key
    assert close(a["head"]["margin.weight"], b["head"]["margin.weight"])
    head_rows = lambda c: [s for g in c["optimizer"]["param_groups"] if g["name"] == "head"  # noqa: E731
                           for s in [c["optimizer"]["state"][g["params"][0]]["momentum_buffer"]]][0]
    assert close(head_rows(a), head_rows(b))
    assert sorted(a["head"]["queue.labels"].tolist()) == sorted(b["head"]["queue.labels"].tolist())


def same_losses(a, b, steps=None):
    a = {s: (x, y) for s, x, y in a if steps is None or s in steps}
    b = {s: (x, y) for s, x, y in b if steps is None or s in steps}
    assert a.keys() == b.keys() and a
    for s in a:
        assert a[s] == pytest.approx(b[s], rel=2e-4, abs=2e-5), f"step {s}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory, faces, val_faces, lfw_root):
    """One process (reference), then 2 ranks: straight, ZeRO + micro-batches, resumed from the one-process run."""
    tmp = tmp_path_factory.mktemp("dist")
    init = tmp / "init.pt"
    w0 = torch.randn(len(faces.classes), 16, generator=torch.Generator().manual_seed(5)) * 0.1
    atomic_torch_save({"format": "broadface", "version": 1, "backbone": net().state_dict(),
                       "head": {"margin.weight": w0}}, init)
    one, _ = run(faces, tmp / "one", 1, f"train.init={init}")
    lfw_pairs_bin(lfw_root, tmp / "v.bin", pairs=20)
    spawn(_worker, 2, tmp, faces, val_faces, init, timeout=240)
    return tmp, one, torch.load(tmp / "records.pt")


def test_two_ranks_equal_one_process(runs):
    tmp, one, two = runs
    same_losses(one, two["two"])
    assert len(one) == STEPS and one[-1][1] != one[0][1]  # it trained
    a, b = load_checkpoint(tmp / "one/final.pt"), load_checkpoint(tmp / "two/final.pt")
    assert b["world_size"] == 2 and b["global_batch"] == a["global_batch"] == BATCH
    assert b["head"]["queue.labels"].shape == a["head"]["queue.labels"].shape == (QUEUE,)  # world x per-rank queue
    assert b["head"]["queue._extra_state"]["fill"] == QUEUE and b["data"] == a["data"]
    same_weights(a, b)


def test_zero_and_micro_batches_change_nothing(runs):
    tmp, one, two = runs
    same_losses(one, two["zero_micro"])
    same_weights(load_checkpoint(tmp / "one/final.pt"), load_checkpoint(tmp / "zero_micro/final.pt"))


def test_one_process_checkpoint_resumes_on_two_ranks(runs):
    tmp, one, two = runs
    assert [s for s, *_ in two["from_one"]] == [3, 4, 5, 6]
    same_losses(one, two["from_one"], steps={3, 4, 5, 6})
    same_weights(load_checkpoint(tmp / "one/final.pt"), load_checkpoint(tmp / "from_one/final.pt"))


@pytest.mark.parametrize("source", ["two", "zero_micro"])
def test_two_rank_checkpoint_resumes_on_one_process(runs, faces, source):
    tmp, one, _ = runs
    out = tmp / f"resume_{source}"
    records, _ = run(faces, out, 1, f"train.resume={tmp / source / 'checkpoints/step_0000004.pt'}")
    same_losses(one, records, steps={5, 6})
    same_weights(load_checkpoint(tmp / "one/final.pt"), load_checkpoint(out / "final.pt"))


def test_partial_fc_sampling_and_evaluation_on_rank0(runs):
    tmp, _, two = runs
    assert len(two["sampled_evals"]) == 1 and 0 <= two["sampled_evals"][0]["val_recall@1"] <= 1
    assert 0 <= two["sampled_evals"][0]["v_accuracy"] <= 1  # train.val_bins, evaluated on rank 0 only:
    ranks = [torch.load(tmp / f"rank{r}.pt") for r in (0, 1)]
    assert [r["val_bins_evaluated"] for r in ranks] == [1, 0]
    assert ranks[0]["eval_keys"] == ranks[1]["eval_keys"] == ["step", "v_accuracy", "v_accuracy_std", "val_recall@1",
                                                             "val_recall@2", "val_recall@4", "val_recall@8"]
    assert [s for s, *_ in two["sampled"]] == [1, 2] and all(torch.isfinite(torch.tensor(r[1:])).all()
                                                               for r in two["sampled"])


def test_mismatched_resume_is_a_clear_error(runs, faces):
    tmp, _, _ = runs
    ckpt = tmp / "two/checkpoints/step_0000004.pt"
    with pytest.raises(ValueError, match=r"queue holds 16 entries .* set head.queue_size=16"):
        Trainer(make_config(None, *COMMON, "train.batch_size=8", "head.queue_size=8", f"train.resume={ckpt}"),
                train_set=faces, model=net(), progress=False)
    with pytest.raises(ValueError, match=r"global batch of 8 images \(2 rank\(s\)\) but this run's is 4"):
        Trainer(make_config(None, *COMMON, "train.batch_size=4", "head.queue_size=16", f"train.resume={ckpt}"),
                train_set=faces, model=net(), progress=False)


def test_zero_needs_a_distributed_run(faces):
    with pytest.raises(ValueError, match="optim.zero=True.*torchrun"):
        Trainer(make_config(None, "optim.zero=true"), train_set=faces, progress=False)


def test_torchrun_cli(tmp_path):  # 10-15 s on the shared 2-core CPU
    """``torchrun --nproc_per_node 2 -m broadface train`` end to end (Omniglot, evaluation on rank 0)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "-m", "broadface", "train", str(REPO / "configs/omniglot_tinycnn.yaml"), "train.steps=3",
           "train.batch_size=8", "model.embedding_size=16", "model.kwargs={width: 8}", "head.queue_size=16",
           "train.log_every=1", "train.tensorboard=false", "train.eval_batch_size=512", "train.device=cpu",
           f"train.output={tmp_path}", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("done: step 3") == 1 and "val_recall@1" in done.stdout  # rank 0 prints, once
    ckpt = load_checkpoint(tmp_path / "final.pt")
    assert ckpt["world_size"] == 2 and ckpt["step"] == 3 and ckpt["head"]["queue._extra_state"]["fill"] == 32


def test_sampled_head_on_one_process_resumes_exactly(tmp_path, faces):
    """head.sample_rate < 1 on one process (the sharded head on one rank): crash-free exact resume."""
    opts = ["head.sample_rate=0.5", "train.steps=4"]
    straight, _ = run(faces, tmp_path / "a", 1, *opts)
    resumed, _ = run(faces, tmp_path / "b", 1, *opts, f"train.resume={tmp_path / 'a/checkpoints/step_0000002.pt'}")
    assert [s for s, *_ in resumed] == [3, 4] and resumed == straight[2:]
    a, b = load_checkpoint(tmp_path / "a/final.pt"), load_checkpoint(tmp_path / "b/final.pt")
    assert torch.equal(a["head"]["margin.weight"], b["head"]["margin.weight"])
    assert torch.equal(a["head"]["queue.vectors"], b["head"]["queue.vectors"])
