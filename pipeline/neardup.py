"""Near-duplicate core: perceptual hashes, exact radius search by multi-index banding, clusters.

No Beam, so the same code runs inside a Beam stage, in the benchmark and in a notebook.
The search is *exact*: every pair of hashes within the Hamming radius is found (see
`plan_bands` for the argument), without comparing all pairs. Two engines run it with the
same results: a numba kernel (`pipeline._neardup_kernel`, on all cores) and plain numpy.
`engine` ("auto", "compiled", "numpy") and `threads` choose; see docs/dedup.md.
"""

from __future__ import annotations

import io
import logging
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache
from itertools import combinations
from typing import Sequence

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)

HASH_BITS = 64
HASH_KINDS = ("phash", "dhash")
MAX_BAND_BITS = 22  # direct-address tables of 2**22 int32 (16 MiB) per band at most
_PAIR_CHUNK = 1 << 22  # candidate pairs expanded at once (bounds peak memory)
_MAX_DEPTH = 4

# Relative unit costs of the planner's cost model (measured roughly with numpy on one core).
_COST_LOOKUP = 1.0
_COST_PAIR = 2.5
_COST_TABLE = 0.3
_COST_BRUTE = 1.5


# --------------------------------------------------------------------------- hashing


def image_hash(image: Image.Image, kind: str = "phash") -> int:
    """64-bit perceptual hash of a decoded image as an int (bit 63 = first imagehash bit).

    imagehash is the reference implementation people compare against, so we use it and only
    change the representation: an int packs into a uint64 array, a bool matrix does not.
    """
    import imagehash  # local import: nothing heavy at import time

    if kind == "phash":
        h = imagehash.phash(image, hash_size=8)
    elif kind == "dhash":
        h = imagehash.dhash(image, hash_size=8)
    else:
        raise ValueError(f"unknown hash kind {kind!r}; expected one of {HASH_KINDS}")
    return int(str(h), 16)


def image_hash_from_bytes(data: bytes, kind: str = "phash") -> int:
    """Hash encoded image bytes. JPEG `draft` decodes at reduced scale: the hash only looks
    at a 32x32 (pHash) or 9x8 (dHash) thumbnail, so full-resolution decoding is wasted work."""
    with Image.open(io.BytesIO(data)) as img:
        if img.format == "JPEG":
            img.draft("RGB", (256, 256))
        img.load()
        if img.mode not in ("RGB", "L"):
            img = img.convert("RGBA" if "A" in img.getbands() else "RGB")
            if img.mode == "RGBA":
                # composite on white so transparent regions hash like a flattened export
                background = Image.new("RGB", img.size, (255, 255, 255))
                background.paste(img, mask=img.getchannel("A"))
                img = background
        return image_hash(img, kind)


def hash_to_hex(value: int) -> str:
    """16-hex-digit string, the form stored in `Asset.phash` and the ledger."""
    return f"{int(value) & 0xFFFFFFFFFFFFFFFF:016x}"


def hex_to_hash(text: str) -> int:
    """Inverse of `hash_to_hex`; rejects anything that is not a 64-bit hex value."""
    value = int(text, 16)
    if not 0 <= value < 1 << HASH_BITS:
        raise ValueError(f"not a 64-bit hash: {text!r}")
    return value


def popcount(x: np.ndarray) -> np.ndarray:
    """Bits set per uint64 (Hamming weight)."""
    return np.bitwise_count(x)


def hamming(a: np.ndarray | int, b: np.ndarray | int) -> np.ndarray:
    return popcount(np.bitwise_xor(np.asarray(a, dtype=np.uint64), np.asarray(b, dtype=np.uint64)))


# --------------------------------------------------------------------------- planning


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
def _flip_masks(width: int, threshold: int) -> np.ndarray:
    """All width-bit values with at most `threshold` bits set (0 first)."""
    masks = [0]
    for k in range(1, threshold + 1):
        for bits in combinations(range(width), k):
            masks.append(sum(1 << b for b in bits))
    return np.asarray(masks, dtype=np.int64)


# --------------------------------------------------------------------------- search


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


ENGINES = ("auto", "compiled", "numpy")
_COMPILED_MIN_PROBES = 200_000  # below this the numpy path wins (no kernel to load)
_MIN_QUERIES_PER_THREAD = 50_000  # smaller splits cost more in thread start-up than they save


