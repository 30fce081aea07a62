"""Every rank takes its slice of the single-process global batch; order and position are world-size independent."""
import pytest
import torch
from torch.utils.data import Dataset

from broadface.data.loader import EpochBatchSampler, make_loader
from broadface.dist import DistributedBatchSampler, make_distributed_loader, rank_slice


def global_batches(world, n=50, batch=6, epoch=0, start=0, drop_last=True, seed=3):
    """Per step, the concatenation of every rank's batch in rank order."""
    ranks = [list(DistributedBatchSampler(n, batch, r, world, seed=seed, epoch=epoch, drop_last=drop_last,
                                          start_batch=start)) for r in range(world)]
    assert len({len(r) for r in ranks}) == 1  # every rank takes the same number of steps
    return [sum(parts, []) for parts in zip(*ranks)]


@pytest.mark.parametrize("world", [1, 2, 3, 6])
def test_ranks_split_the_single_process_batch(world):
    ref = list(EpochBatchSampler(50, 6, True, 3, 0, True))
    assert global_batches(world) == ref
    assert global_batches(world, epoch=1) == list(EpochBatchSampler(50, 6, True, 3, 1, True))
    assert global_batches(world, epoch=1) != ref


def test_mid_epoch_start_and_set_epoch_resume_exactly():
    full = global_batches(2, epoch=2)
    assert global_batches(2, epoch=2, start=3) == full[3:]
    s = DistributedBatchSampler(50, 6, 1, 2, seed=3)
    s.set_epoch(2, start_batch=3)
    assert len(s) == len(full) - 3
    assert list(s) == [b[3:] for b in full[3:]]
    assert global_batches(3, epoch=2, start=3) == full[3:]  # saved on 2 ranks, resumed on 3


def test_partial_last_batch():
    batches = global_batches(2, n=51, drop_last=False)
    assert len(batches) == 9 and len(batches[-1]) == 3
    assert sorted(sum(batches, [])) == list(range(51))
    assert [len(b) for b in DistributedBatchSampler(51, 6, 0, 2, drop_last=False)][-1] == 2  # 3 = 2 + 1
    with pytest.raises(ValueError, match="last batch holds 1 sample"):
        DistributedBatchSampler(49, 6, 0, 2, drop_last=False)


def test_rank_slice_sizes():
    assert [rank_slice(7, 3, r) for r in range(3)] == [slice(0, 3), slice(3, 5), slice(5, 7)]


def test_bad_arguments():
    with pytest.raises(ValueError, match="multiple of world_size=4"):
        DistributedBatchSampler(50, 6, 0, 4)
    with pytest.raises(ValueError, match="outside world_size"):
        DistributedBatchSampler(50, 6, 2, 2)
    with pytest.raises(ValueError, match="start_batch=99"):
        DistributedBatchSampler(50, 6, 0, 2, start_batch=99)
    with pytest.raises(ValueError, match="batch_size must be an int"):
        make_distributed_loader(Noisy(), 2.5, 0, 2)


class Noisy(Dataset):
    """Items drawn from the global RNG: equal only if each sample is seeded by (seed, epoch, index)."""

    def __len__(self):
        return 20

    def __getitem__(self, i):
        return torch.rand(3) + i, i


def test_loader_tensors_equal_the_single_process_loader():
    ref = [x for x, _ in make_loader(Noisy(), 4, seed=1, epoch=1, drop_last=True)]
    parts = [[x for x, _ in make_distributed_loader(Noisy(), 4, r, 2, seed=1, epoch=1)] for r in range(2)]
    assert len(parts[0]) == len(ref) == 5
    for step, x in enumerate(ref):
        assert torch.equal(torch.cat([parts[0][step], parts[1][step]]), x)
