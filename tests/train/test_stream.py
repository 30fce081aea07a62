"""The resumable batch stream, with and without sample ids."""
from __future__ import annotations

import torch

from broadface.data.loader import make_loader
from broadface.train.stream import BatchStream


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


class Indexed(torch.utils.data.Dataset):
    def __len__(self):
        return 10

    def __getitem__(self, i):
        return torch.tensor([float(i)]), i % 3


def test_batch_stream_ids_are_the_loader_indices():
    def make(epoch, start):
        return make_loader(Indexed(), 4, shuffle=True, seed=1, drop_last=True, epoch=epoch, start_batch=start)

    stream = BatchStream(make, with_ids=True)
    for _ in range(5):  # two epochs of 2 batches, and one more
        (x, y), ids = next(stream)
        assert torch.equal(x[:, 0].long(), ids) and torch.equal(y, ids % 3)
    resumed = BatchStream(make, **stream.position, with_ids=True)
    assert torch.equal(next(resumed)[1], next(stream)[1])