@lru_cache(maxsize=1)
def has_compiled_engine() -> bool:
    """True when the numba kernel can be imported (numba is a declared dependency; the numpy
    path stays as the fallback for platforms without it)."""
    try:
        import pipeline._neardup_kernel  # noqa: F401
    except ImportError:
        return False
    return True


def default_threads() -> int:
    """Cores this process may use (respects CPU affinity, e.g. a container's cpuset)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


@dataclass(frozen=True)
class _Options:
    bucket_cap: int
    engine: str = "auto"
    threads: int | None = None

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise ValueError(f"unknown near-dup engine {self.engine!r}; expected one of {ENGINES}")
        if self.engine == "compiled" and not has_compiled_engine():
            raise ValueError("engine 'compiled' needs numba, which is not importable here")
        if self.bucket_cap < 2:
            raise ValueError("bucket_cap must be >= 2")
        if self.threads is not None and self.threads < 1:
            raise ValueError("threads must be >= 1")
        if self.threads is None:
            object.__setattr__(self, "threads", default_threads())

    def compiled(self, probes: int) -> bool:
        if self.engine == "numpy":
            return False
        if self.engine == "compiled":
            return True
        return probes >= _COMPILED_MIN_PROBES and has_compiled_engine()


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
            return np.empty(0, np.int64), np.empty(0, np.int64)
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
        return np.empty(0, np.int64), np.empty(0, np.int64)
    return np.concatenate(ii).astype(np.int64), np.concatenate(jj).astype(np.int64)


def _verify_block(
    q: np.ndarray, counts: np.ndarray, first: np.ndarray, sorted_a: np.ndarray, sorted_b: np.ndarray, radius: int
) -> tuple[np.ndarray, np.ndarray]:
    """Compare query q[k] with sorted positions first[k] .. first[k]+counts[k]-1; return the
    (query, sorted position) pairs within the radius. Repeats values instead of gathering
    by index, and maps only the hits back to queries: the hot loop of the search."""
    ends = np.cumsum(counts, dtype=np.int64)
    total = int(ends[-1])
    small = len(sorted_b) < 2**31 and total < 2**31
    idx = np.int32 if small else np.int64  # int32 halves the memory traffic of the hot loop
    pos = np.repeat((first - (ends - counts)).astype(idx), counts)
    pos += np.arange(total, dtype=idx)
    d = np.bitwise_xor(np.repeat(sorted_a[q], counts), sorted_b[pos])
    hit = np.flatnonzero(popcount(d) <= radius)
    return q[np.searchsorted(ends, hit, "right")], pos[hit]


def _flush(
    blocks: list[tuple[np.ndarray, np.ndarray, np.ndarray]],
    sorted_a: np.ndarray,
    sorted_b: np.ndarray,
    radius: int,
    stats: SearchStats,
    out_a: list[np.ndarray],
    out_b: list[np.ndarray],
) -> None:
    """Verify queued probes (query position in sorted_a, bucket size, bucket start in
    sorted_b) in memory-bounded chunks; hits are appended as sorted positions."""
    if not blocks:
        return
    q = np.concatenate([b[0] for b in blocks])
    cnt = np.concatenate([b[1] for b in blocks])
    first = np.concatenate([b[2] for b in blocks])
    blocks.clear()
    if len(q) == 0:
        return
    csum = np.cumsum(cnt, dtype=np.int64)
    stats.candidates += int(csum[-1])
    cuts = np.unique(np.r_[0, np.searchsorted(csum, np.arange(_PAIR_CHUNK, int(csum[-1]), _PAIR_CHUNK), "right"), len(q)])
    for lo, hi in zip(cuts[:-1], cuts[1:]):
        qi, pos = _verify_block(q[lo:hi], cnt[lo:hi], first[lo:hi], sorted_a, sorted_b, radius)
        out_a.append(qi)
        out_b.append(pos)


_Deferred = tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]
_EMPTY = np.empty(0, np.int64)


def _cat(parts: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(parts).astype(np.int64, copy=False) if parts else _EMPTY


def _probe_band_numpy(
    sorted_a: np.ndarray,
    sva: np.ndarray,
    sorted_b: np.ndarray,
    counts: np.ndarray,
    starts: np.ndarray,
    huge: np.ndarray,
    masks: np.ndarray,
    self_join: bool,
    radius: int,
    stats: SearchStats,
) -> tuple[np.ndarray, np.ndarray, _Deferred]:
    """Probe every query of one band against the table side; vectorised numpy version.

    Returns hits as (position in sorted_a, position in sorted_b) and the probes that landed
    in huge buckets as deferred (query position, bucket value, flips) for the recursion.
    """
    # one int32 gather per probe: bucket size, or -1 for a bucket that is searched recursively
    lookup = np.where(huge, -1, counts).astype(np.int32)
    any_huge = bool(huge.any())
    deferred: _Deferred = ([], [], [])
    blocks: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    out_a: list[np.ndarray] = []
    out_b: list[np.ndarray] = []
    if self_join:
        # same bucket: pair each member with the members after it in sorted order
        p = np.flatnonzero(lookup[sva] > 1)
        after = starts[sva[p]] + counts[sva[p]] - p - 1
        p, after = p[after > 0], after[after > 0]
        blocks.append((p, after, p + 1))
    top_bits = np.asarray([int(m).bit_length() - 1 for m in masks])
    for top in np.unique(top_bits):
        if self_join:
            # each unordered pair once: query from the side whose band value is smaller,
            # i.e. whose value has a 0 at the mask's highest bit
            q_all = np.flatnonzero(((sva >> top) & 1) == 0)
        else:
            q_all = np.arange(len(sva))
        vq = sva[q_all]
        for mask in masks[top_bits == top]:
            flips = int(mask).bit_count()
            key = vq ^ np.int32(mask)
            cnt = lookup[key]
            nz = np.flatnonzero(cnt)
            q, key, cnt = q_all[nz], key[nz], cnt[nz]
            if any_huge:
                big = cnt < 0
                if big.any():
                    deferred[0].append(q[big])
                    deferred[1].append(key[big])
                    deferred[2].append(np.full(int(big.sum()), flips))
                    q, key, cnt = q[~big], key[~big], cnt[~big]
            blocks.append((q, cnt, starts[key]))
            if sum(len(bq) for bq, _, _ in blocks) > 1 << 20:
                _flush(blocks, sorted_a, sorted_b, radius, stats, out_a, out_b)
    _flush(blocks, sorted_a, sorted_b, radius, stats, out_a, out_b)
    return _cat(out_a), _cat(out_b), deferred


def _band_sort(values: np.ndarray, width: int, opts: _Options) -> tuple[np.ndarray, np.ndarray]:
    """Stable order of band values and the size of every bucket (counting sort when the
    kernel is in use: linear, where argsort is n log n)."""
    if opts.compiled(len(values) * 64):
        from pipeline._neardup_kernel import band_sort

        return band_sort(values, width)
    return np.argsort(values, kind="stable"), np.bincount(values, minlength=1 << width)


def _bitmap(flags: np.ndarray) -> np.ndarray:
    """Bool array -> uint64 words, bit i of the result = flags[i]."""
    packed = np.packbits(flags, bitorder="little")
    return np.pad(packed, (0, -len(packed) % 8)).view(np.uint64)


def _probe_band_compiled(
    sorted_a: np.ndarray,
    sva: np.ndarray,
    sorted_b: np.ndarray,
    counts: np.ndarray,
    starts: np.ndarray,
    huge: np.ndarray,
    masks: np.ndarray,
    self_join: bool,
    radius: int,
    stats: SearchStats,
    threads: int,
) -> tuple[np.ndarray, np.ndarray, _Deferred]:
    """Same contract as `_probe_band_numpy`, with the compiled kernel; the queries are split
    into one contiguous range per thread (the kernel releases the GIL)."""
    from pipeline._neardup_kernel import probe_band

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
    deferred: _Deferred = ([], [], [])
    for _, _, cand, dq, dk, dd in results:
        stats.candidates += int(cand)
        if len(dq):
            deferred[0].append(dq)
            deferred[1].append(dk)
            deferred[2].append(dd)
    return _cat([r[0] for r in results]), _cat([r[1] for r in results]), deferred


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
    stats.max_depth = max(stats.max_depth, depth)
    n_a = len(a)
    n_b = n_a if b is None else len(b)
    empty = (np.empty(0, np.int64), np.empty(0, np.int64))
    if n_a == 0 or n_b == 0 or radius < 0:
        return empty
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
        order, counts = _band_sort(vb, band.width, opts)
        sorted_b = bb[order]
        starts = (np.cumsum(counts) - counts).astype(np.int64)
        huge = counts > opts.bucket_cap
        stats.huge_buckets += int(huge.sum()) if depth == 0 else 0
        # queries walk in band-value order: probe keys then rise monotonically within runs,
        # so table gathers stay cache friendly (the search is bound by those gathers)
        if self_join:
            order_a, sorted_a, sva = order, sorted_b, vb[order]
        else:
            order_a = _band_sort(va, band.width, opts)[0]
            sorted_a, sva = a[order_a], va[order_a]
        masks = _flip_masks(band.width, band.threshold)
        if self_join:
            masks = masks[1:]
        if opts.compiled(len(sorted_a) * len(masks)):
            hit_a, hit_b, deferred = _probe_band_compiled(
                sorted_a, sva, sorted_b, counts, starts, huge, masks, self_join, radius, stats, opts.threads
            )
        else:
            hit_a, hit_b, deferred = _probe_band_numpy(sorted_a, sva, sorted_b, counts, starts, huge, masks, self_join, radius, stats)
        out_i.append(order_a[hit_a])
        out_j.append(order[hit_b])
        deferred_q, deferred_key, deferred_d = deferred
        deferred_q = [order_a[q] for q in deferred_q]
        # huge buckets: recurse on the remaining bits (exact; band bits are fixed or known)
        if self_join:
            for value in np.flatnonzero(huge):
                members = order[starts[value] : starts[value] + counts[value]]
                stats.recursions += 1
                ri, rj = _join(_compress(a[members], band), None, nbits - band.width, radius, opts, depth + 1, stats)
                out_i.append(members[ri])
                out_j.append(members[rj])
        if deferred_q:
            dq = np.concatenate(deferred_q)
            dk = np.concatenate(deferred_key)
            dd = np.concatenate(deferred_d)
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
        return empty
    return np.concatenate(out_i).astype(np.int64), np.concatenate(out_j).astype(np.int64)


@dataclass(frozen=True)
class Pairs:
    """Verified pairs (i < j) of row indices with their Hamming distance."""

    i: np.ndarray
    j: np.ndarray
    distance: np.ndarray

    def __len__(self) -> int:
        return len(self.i)


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
    first row. The cost is ~linear in n for
    spread-out hashes; buckets above `bucket_cap` are searched recursively on the other bits,
    and only data that is genuinely dense within the radius falls back to comparing pairs.
    """
    h = np.ascontiguousarray(hashes, dtype=np.uint64)
    uniq, first_row = np.unique(h, return_index=True)
    return _find_pairs_unique(h, uniq, first_row, radius, bucket_cap, stats, engine, threads)


