"""Training numerics are pinned: the same config and seed give bit-identical weights as on the commit the
digests were recorded on (main a3e47de, before the reliability work), so a reproduction study running on
earlier code stays comparable.

The digests depend on the torch build, the CPU's SIMD level and its vendor (float reductions are ordered
differently elsewhere; an Intel CPU with AMX gave other digests than the AMD one they were recorded on); on
another platform the test is skipped and says how to record new ones (``python -m
tests.reliability.test_numerics`` on the reference commit)."""
from __future__ import annotations

import sys

import pytest
import torch

from broadface.train.trainer import Trainer
from tests.helpers import celeba_faces, cpu_vendor, state_digest, tiny_config

PLATFORM = "2.13.0+cpu AVX512 AuthenticAMD"
# name -> (overrides, digest of backbone + classifier + queue + optimizer state after training)
RUNS = {
    "injected_queue": (["head.queue_size=20", "train.steps=6", "schedule.warmup_steps=2", "schedule.milestones=[4]",
                        "optim.clip_grad=5.0", "train.eval_every=3"],
                       "30595e8218f8ad4aaf86c4ac7a478b691a3825e13d7ead98739d6e3ac839503f"),
    "configured_celeba": (["data.name=celeba299", "data.val_split=null", "head.queue_size=16", "train.steps=3",
                           "head.loss=cosface", "head.margin=0.3", "optim.name=adamw", "optim.lr=0.001"],
                          "341af0d3e8f72f23e967623874301a12536bf69a492a8ede18afb8a3e380373e"),
}


def platform() -> str:
    return f"{torch.__version__} {torch.backends.cpu.get_cpu_capability()} {cpu_vendor()}"


def digest(trainer: Trainer) -> str:
    """sha256 over every tensor of the trained backbone, head (W and queue) and optimizer state."""
    return state_digest({"backbone": trainer.model.state_dict(), "head": trainer.head.state_dict(),
                         "optimizer": trainer.optimizer.state_dict()["state"]})


def run(name: str, tmp_path=None) -> str:
    overrides, _ = RUNS[name]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one reduction order whatever the machine's core count
    try:
        cfg = tiny_config(None if tmp_path is None else tmp_path / name, *overrides)
        if name == "injected_queue":
            trainer = Trainer(cfg, train_set=celeba_faces(0, 8, 6, flip=True),
                              val_set=celeba_faces(200, 6, 4, flip=False), progress=False)
        else:
            trainer = Trainer(cfg, progress=False)
        trainer.fit()
        trainer.close()
        return digest(trainer)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("name", sorted(RUNS))
def test_same_config_and_seed_give_the_recorded_weights(name, root, tmp_path):
    if platform() != PLATFORM:
        pytest.skip(f"digests recorded on {PLATFORM}, this is {platform()}: record them on the reference commit "
                    "with `python -m tests.reliability.test_numerics`")
    assert run(name, tmp_path) == RUNS[name][1], f"{name}: trained weights differ from the recorded ones"


if __name__ == "__main__":  # print the digests of this checkout
    print(platform())
    for n in sorted(RUNS):
        print(n, run(n))
    sys.exit(0)
