"""Derived seeds: independent, reproducible random streams from a base seed and a position.

``derive_seed("order", seed, epoch)`` and ``derive_seed("sample", seed, epoch, index)`` hash
their arguments (BLAKE2b), so neighbouring seeds/epochs/indices give unrelated streams and
nothing depends on global RNG state or on the order in which workers run.
"""
from __future__ import annotations

import hashlib
import random
from contextlib import contextmanager
from typing import Iterator

import numpy as np
import torch


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed that is a pure function of ``parts`` (ints and strings)."""
    for p in parts:
        if not isinstance(p, (int, str)) or isinstance(p, bool):
            raise TypeError(f"derive_seed takes ints and strings, got {type(p).__name__}")
    digest = hashlib.blake2b(repr(tuple(parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def generator_for(*parts: int | str) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded with ``derive_seed(*parts)``."""
    g = torch.Generator()
    g.manual_seed(derive_seed(*parts))
    return g


def seed_global(seed: int) -> None:
    """Seed Python's ``random``, NumPy's legacy global RNG and torch's CPU RNG."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextmanager
def global_rng_seeded(seed: int) -> Iterator[None]:
    """Run a block with the global RNGs seeded to ``seed``, restoring their states afterwards."""
    py, npy, pt = random.getstate(), np.random.get_state(), torch.get_rng_state()
    seed_global(seed)
    try:
        yield
    finally:
        random.setstate(py)
        np.random.set_state(npy)
        torch.set_rng_state(pt)
