"""RNG capture (weights_only-loadable), seeding and forking."""
from __future__ import annotations

import random

import numpy as np
import torch

from broadface.train.rng import capture_rng, forked_rngs, restore_rng, seed_everything


def draw():
    return random.random(), float(np.random.rand()), float(torch.rand(()))


def test_rng_round_trip_through_weights_only_load(tmp_path):
    random.seed(1)
    np.random.seed(2)
    np.random.randn()  # leaves a cached gaussian in numpy's state
    torch.manual_seed(3)
    torch.save(capture_rng(), tmp_path / "rng.pt")
    expected = draw()
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    assert draw() != expected
    restore_rng(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert draw() == expected


def test_forked_rngs_leave_the_global_state_alone():
    def seed5():
        random.seed(5)
        np.random.seed(5)
        torch.manual_seed(5)

    seed5()
    expected = draw()
    seed5()
    with forked_rngs():
        seed_everything(123)
        draw()
    assert draw() == expected

