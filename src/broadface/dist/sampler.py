"""Deterministic data sharding: every rank takes its slice of the *same* global batch.

Built on the data package's contract (:mod:`broadface.data.loader`): epoch ``e``'s order
is ``epoch_order(n, seed, e)`` and global batch ``b`` is ``order[b·B:(b+1)·B]``. Rank
``r`` of ``W`` takes the contiguous slice ``[r·B/W, (r+1)·B/W)`` of it, so

- the global batch of step k is the single-process batch of step k, whatever W is, and
  gathering embeddings in rank order restores its exact sample order;
- the data position ``(epoch, batch)`` is world-size independent: a run saved on 4 ranks
  resumes exactly on 2 (``start_batch``), and augmentation (seeded per sample index by
  ``SeededDataset``) is the same as in one process.

A partial last batch (``drop_last=False``) is split as evenly as possible (the first
ranks get one sample more); it must hold at least one sample per rank.
"""
from __future__ import annotations

from typing import Callable, Iterator

from torch.utils.data import DataLoader, Dataset, Sampler

from broadface.data.loader import check_counts, epoch_order, seeded_loader


def rank_slice(n: int, world_size: int, rank: int) -> slice:
    """Rank ``rank``'s part of a batch of ``n``: contiguous, sizes differ by at most one."""
    q, r = divmod(n, world_size)
    start = rank * q + min(rank, r)
    return slice(start, start + q + (rank < r))


class DistributedBatchSampler(Sampler[list[int]]):
    """This rank's slices of the global batches of one epoch, from global batch ``start_batch`` on.

    ``batch_size`` is the *global* batch (a multiple of ``world_size``). ``set_epoch`` moves
    to another epoch (and optionally a mid-epoch batch) for loaders that are reused.
    """

    def __init__(self, num_samples: int, batch_size: int, rank: int, world_size: int, shuffle: bool = True,
                 seed: int = 0, epoch: int = 0, drop_last: bool = True, start_batch: int = 0):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"DistributedBatchSampler: rank={rank} is outside world_size={world_size}")
        if batch_size < 1 or batch_size % world_size:
            raise ValueError(f"DistributedBatchSampler: the global batch_size={batch_size} must be a positive "
                             f"multiple of world_size={world_size}")
        if num_samples < 1:
            raise ValueError("DistributedBatchSampler: the dataset is empty")
        self.num_samples, self.batch_size, self.rank, self.world_size = num_samples, batch_size, rank, world_size
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        full, rest = divmod(num_samples, batch_size)
        self.num_batches = full if (drop_last or rest == 0) else full + 1
        if not drop_last and 0 < rest < world_size:
            raise ValueError(f"DistributedBatchSampler: the last batch holds {rest} sample(s) for {world_size} ranks; "
                             "use drop_last=True or another batch size")
        self.set_epoch(epoch, start_batch)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Iterate epoch ``epoch`` from global batch ``start_batch`` (exact mid-epoch resume)."""
        if epoch < 0 or not 0 <= start_batch <= self.num_batches:
            raise ValueError(f"DistributedBatchSampler: epoch={epoch}, start_batch={start_batch} outside "
                             f"0..{self.num_batches} (epoch has {self.num_batches} batches of {self.batch_size})")
        self.epoch, self.start_batch = epoch, start_batch

    def __iter__(self) -> Iterator[list[int]]:
        order = epoch_order(self.num_samples, self.seed, self.epoch, self.shuffle).tolist()
        for b in range(self.start_batch, self.num_batches):
            batch = order[b * self.batch_size:(b + 1) * self.batch_size]
            yield batch[rank_slice(len(batch), self.world_size, self.rank)]

    def __len__(self) -> int:
        return self.num_batches - self.start_batch


def make_distributed_loader(dataset: Dataset, batch_size: int, rank: int, world_size: int, shuffle: bool = True,
                            seed: int = 0, num_workers: int = 0, drop_last: bool = True, epoch: int = 0,
                            start_batch: int = 0, *, pin_memory: bool = False, collate_fn: Callable | None = None,
                            worker_init_fn: Callable[[int], None] | None = None, threads: int = 1) -> DataLoader:
    """``make_loader`` for rank ``rank`` of ``world_size``: same epoch/position contract, global
    ``batch_size``. Build one loader per epoch, as with ``make_loader``."""
    check_counts("make_distributed_loader", batch_size=batch_size, num_workers=num_workers, epoch=epoch,
                 start_batch=start_batch, threads=threads)
    n = len(dataset)  # type: ignore[arg-type]
    sampler = DistributedBatchSampler(n, batch_size, rank, world_size, shuffle, seed, epoch, drop_last, start_batch)
    return seeded_loader(dataset, sampler, seed, epoch, num_workers=num_workers, pin_memory=pin_memory,
                         collate_fn=collate_fn, worker_init_fn=worker_init_fn, threads=threads)