def _find_pairs_unique(
    h: np.ndarray,
    uniq: np.ndarray,
    first_row: np.ndarray,
    radius: int,
    bucket_cap: int,
    stats: SearchStats | None,
    engine: str,
    threads: int | None,
) -> Pairs:
    """`find_pairs` given np.unique's values and first rows (shared with `cluster`)."""
    stats = stats if stats is not None else SearchStats()
    opts = _Options(int(bucket_cap), engine, threads)
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


# --------------------------------------------------------------------------- clusters


def connected_components(n: int, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Component label (the smallest row index in it) for each of n rows.

    Vectorised union-find: hook the larger root under the smaller one for every edge, then
    compress paths by pointer jumping; repeats until no edge joins two roots. O(E log n).
    """
    parent = np.arange(n, dtype=np.int64)
    i = np.asarray(i, dtype=np.int64)
    j = np.asarray(j, dtype=np.int64)
    while len(i):
        pi, pj = parent[i], parent[j]
        differ = pi != pj
        if not differ.any():
            break
        i, j, pi, pj = i[differ], j[differ], pi[differ], pj[differ]
        lo, hi = np.minimum(pi, pj), np.maximum(pi, pj)
        np.minimum.at(parent, hi, lo)
        while True:
            grand = parent[parent]
            if np.array_equal(grand, parent):
                break
            parent = grand
    return parent


@dataclass(frozen=True)
class Clusters:
    """Per row: cluster label, representative row, Hamming distance to the representative."""

    label: np.ndarray
    representative: np.ndarray
    distance_to_rep: np.ndarray
    size: np.ndarray  # size of the row's cluster
    stats: SearchStats

    def duplicates(self) -> np.ndarray:
        """Rows that are not their cluster's representative."""
        return np.flatnonzero(self.representative != np.arange(len(self.representative)))


def cluster(
    hashes: np.ndarray,
    radius: int,
    priority: np.ndarray | None = None,
    bucket_cap: int = 256,
    engine: str = "auto",
    threads: int | None = None,
) -> Clusters:
    """Single-linkage clusters of hashes within `radius`, one representative each.

    `priority` ranks rows (smaller wins; ties impossible if it is a permutation): the caller
    encodes the representative rule (resolution, license preference, asset_id) so this core
    stays free of record types. Without it the smallest row index wins.
    """
    h = np.ascontiguousarray(hashes, dtype=np.uint64)
    n = len(h)
    stats = SearchStats()
    if n == 0:
        empty = np.zeros(0, np.int64)
        return Clusters(empty, empty, empty, empty, stats)
    uniq, first_row, inverse = np.unique(h, return_index=True, return_inverse=True)
    pairs = _find_pairs_unique(h, uniq, first_row, radius, bucket_cap, stats, engine, threads)
    # identical hashes: link every row to the first row with that value (linear)
    same_i = first_row[inverse].astype(np.int64)
    rows = np.arange(n, dtype=np.int64)
    dup = same_i != rows
    label = connected_components(n, np.r_[pairs.i, same_i[dup]], np.r_[pairs.j, rows[dup]])
    prio = rows if priority is None else np.asarray(priority, dtype=np.int64)
    if len(prio) != n:
        raise ValueError("priority must have one entry per hash")
    order = np.lexsort((rows, prio, label))  # by label, then priority, then row
    lab_sorted = label[order]
    head = np.r_[True, lab_sorted[1:] != lab_sorted[:-1]]
    group = np.cumsum(head) - 1
    reps_sorted = order[head][group]
    representative = np.empty(n, np.int64)
    representative[order] = reps_sorted
    sizes = np.bincount(group)[group]
    size = np.empty(n, np.int64)
    size[order] = sizes
    return Clusters(label, representative, hamming(h, h[representative]).astype(np.int64), size, stats)


# --------------------------------------------------------------------------- semantic


def cosine_pairs(embeddings: np.ndarray, threshold: float, block: int = 2048) -> Pairs:
    """Pairs (i < j) whose cosine similarity is >= threshold (SemDeDup's criterion).

    Exact blocked all-pairs matrix products: O(n^2 d) but BLAS-fast for one delivery's
    worth of vectors; the `distance` field holds 1 - cosine (rounded to 1e-6).
    """
    x = np.asarray(embeddings, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError("embeddings must be a 2-D array")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    x = x / np.maximum(norms, 1e-12)
    ii, jj, dd = [], [], []
    for start in range(0, len(x), block):
        sims = x[start : start + block] @ x[start:].T
        r, c = np.nonzero(sims >= threshold)
        c_abs = c + start
        keep = c_abs > r + start
        ii.append(r[keep] + start)
        jj.append(c_abs[keep])
        dd.append(1.0 - sims[r[keep], c[keep]])
    if not ii:
        return Pairs(np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0))
    return Pairs(
        np.concatenate(ii).astype(np.int64),
        np.concatenate(jj).astype(np.int64),
        np.round(np.concatenate(dd).astype(np.float64), 6),
    )


def cluster_pairs(n: int, pairs: Pairs, priority: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(label, representative) per row from arbitrary verified pairs (semantic dedup)."""
    label = connected_components(n, pairs.i, pairs.j)
    rows = np.arange(n, dtype=np.int64)
    prio = rows if priority is None else np.asarray(priority, dtype=np.int64)
    order = np.lexsort((rows, prio, label))
    lab_sorted = label[order]
    head = np.r_[True, lab_sorted[1:] != lab_sorted[:-1]]
    reps_sorted = order[head][np.cumsum(head) - 1]
    representative = np.empty(n, np.int64)
    representative[order] = reps_sorted
    return label, representative


def brute_force_pairs(hashes: Sequence[int] | np.ndarray, radius: int, block: int = 1024) -> set[tuple[int, int]]:
    """Reference answer (pairs of rows with distinct hashes within the radius) for tests and
    the benchmark's recall check; blocked so 30k hashes need ~250 MB, not 7 GB."""
    h = np.asarray(hashes, dtype=np.uint64)
    out: set[tuple[int, int]] = set()
    for start in range(0, len(h), block):
        rows = h[start : start + block]
        d = popcount(rows[:, None] ^ h[None, :])
        hit = (d <= radius) & (rows[:, None] != h[None, :])
        hit &= np.arange(len(h))[None, :] > np.arange(start, start + len(rows))[:, None]
        i, j = np.nonzero(hit)
        out.update(zip((i + start).tolist(), j.tolist()))
    return out
