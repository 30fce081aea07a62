"""Deterministic, resumable data loading.

Contract (what the trainer's exact-resume relies on):

* **Order.** The sample order of epoch ``e`` is a permutation drawn from
  ``derive_seed("order", seed, e)``: same ``(seed, epoch)`` -> same order, on any machine,
  whatever the global RNG state. Batch ``b`` of the epoch is ``order[b*B:(b+1)*B]``.
* **Position.** The data position is ``(epoch, batch index)``. ``make_loader(..., epoch=e,
  start_batch=b)`` yields exactly batches ``b, b+1, ...`` of epoch ``e``; so *k steps, save
  (e, k), resume, N-k steps* sees the same batches as *N steps*. Build one loader per epoch.
* **Augmentation.** Sample ``i`` of epoch ``e`` is produced with its own ``torch.Generator``
  seeded from ``derive_seed("sample", seed, e, i)`` (datasets of this package hand it to the
  transform). Datasets/transforms that do not take a generator run with the global RNGs
  seeded from the same value (and restored afterwards). Either way the tensors depend only
  on ``(seed, epoch, index)``: not on batch position, worker count or resume point.
* **Batches.** With the package's collate (the default), a whole batch of a folder or RecordIO set with a
  fixed-size 3-channel ``FaceTransform`` is fetched at once (:mod:`broadface.data.batched`): decoded into
  one uint8 tensor, the same bits as the per-sample items collated.
* **Workers.** Each worker seeds ``random``/NumPy/torch from ``(seed, epoch, worker id)``, and
  the DataLoader gets its own generator, so creating/iterating a loader never draws from the
  trainer's global torch RNG.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate, get_worker_info

from broadface.data.batched import Batch, can_fetch_batch, fetch_batch
from broadface.data.pipeline import BatchNormalizer
from broadface.data.seeding import derive_seed, generator_for, global_rng_seeded, seed_global


def epoch_order(num_samples: int, seed: int, epoch: int, shuffle: bool = True) -> torch.Tensor:
    """The sample order of ``epoch``: a seeded permutation, or ``arange`` without shuffling."""
    if not shuffle:
        return torch.arange(num_samples)
    return torch.randperm(num_samples, generator=generator_for("order", seed, epoch))


class EpochBatchSampler(Sampler[list[int]]):
    """Batches of one epoch's order, starting at batch ``start_batch``."""

    def __init__(self, num_samples: int, batch_size: int, shuffle: bool, seed: int, epoch: int,
                 drop_last: bool, start_batch: int = 0):
        self.num_samples, self.batch_size = num_samples, batch_size
        self.shuffle, self.seed, self.epoch, self.drop_last = shuffle, seed, epoch, drop_last
        full, rest = divmod(num_samples, batch_size)
        self.num_batches = full if (drop_last or rest == 0) else full + 1  # batches in the whole epoch
        if not 0 <= start_batch <= self.num_batches:
            raise ValueError(f"start_batch={start_batch} outside 0..{self.num_batches} "
                             f"(epoch has {self.num_batches} batches of {batch_size})")
        self.start_batch = start_batch

    def __iter__(self) -> Iterator[list[int]]:
        order = epoch_order(self.num_samples, self.seed, self.epoch, self.shuffle).tolist()
        for b in range(self.start_batch, self.num_batches):
            yield order[b * self.batch_size:(b + 1) * self.batch_size]

    def __len__(self) -> int:
        return self.num_batches - self.start_batch


class SeededDataset(Dataset):
    """Wraps a dataset so item ``i`` is produced with randomness seeded from ``(seed, epoch, i)``.

    Attribute access falls through to the wrapped dataset (``.classes``, ``.skipped``...). With ``batched``
    (only for :func:`collate_images`, which takes a :class:`~broadface.data.batched.Batch` as it is), the
    DataLoader's batch fetch (``__getitems__``) decodes a whole batch at once where the dataset allows it.
    """

    def __init__(self, dataset: Dataset, seed: int, epoch: int, batched: bool = False, threads: int = 1):
        self.dataset, self.seed, self.epoch = dataset, seed, epoch
        self._use_generator = bool(getattr(dataset, "supports_generator", False))
        self._batched = batched and can_fetch_batch(dataset)
        self._normalizer = BatchNormalizer() if self._batched else None
        self.threads = threads  # a batch's slices decoded at once (batched fetch only)
        self._pool: tuple[int, ThreadPoolExecutor] | None = None  # (pid, pool): a forked worker makes its own

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        s = derive_seed("sample", self.seed, self.epoch, int(index))
        if self._use_generator:
            g = torch.Generator()
            g.manual_seed(s)
            return self.dataset.getitem(index, g)  # type: ignore[attr-defined]
        with global_rng_seeded(s):
            return self.dataset[index]

    def __getitems__(self, indices: list[int]) -> Batch | list:
        if not self._batched:
            return [self[i] for i in indices]
        seeds = [derive_seed("sample", self.seed, self.epoch, int(i)) for i in indices]
        pool = None
        if self.threads > 1:
            if self._pool is None or self._pool[0] != os.getpid():
                self._pool = (os.getpid(), ThreadPoolExecutor(self.threads - 1, thread_name_prefix="broadface-fetch"))
            pool = self._pool[1]
        return fetch_batch(self.dataset, indices, seeds, self._normalizer, pool, self.threads)  # type: ignore[arg-type]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_pool": None}  # threads do not travel to spawned workers

    def __getattr__(self, name: str) -> Any:
        if name == "dataset":  # not yet set (e.g. during unpickling): avoid recursion
            raise AttributeError(name)
        return getattr(self.dataset, name)


