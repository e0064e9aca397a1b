"""Clusters from verified pairs: connected components, one representative each (single
linkage; docs/dedup.md, "Clusters"). Used for pHash pairs (`cluster`) and for the cosine
pairs of semantic dedup (`cluster_pairs`). No Beam.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.dedup_hash import hamming
from pipeline.dedup_search import Pairs, SearchStats, find_pairs_of_unique


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
    pairs = find_pairs_of_unique(h, uniq, first_row, radius, bucket_cap, stats, engine, threads)
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
