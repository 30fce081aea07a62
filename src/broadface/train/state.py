"""What an exact resume needs besides weights: every RNG state and the data position.

RNG states are stored as tensors / ints / lists so a checkpoint loads with
``torch.load(weights_only=True)``. The data position is (epoch, index of the
next batch in that epoch); :class:`BatchStream` rebuilds the loader there,
relying on the loader's per-epoch order being a function of (seed, epoch).
"""
from __future__ import annotations

import random
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch


def capture_rng() -> dict[str, Any]:
    """python ``random``, numpy, torch CPU and (if present) every CUDA generator."""
    version, mt, gauss = random.getstate()
    _, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    return {
        "python": {"version": version, "state": torch.tensor(mt, dtype=torch.int64), "gauss": gauss},
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng`."""
    py = state["python"]
    random.setstate((int(py["version"]), tuple(int(x) for x in py["state"].tolist()), py["gauss"]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), int(n["pos"]),
                         int(n["has_gauss"]), float(n["cached_gaussian"])))
    torch.set_rng_state(state["torch"].cpu())
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available():  # devices beyond either count keep their own state
        for index, s in enumerate(cuda[:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s.cpu(), index)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


class BatchStream:
    """Endless batches over epochs that knows its position for checkpoints.

    ``make(epoch, start_batch)`` must return an iterable over the batches of
    ``epoch`` from ``start_batch`` on, in the same order every time it is called.
    ``position`` is the (epoch, batch) of the *next* batch to be consumed.
    """

    def __init__(self, make: Callable[[int, int], Iterable[Any]], epoch: int = 0, batch: int = 0):
        self.make, self.epoch, self.batch = make, epoch, batch
        self._it: Iterator[Any] | None = None

    @property
    def position(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batch": self.batch}

    def __iter__(self) -> BatchStream:
        return self

    def __next__(self) -> Any:
        for _ in range(2):  # at most one empty-remainder epoch before a fresh one
            if self._it is None:
                self._it = iter(self.make(self.epoch, self.batch))
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
