"""The banding plan of the exact near-dup search: which bit bands to index and how many flips
to probe in each (generalised pigeonhole, chosen by a cost model). Pure functions."""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from itertools import combinations

import numpy as np

MAX_BAND_BITS = 22  # direct-address tables of 2**22 int32 (16 MiB) per band at most

# Relative unit costs of the planner's cost model (measured roughly with numpy on one core).
_COST_LOOKUP = 1.0
_COST_PAIR = 2.5
_COST_TABLE = 0.3
_COST_BRUTE = 1.5


@dataclass(frozen=True)
class Band:
    """Bits [lo, lo+width) of the (possibly compressed) hash; probed up to `threshold` flips."""

    lo: int
    width: int
    threshold: int

    @property
    def probes(self) -> int:
        return sum(math.comb(self.width, k) for k in range(self.threshold + 1))


def plan_bands(n_a: int, n_b: int, nbits: int, radius: int) -> tuple[Band, ...] | None:
    """Cheapest exact banding for a join of n_a by n_b hashes of `nbits` bits, or None for
    brute force (all pairs).

    Generalised pigeonhole: split the bits into m bands and give band i a threshold t_i with
    sum(t_i + 1) >= radius + 1. If two hashes differ in <= radius bits, some band differs in
    <= t_i bits, so probing every band value within t_i flips finds the pair. Plain LSH
    banding (radius + 1 bands, t = 0) is the special case; with radius 8 on 64 bits it gives
    7-bit bands whose buckets hold n/128 items each, which is quadratic at 1M. The planner
    picks m and the t_i from a cost model instead (radius 8, 1M hashes: 3 bands, t = 2).
    """
    best: tuple[float, tuple[Band, ...] | None] = (_COST_BRUTE * n_a * n_b, None)
    if radius < 0:
        return None
    for bands, probes, pair_factor, tables in _candidate_plans(nbits, radius):
        cost = _COST_LOOKUP * n_a * probes + _COST_PAIR * n_a * n_b * pair_factor + _COST_TABLE * tables
        if cost < best[0]:
            best = (cost, bands)
    return best[1]


@lru_cache(maxsize=1024)
def _candidate_plans(nbits: int, radius: int) -> tuple[tuple[tuple[Band, ...], int, float, float], ...]:
    """Every valid banding for (nbits, radius) with its cost terms (cached: pure function)."""
    plans = []
    max_m = min(nbits, max(radius + 1, -(-nbits // MAX_BAND_BITS)))
    for m in range(1, max_m + 1):
        base, extra = divmod(nbits, m)
        widths = [base + (1 if i < extra else 0) for i in range(m)]
        if max(widths) > MAX_BAND_BITS:
            continue
        slack = max(0, radius + 1 - m)  # sum of thresholds
        tb, te = divmod(slack, m)
        thresholds = [tb + (1 if i < te else 0) for i in range(m)]  # wider bands get more flips
        if any(t > w for t, w in zip(thresholds, widths)):
            continue
        bands, lo = [], 0
        for w, t in zip(widths, thresholds):
            bands.append(Band(lo, w, t))
            lo += w
        probes = sum(b.probes for b in bands)
        pair_factor = sum(b.probes / 2.0**b.width for b in bands)
        tables = sum(2.0**b.width for b in bands)
        plans.append((tuple(bands), probes, pair_factor, tables))
    return tuple(plans)


@lru_cache(maxsize=256)
def flip_masks(width: int, threshold: int) -> np.ndarray:
    """All width-bit values with at most `threshold` bits set (0 first)."""
    masks = [0]
    for k in range(1, threshold + 1):
        for bits in combinations(range(width), k):
            masks.append(sum(1 << b for b in bits))
    return np.asarray(masks, dtype=np.int64)
