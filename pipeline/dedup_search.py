"""Exact Hamming-radius search over 64-bit hashes: every pair within the radius, without
comparing all pairs (docs/dedup.md, "Exact radius search").

`find_pairs` collapses identical hashes, then `_join` bands the bits as `dedup_plan` says and
runs one band at a time through the numba kernel (`dedup_kernel.probe_band`, on all cores).
Buckets too big to expand are searched recursively on the remaining bits; small joins
compare all pairs. No Beam.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from pipeline.dedup_hash import HASH_BITS, hamming, popcount
from pipeline.dedup_plan import Band, flip_masks, plan_bands

# `dedup.engine` in a run config. One engine is left (the numba kernel); both names select
# it, so configs written before the numpy engine was removed still load.
ENGINES = ("auto", "compiled")
_MAX_DEPTH = 4
_MIN_QUERIES_PER_THREAD = 50_000  # smaller splits cost more in thread start-up than they save
_EMPTY = np.empty(0, np.int64)


@dataclass
class SearchStats:
    """What the search did, so a run report can show that huge buckets were handled."""

    candidates: int = 0
    verified: int = 0
    brute_force_pairs: int = 0
    huge_buckets: int = 0
    recursions: int = 0
    max_depth: int = 0
    plans: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Pairs:
    """Verified pairs (i < j) of row indices with their distance."""

    i: np.ndarray
    j: np.ndarray
    distance: np.ndarray

    def __len__(self) -> int:
        return len(self.i)


def default_threads() -> int:
    """Cores this process may use (respects CPU affinity, e.g. a container's cpuset)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


@dataclass(frozen=True)
class _Options:
    bucket_cap: int
    threads: int

    @classmethod
    def checked(cls, bucket_cap: int, engine: str, threads: int | None) -> _Options:
        if engine not in ENGINES:
            raise ValueError(f"unknown near-dup engine {engine!r}; expected one of {ENGINES}")
        if bucket_cap < 2:
            raise ValueError("bucket_cap must be >= 2")
        if threads is not None and threads < 1:
            raise ValueError("threads must be >= 1")
        return cls(int(bucket_cap), default_threads() if threads is None else int(threads))


def find_pairs(
    hashes: np.ndarray,
    radius: int,
    bucket_cap: int = 256,
    stats: SearchStats | None = None,
    engine: str = "auto",
    threads: int | None = None,
) -> Pairs:
    """Every pair of *distinct* hash values within `radius` bits, each reported once as the
    pair of the first rows that hold the two values (i < j).

    Guarantee: every pair of distinct values that differ in 1..radius bits is returned,
    whatever the data distribution. Identical hashes are collapsed first (np.unique), so any
    number of repeats (blank images) costs linear time; `cluster` links repeats to their
    first row. The cost is ~linear in n for spread-out hashes; buckets above `bucket_cap`
    are searched recursively on the other bits, and only data that is genuinely dense within
    the radius falls back to comparing pairs. `threads`: default every core this process may use.
    """
    h = np.ascontiguousarray(hashes, dtype=np.uint64)
    uniq, first_row = np.unique(h, return_index=True)
    return find_pairs_of_unique(h, uniq, first_row, radius, bucket_cap, stats, engine, threads)


def find_pairs_of_unique(
    h: np.ndarray,
    uniq: np.ndarray,
    first_row: np.ndarray,
    radius: int,
    bucket_cap: int = 256,
    stats: SearchStats | None = None,
    engine: str = "auto",
    threads: int | None = None,
) -> Pairs:
    """`find_pairs` given np.unique's values and first rows (`cluster` needs them too)."""
    stats = stats if stats is not None else SearchStats()
    opts = _Options.checked(bucket_cap, engine, threads)
    ui, uj = _join(uniq, None, HASH_BITS, int(radius), opts, 0, stats)
    if len(ui):
        lo, hi = np.minimum(ui, uj), np.maximum(ui, uj)
        key = np.unique(lo * len(uniq) + hi)  # a pair may be found through several bands
        ui, uj = key // len(uniq), key % len(uniq)
    ri, rj = first_row[ui].astype(np.int64), first_row[uj].astype(np.int64)
    swap = ri > rj
    ri[swap], rj[swap] = rj[swap], ri[swap].copy()
    dist = hamming(h[ri], h[rj]).astype(np.int64)
    # sub-searches of huge buckets may over-approximate the radius; the final check is exact
    ok = dist <= radius
    stats.verified += int(ok.sum())
    return Pairs(ri[ok], rj[ok], dist[ok])


def _join(
    a: np.ndarray,
    b: np.ndarray | None,
    nbits: int,
    radius: int,
    opts: _Options,
    depth: int,
    stats: SearchStats,
) -> tuple[np.ndarray, np.ndarray]:
    """Pairs (i into a, j into b) with Hamming(a_i, b_j) <= radius over the low `nbits` bits.

    b=None is a self-join returning each unordered pair once (i < j not guaranteed, i != j).
    A bucket holding more than `cap` hashes is not expanded pairwise; it is searched
    recursively on the remaining bits (the band's bits are equal, or differ by a known
    number of flips), which is still exact.
    """
    from pipeline.dedup_kernel import band_sort  # numba: loaded on first use, not at import

    stats.max_depth = max(stats.max_depth, depth)
    n_a = len(a)
    n_b = n_a if b is None else len(b)
    if n_a == 0 or n_b == 0 or radius < 0:
        return _EMPTY, _EMPTY
    if radius == 0:
        return _equal_join(a, b)
    small = n_a * n_b <= 4096
    plan = None if small or depth >= _MAX_DEPTH else plan_bands(n_a, n_b, nbits, radius)
    if plan is None:
        return _brute_join(a, b, radius, stats)
    if depth == 0:
        stats.plans.append(", ".join(f"{bd.width}b/t{bd.threshold}" for bd in plan))
    self_join = b is None
    bb = a if self_join else b
    out_i: list[np.ndarray] = []
    out_j: list[np.ndarray] = []
    for band in plan:
        shift = np.uint64(band.lo)
        bmask = np.uint64((1 << band.width) - 1)
        va = ((a >> shift) & bmask).astype(np.int32)
        vb = va if self_join else ((bb >> shift) & bmask).astype(np.int32)
        order, counts = band_sort(vb, band.width)  # stable counting sort, bucket sizes
        sorted_b = bb[order]
        starts = (np.cumsum(counts) - counts).astype(np.int64)
        huge = counts > opts.bucket_cap
        stats.huge_buckets += int(huge.sum()) if depth == 0 else 0
        # queries walk in band-value order: probe keys then rise monotonically within runs,
        # so table gathers stay cache friendly (the search is bound by those gathers)
        if self_join:
            order_a, sorted_a, sva = order, sorted_b, vb[order]
        else:
            order_a = band_sort(va, band.width)[0]
            sorted_a, sva = a[order_a], va[order_a]
        masks = flip_masks(band.width, band.threshold)
        if self_join:
            masks = masks[1:]
        hit_a, hit_b, deferred = _probe_band(sorted_a, sva, sorted_b, counts, huge, masks, self_join, radius, stats, opts.threads)
        out_i.append(order_a[hit_a])
        out_j.append(order[hit_b])
        # huge buckets: recurse on the remaining bits (exact; band bits are fixed or known)
        if self_join:
            for value in np.flatnonzero(huge):
                members = order[starts[value] : starts[value] + counts[value]]
                stats.recursions += 1
                ri, rj = _join(_compress(a[members], band), None, nbits - band.width, radius, opts, depth + 1, stats)
                out_i.append(members[ri])
                out_j.append(members[rj])
        dq, dk, dd = deferred
        if len(dq):
            dq = order_a[dq]
            by_key = np.argsort(dk, kind="stable")
            dq, dk, dd = dq[by_key], dk[by_key], dd[by_key]
            cut = np.flatnonzero(np.r_[True, dk[1:] != dk[:-1], True])
            for s, e in zip(cut[:-1], cut[1:]):
                value = dk[s]
                queries = np.unique(dq[s:e])
                members = order[starts[value] : starts[value] + counts[value]]
                stats.recursions += 1
                ri, rj = _join(
                    _compress(a[queries], band),
                    _compress(bb[members], band),
                    nbits - band.width,
                    radius - int(dd[s:e].min()),
                    opts,
                    depth + 1,
                    stats,
                )
                out_i.append(queries[ri])
                out_j.append(members[rj])
    if not out_i:
        return _EMPTY, _EMPTY
    return np.concatenate(out_i).astype(np.int64), np.concatenate(out_j).astype(np.int64)


def _probe_band(
    sorted_a: np.ndarray,
    sva: np.ndarray,
    sorted_b: np.ndarray,
    counts: np.ndarray,
    huge: np.ndarray,
    masks: np.ndarray,
    self_join: bool,
    radius: int,
    stats: SearchStats,
    threads: int,
) -> tuple[np.ndarray, np.ndarray, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Probe every query of one band against the table side with the kernel; the queries are
    split into one contiguous range per thread (the kernel releases the GIL).

    Returns hits as (position in sorted_a, position in sorted_b) and the probes that landed
    in huge buckets as deferred (query position, bucket value, flips) for the recursion.
    """
    from pipeline.dedup_kernel import probe_band

    tops = np.asarray([int(m).bit_length() - 1 for m in masks], dtype=np.int64)
    by_top = np.argsort(tops, kind="stable")  # the kernel walks the masks in runs of one top bit
    masks64, tops = np.ascontiguousarray(masks[by_top], dtype=np.int64), tops[by_top]
    bounds = np.empty(len(counts) + 1, np.int64 if len(sorted_b) >= 2**31 else np.int32)
    bounds[0] = 0
    np.cumsum(counts, out=bounds[1:])
    occupied, huge_bits = _bitmap(counts > 0), _bitmap(huge)
    sva64 = sva.astype(np.int64)
    n = len(sorted_a)
    threads = max(1, min(threads, n // _MIN_QUERIES_PER_THREAD))
    cuts = np.linspace(0, n, threads + 1).astype(np.int64)
    args = [
        (sorted_a, sva64, int(lo), int(hi), sorted_b, occupied, huge_bits, bounds, masks64, tops, bool(self_join), np.uint64(radius))
        for lo, hi in zip(cuts[:-1], cuts[1:])
    ]
    if threads == 1:
        results = [probe_band(*args[0])]
    else:
        with ThreadPoolExecutor(max_workers=threads) as pool:
            results = list(pool.map(lambda a: probe_band(*a), args))
    stats.candidates += sum(int(r[2]) for r in results)
    return (
        _cat([r[0] for r in results]),
        _cat([r[1] for r in results]),
        (_cat([r[3] for r in results]), _cat([r[4] for r in results]), _cat([r[5] for r in results])),
    )


def _bitmap(flags: np.ndarray) -> np.ndarray:
    """Bool array -> uint64 words, bit i of the result = flags[i]."""
    packed = np.packbits(flags, bitorder="little")
    return np.pad(packed, (0, -len(packed) % 8)).view(np.uint64)


def _cat(parts: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(parts).astype(np.int64, copy=False) if parts else _EMPTY


def _compress(h: np.ndarray, band: Band) -> np.ndarray:
    """Drop the band's bits, shifting the higher bits down (for sub-searches inside a bucket)."""
    low = np.uint64((1 << band.lo) - 1)
    return (h & low) | ((h >> np.uint64(band.lo + band.width)) << np.uint64(band.lo))


def _equal_join(a: np.ndarray, b: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Radius 0: pairs of equal values (output-sensitive, sort based)."""
    if b is None:
        order = np.argsort(a, kind="stable")
        s = a[order]
        starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])
        sizes = np.diff(np.r_[starts, len(s)])
        ii, jj = [], []
        for st, sz in zip(starts[sizes > 1], sizes[sizes > 1]):
            members = order[st : st + sz]
            x, y = np.triu_indices(sz, 1)
            ii.append(members[x])
            jj.append(members[y])
        if not ii:
            return _EMPTY, _EMPTY
        return np.concatenate(ii).astype(np.int64), np.concatenate(jj).astype(np.int64)
    order = np.argsort(b, kind="stable")
    sb = b[order]
    left = np.searchsorted(sb, a, "left")
    right = np.searchsorted(sb, a, "right")
    counts = right - left
    qa = np.repeat(np.arange(len(a)), counts)
    offs = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
    return qa.astype(np.int64), order[np.repeat(left, counts) + offs].astype(np.int64)


def _brute_join(a: np.ndarray, b: np.ndarray | None, radius: int, stats: SearchStats) -> tuple[np.ndarray, np.ndarray]:
    """All pairs in blocks; used when the planner says it is cheapest (small sets)."""
    other = a if b is None else b
    ii, jj = [], []
    block = max(1, (1 << 22) // max(1, len(other)))
    for start in range(0, len(a), block):
        rows = a[start : start + block]
        d = popcount(rows[:, None] ^ other[None, :])
        hit = d <= radius
        if b is None:
            hit &= np.arange(len(other))[None, :] > (np.arange(start, start + len(rows)))[:, None]
        r, c = np.nonzero(hit)
        ii.append(r + start)
        jj.append(c)
        stats.brute_force_pairs += rows.size * len(other) // (2 if b is None else 1)
    if not ii:
        return _EMPTY, _EMPTY
    return np.concatenate(ii).astype(np.int64), np.concatenate(jj).astype(np.int64)
