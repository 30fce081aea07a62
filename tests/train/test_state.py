"""RNG capture (weights_only-loadable) and the resumable batch stream."""
from __future__ import annotations

import random

import numpy as np
import torch

from broadface.train.state import BatchStream, capture_rng, restore_rng


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


def test_batch_stream_resumes_at_its_position():
    def make(epoch, start):  # epoch e: batches (e, 0..2)
        return [(epoch, b) for b in range(start, 3)]

    stream = BatchStream(make)
    first = [next(stream) for _ in range(4)]
    assert first == [(0, 0), (0, 1), (0, 2), (1, 0)] and stream.position == {"epoch": 1, "batch": 1}
    again = BatchStream(make, **stream.position)
    assert [next(again) for _ in range(3)] == [next(stream) for _ in range(3)] == [(1, 1), (1, 2), (2, 0)]
    end = BatchStream(make, epoch=0, batch=3)  # saved exactly at an epoch's end
    assert next(end) == (1, 0)


def test_batch_stream_empty_loader_is_an_error():
    stream = BatchStream(lambda e, s: [])
    try:
        next(stream)
    except ValueError as err:
        assert "yields no batches" in str(err)
    else:
        raise AssertionError("expected ValueError")
