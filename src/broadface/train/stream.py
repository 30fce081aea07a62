"""The data position of a run: endless batches over epochs, resumable at ``(epoch, batch)``.

The loader's per-epoch order is a function of ``(seed, epoch)`` (:mod:`broadface.data.loader`), so
rebuilding it at the saved position continues exactly. With ``with_ids`` each batch also carries
the dataset indices of its samples, read off the loader's own batch sampler in step with the data.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator

import torch


class BatchStream:
    """Endless batches over epochs that knows its position for checkpoints.

    ``make(epoch, start_batch)`` must return an iterable over the batches of ``epoch`` from
    ``start_batch`` on, in the same order every time it is called (with ``with_ids``: a
    DataLoader with a ``batch_sampler``). ``position`` is the (epoch, batch) of the *next* batch.
    ``next()`` gives the batch, or ``(batch, ids)`` with ``with_ids``.
    """

    def __init__(self, make: Callable[[int, int], Iterable[Any]], epoch: int = 0, batch: int = 0,
                 with_ids: bool = False):
        self.make, self.epoch, self.batch, self.with_ids = make, epoch, batch, with_ids
        self._it: Iterator[Any] | None = None

    @property
    def position(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batch": self.batch}

    def __iter__(self) -> BatchStream:
        return self

    def _open(self) -> Iterator[Any]:
        loader = self.make(self.epoch, self.batch)
        if not self.with_ids:
            return iter(loader)
        ids = (torch.as_tensor(idx, dtype=torch.long) for idx in loader.batch_sampler)  # type: ignore[attr-defined]
        return zip(iter(loader), ids)

    def __next__(self) -> Any:
        for _ in range(2):  # at most one empty-remainder epoch before a fresh one
            if self._it is None:
                self._it = self._open()
            try:
                item = next(self._it)
            except StopIteration:
                self._it, self.epoch, self.batch = None, self.epoch + 1, 0
                continue
            self.batch += 1
            return item
        raise ValueError("the training loader yields no batches: is the data set smaller than train.batch_size "
                         "(batches are full, drop_last)?")

    def close(self) -> None:
        """Drop the live iterator (and its worker processes)."""
        self._it = None
