"""Semantic dedup's pair search: embeddings whose cosine similarity reaches a threshold
(SemDeDup's criterion); `dedup_cluster.cluster_pairs` turns the pairs into clusters. No Beam."""

from __future__ import annotations

import numpy as np

from pipeline.dedup_search import Pairs


def cosine_pairs(embeddings: np.ndarray, threshold: float, block: int = 2048) -> Pairs:
    """Pairs (i < j) whose cosine similarity is >= threshold.

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
