"""Paired differences: how methods are compared here (same seed ⇒ same initialisation and data order).

``paired_difference(b, a)`` takes per-seed values of two arms and reports the mean of ``b − a`` with
its sample standard deviation and standard error (std / √n): "B beats A by Δ ± SE over n seeds".
One seed gives a difference without a spread.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping


@dataclass(frozen=True)
class PairedDifference:
    seeds: tuple
    diffs: tuple[float, ...]
    mean: float
    std: float | None  # sample std (ddof 1); None for one seed
    se: float | None  # std / sqrt(n)

    @property
    def n(self) -> int:
        return len(self.diffs)

    def significant(self, k: float = 2.0) -> bool:
        """True when the mean exceeds ``k`` standard errors (and there is a spread to compare with)."""
        return self.se is not None and self.se > 0 and abs(self.mean) > k * self.se


def paired_difference(b: Mapping, a: Mapping) -> PairedDifference:
    """``b[s] − a[s]`` over the seeds ``s`` both arms have (``{seed: value}`` mappings)."""
    seeds = tuple(sorted(set(a) & set(b)))
    if not seeds:
        raise ValueError("the two arms share no seed: nothing to pair")
    d = tuple(float(b[s]) - float(a[s]) for s in seeds)
    mean = sum(d) / len(d)
    if len(d) < 2:
        return PairedDifference(seeds, d, mean, None, None)
    std = math.sqrt(sum((x - mean) ** 2 for x in d) / (len(d) - 1))
    return PairedDifference(seeds, d, mean, std, std / math.sqrt(len(d)))