def collate_images(batch: list | Batch) -> Any:
    """``[(CHW float32 or uint8 tensor, int label), ...]`` -> ``(N,C,H,W images, int64 labels)``; a
    :class:`~broadface.data.batched.Batch` (fetched whole) is returned as that pair.

    In the main process images are stacked with NumPy: ``torch.stack`` of many small images
    goes through torch's thread pool and was ~4x slower on a busy 2-core machine. Inside
    workers (and for any other item shape) it is ``default_collate``, which writes straight
    into shared memory.
    """
    if isinstance(batch, Batch):
        return batch.images, batch.labels
    dtype = getattr(batch[0][0], "dtype", None) if batch and isinstance(batch[0], tuple) and batch[0] else None
    if get_worker_info() is None and dtype in (torch.float32, torch.uint8) and all(
        isinstance(b, tuple) and len(b) == 2 and isinstance(b[0], torch.Tensor) and b[0].dtype == dtype
        and isinstance(b[1], int) for b in batch
    ):
        return torch.from_numpy(np.stack([b[0].numpy() for b in batch])), torch.tensor([b[1] for b in batch])
    return default_collate(batch)


class WorkerInit:
    """``worker_init_fn`` seeding a worker's global RNGs from ``(seed, epoch, worker_id)``."""

    def __init__(self, seed: int, epoch: int, then: Callable[[int], None] | None = None):
        self.seed, self.epoch, self.then = seed, epoch, then

    def __call__(self, worker_id: int) -> None:
        seed_global(derive_seed("worker", self.seed, self.epoch, worker_id))
        if self.then is not None:
            self.then(worker_id)


def make_loader(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool = True,
    seed: int = 0,
    num_workers: int = 0,
    drop_last: bool = False,
    epoch: int = 0,
    start_batch: int = 0,
    *,
    pin_memory: bool = False,
    collate_fn: Callable | None = None,
    worker_init_fn: Callable[[int], None] | None = None,
    threads: int = 1,
) -> DataLoader:
    """DataLoader over epoch ``epoch`` starting at batch ``start_batch`` (see the module contract).

    ``threads`` (batched fetch only): the threads of each loading process -- the main one with 0 workers,
    else each worker -- that decode one batch's slices at once; the batches are the same bytes for any count.

    ``len(loader)`` is the number of batches still to come; ``loader.batch_sampler.num_batches``
    the epoch's total. ``loader.dataset`` is a :class:`SeededDataset` (attributes fall through).
    """
    check_counts("make_loader", batch_size=batch_size, num_workers=num_workers, epoch=epoch, start_batch=start_batch,
                 threads=threads)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"make_loader: seed must be an int, got {seed!r}")
    n = len(dataset)  # type: ignore[arg-type]
    if n == 0:
        raise ValueError("make_loader: dataset is empty")
    sampler = EpochBatchSampler(n, batch_size, shuffle, seed, epoch, drop_last, start_batch)
    return seeded_loader(dataset, sampler, seed, epoch, num_workers=num_workers, pin_memory=pin_memory,
                         collate_fn=collate_fn, worker_init_fn=worker_init_fn, threads=threads)


_LOWEST = {"batch_size": 1, "threads": 1}  # the other counts may be 0


def check_counts(where: str, **counts: int) -> None:
    """ValueError naming ``where`` and the argument unless each count is an int >= its lowest value."""
    for name, v in counts.items():
        lo = _LOWEST.get(name, 0)
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"{where}: {name} must be an int >= {lo}, got {v!r}")


def seeded_loader(dataset: Dataset, batch_sampler: Sampler, seed: int, epoch: int, *, num_workers: int,
                  pin_memory: bool, collate_fn: Callable | None, worker_init_fn: Callable[[int], None] | None,
                  threads: int) -> DataLoader:
    """The DataLoader of :func:`make_loader` and ``make_distributed_loader`` around their batch sampler: items
    seeded from ``(seed, epoch, index)``, batches fetched whole under the package's collate, workers seeded
    from ``(seed, epoch, worker id)``, the loader's own generator."""
    return DataLoader(
        SeededDataset(dataset, seed, epoch, batched=collate_fn in (None, collate_images), threads=threads),
        batch_sampler=batch_sampler,
        num_workers=num_workers,
        collate_fn=collate_fn or collate_images,
        pin_memory=pin_memory,
        worker_init_fn=WorkerInit(seed, epoch, worker_init_fn) if num_workers > 0 else None,
        generator=generator_for("loader", seed, epoch),
    )
