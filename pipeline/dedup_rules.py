"""The dedup decisions, without Beam: which asset of a duplicate group is kept, and why the
others are not (docs/dedup.md).

- **Representative rule** (`rank_key`): larger source resolution first, then the license
  earliest in `dedup.license_preference`, then the smallest asset_id. Deterministic whatever
  the order rows arrive in, so reruns keep the same asset.
- **Exact** (`exact_decisions`): a group shares its source sha256 (or, with `pixel_exact`,
  its decoded pixels' sha256).
- **Near** (`near_decisions`): perceptual hashes within `hamming_radius`, clustered over the
  whole delivery (single linkage, pipeline/dedup_cluster.py).
- **Semantic** (`semantic_decisions`): CLIP image embeddings with cosine >= a threshold.
- **Previous run** (`dedup.previous_run`): the hashes of an earlier curated store take part
  and rank first, so a re-delivered copy of an asset already curated (or taken down) cannot
  come back under another name. Previous assets are never judged again.

The prepare step (`Decide`, pipeline/stages/decide.py) applies the exact and near rules to
the compact columns of a whole delivery; the align step applies the semantic rule
(pipeline/stages/dedup.py, `DedupSemantic`).
"""

from __future__ import annotations

import logging
from typing import Any, Iterable, NamedTuple

import numpy as np

from pipeline import dedup_cluster, dedup_hash, dedup_search, dedup_semantic

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- representative rule


def rank_key(area: int, license_id: str | None, asset_id: str, license_preference: tuple[str, ...] = ()) -> tuple[int, int, str]:
    """Sort key of the representative rule, smallest wins (see the module docstring)."""
    lic_rank = license_preference.index(license_id) if license_id in license_preference else len(license_preference)
    return (-area, lic_rank, asset_id)


def representative_rank(asset: Any, license_preference: tuple[str, ...] = ()) -> tuple[int, int, str]:
    """`rank_key` of an Asset."""
    area = (asset.source_width or 0) * (asset.source_height or 0)
    return rank_key(area, asset.entry.license_id, asset.asset_id, license_preference)


# --------------------------------------------------------------------------- previous run


class PreviousAsset(NamedTuple):
    """What a new delivery is compared against: hashes of an already curated asset."""

    asset_id: str
    sha256: str | None
    pixel_sha256: str | None
    phash: str | None


def load_previous_hashes(url: str) -> list[PreviousAsset]:
    """Read `asset_id`, `sha256`, `phash` (16 hex) and optional `pixel_sha256` from a previous
    run's curated metadata Parquet (a file, a folder or a glob; any fsspec URL)."""
    import fsspec
    import pyarrow.parquet as pq

    fs, _, paths = fsspec.get_fs_token_paths(url)
    files: list[str] = []
    for path in paths:
        if fs.isdir(path):
            files.extend(sorted(p for p in fs.find(path) if p.endswith(".parquet")))
        else:
            files.append(path)
    out: list[PreviousAsset] = []
    for path in sorted(files):
        with fs.open(path, "rb") as fh:
            table = pq.read_table(fh)
        names = set(table.column_names)
        if "asset_id" not in names:
            raise ValueError(f"{path}: previous-run metadata has no asset_id column")
        cols = {c: (table.column(c).to_pylist() if c in names else [None] * table.num_rows)
                for c in ("sha256", "pixel_sha256", "phash")}
        for k, aid in enumerate(table.column("asset_id").to_pylist()):
            out.append(PreviousAsset(str(aid), cols["sha256"][k], cols["pixel_sha256"][k], cols["phash"][k]))
    log.info("loaded %d previous-run hashes from %s (%d files)", len(out), url, len(files))
    return out


def previous_exact_keys(previous: Iterable[PreviousAsset]) -> dict[str, str]:
    """"sha:<sha256>" / "px:<pixel sha256>" -> previous asset_id."""
    keys: dict[str, str] = {}
    for prev in previous:
        if prev.sha256:
            keys["sha:" + prev.sha256] = prev.asset_id
        if prev.pixel_sha256:
            keys["px:" + prev.pixel_sha256] = prev.asset_id
    return keys


def previous_match(sha256: str | None, pixel_sha256: str | None, previous: dict[str, str], pixel_exact: bool) -> str | None:
    """The previous-run asset_id with the same source bytes (or, with pixel_exact, pixels)."""
    return previous.get("sha:" + (sha256 or "")) or (
        previous.get("px:" + pixel_sha256) if pixel_exact and pixel_sha256 else None)


# --------------------------------------------------------------------------- exact


def exact_key(sha256: str | None, pixel_sha256: str | None, asset_id: str, pixel_exact: bool) -> str:
    """The group key. Same bytes imply same decoded pixels, so grouping by pixel hash (when on)
    also groups byte-identical files; an asset without any hash is alone (nothing to compare)."""
    if pixel_exact and pixel_sha256:
        return "px:" + pixel_sha256
    if sha256:
        return "sha:" + sha256
    return "none:" + asset_id


class Member(NamedTuple):
    """One asset of a duplicate group, as the rules see it."""

    asset_id: str
    sha256: str | None
    pixel_sha256: str | None
    rank: tuple[int, int, str]


class Decision(NamedTuple):
    """The rules' verdict on one asset: kept (`dup_of` None) or a duplicate of `dup_of`."""

    asset_id: str
    cluster_id: str | None
    dup_of: str | None
    detail: str


def exact_decisions(members: list[Member], previous: dict[str, str], pixel_exact: bool) -> list[Decision]:
    """One exact-duplicate group: a decision for each member.

    The representative keeps the group's id as `cluster_id` (when the group has more than one
    member). A member identical to a previous-run asset makes the whole group duplicates of it.
    """
    members = sorted(members, key=lambda m: m.rank)
    prev_id = next((p for m in members if (p := previous_match(m.sha256, m.pixel_sha256, previous, pixel_exact))), None)
    rep = None if prev_id else members[0]
    target = prev_id or rep.asset_id
    decisions = []
    for m in members:
        if m is rep:
            decisions.append(Decision(m.asset_id, target if len(members) > 1 else None, None, ""))
        elif prev_id:
            decisions.append(Decision(m.asset_id, target, target, f"identical to {prev_id} from the previous run"))
        elif m.sha256 and m.sha256 == rep.sha256:
            decisions.append(Decision(m.asset_id, target, target, f"same source bytes (sha256) as {target}"))
        else:
            decisions.append(Decision(m.asset_id, target, target,
                                      f"same decoded pixels as {target} under a different encoding"))
    return decisions


# --------------------------------------------------------------------------- near and semantic


class Row(NamedTuple):
    """One asset for clustering: its id, hash (near) or embedding (semantic), and rank."""

    asset_id: str
    value: Any
    rank: tuple[int, int, str]
    mirror: int | None = None  # near, with dedup.mirror: the hash of the horizontally mirrored frame


class _Cluster(NamedTuple):
    cluster_id: str
    dup_of: str | None  # None for the representative
    distance: float
    cluster_size: int
    from_previous: bool


def _priority(ranks: list[tuple]) -> np.ndarray:
    """Row order by rank tuple as int priorities for the clustering core."""
    order = sorted(range(len(ranks)), key=ranks.__getitem__)
    prio = np.empty(len(ranks), dtype=np.int64)
    prio[order] = np.arange(len(ranks))
    return prio


def _clusters(ids: list[str], n_prev: int, label: np.ndarray, rep: np.ndarray, dist: np.ndarray) -> Iterable[tuple[str, _Cluster]]:
    """One entry per new row in a cluster of size > 1 (previous rows are never judged)."""
    sizes = np.bincount(label, minlength=len(ids))
    for k in np.flatnonzero(sizes[label] > 1):
        k = int(k)
        if k < n_prev:
            continue
        r = int(rep[k])
        yield ids[k], _Cluster(ids[r], None if r == k else ids[r], float(dist[k]), int(sizes[label[k]]), r < n_prev)


def near_decisions(rows: list[Row], previous: list[PreviousAsset], radius: int, cap: int, engine: str = "auto",
                   threads: int | None = None) -> Iterable[Decision]:
    """Cluster the delivery's perceptual hashes (plus the previous run's, which rank first);
    a decision for every asset in a cluster of more than one.

    A row's mirror hash (`Row.mirror`) is searched as one more hash of the same asset, so two
    assets are near duplicates when d(h_a, h_b) <= r or d(h_a, mirror_b) <= r (or the other
    way round): a horizontally flipped copy matches through its mirror. Previous-run assets
    have only their hash; the delivery's mirrors are searched against it too."""
    prev, prev_values = [], []
    for p in previous:
        try:
            prev_values.append(dedup_hash.hex_to_hash(p.phash))
            prev.append(p)
        except (TypeError, ValueError):
            continue  # no or unreadable phash in the previous store: nothing to compare
    if len(prev) < len(previous):
        log.warning("near-dup: %d previous-run rows have no usable phash", len(previous) - len(prev))
    rows = sorted(rows, key=lambda r: r.asset_id)
    ids = [p.asset_id for p in prev] + [r.asset_id for r in rows]
    n = len(ids)
    if n == 0:
        return
    hashes = np.asarray(prev_values + [r.value for r in rows], dtype=np.uint64)
    with_mirror = np.asarray([len(prev) + k for k, r in enumerate(rows) if r.mirror is not None], dtype=np.int64)
    mirror = hashes.copy()  # an asset without a mirror hash stands in for itself (adds no pair)
    mirror[with_mirror] = np.asarray([r.mirror for r in rows if r.mirror is not None], dtype=np.uint64)
    prio = np.concatenate([np.arange(len(prev)), len(prev) + _priority([r.rank for r in rows])])
    label, rep, stats = _near_clusters(hashes, mirror[with_mirror], with_mirror, prio, radius, cap, engine, threads)
    plain = dedup_hash.hamming(hashes, hashes[rep]).astype(np.int64)
    flipped = np.minimum(dedup_hash.hamming(hashes, mirror[rep]), dedup_hash.hamming(mirror, hashes[rep])).astype(np.int64)
    distance = np.minimum(plain, flipped)
    mirrored = {ids[k] for k in np.flatnonzero(flipped < plain)}
    log.info("near-dup: %d hashes (%d previous, %d mirrors), %d duplicates, candidates=%d huge_buckets=%d "
             "recursions=%d", n, len(prev), len(with_mirror), int(np.sum(rep != np.arange(n))), stats.candidates,
             stats.huge_buckets, stats.recursions)
    for aid, c in _clusters(ids, len(prev), label, rep, distance):
        where = "a previous-run asset" if c.from_previous else "the cluster representative"
        how = " mirrored (a horizontal flip)" if aid in mirrored else ""
        detail = "" if c.dup_of is None else (
            f"pHash Hamming distance {int(c.distance)} to {where} {c.dup_of}{how} "
            f"(cluster of {c.cluster_size}, radius {radius})")
        yield Decision(aid, c.cluster_id, c.dup_of, detail)


def _near_clusters(hashes: np.ndarray, mirrors: np.ndarray, mirror_owner: np.ndarray, prio: np.ndarray, radius: int,
                   cap: int, engine: str, threads: int | None) -> tuple[np.ndarray, np.ndarray, dedup_search.SearchStats]:
    """(label, representative, stats) per asset: the exact radius search over the assets' hashes
    and mirror hashes together, each mirror row counted as the asset that owns it (self pairs
    dropped), identical values linked, then single-linkage components (dedup_cluster)."""
    n = len(hashes)
    h = np.concatenate([hashes, mirrors]).astype(np.uint64)
    owner = np.concatenate([np.arange(n, dtype=np.int64), mirror_owner])
    stats = dedup_search.SearchStats()
    uniq, first_row, inverse = np.unique(h, return_index=True, return_inverse=True)
    pairs = dedup_search.find_pairs_of_unique(h, uniq, first_row, radius, cap, stats, engine, threads)
    i = owner[np.r_[pairs.i, first_row[inverse]]]  # found pairs, then each row to the first row of its value
    j = owner[np.r_[pairs.j, np.arange(len(h))]]
    other = i != j
    label, rep = dedup_cluster.cluster_pairs(n, dedup_search.Pairs(i[other], j[other], np.zeros(int(other.sum()))),
                                             prio)
    return label, rep, stats


def semantic_decisions(rows: list[Row], threshold: float) -> Iterable[Decision]:
    """Cluster CLIP image embeddings by cosine >= threshold (exact blocked all-pairs)."""
    rows = sorted(rows, key=lambda r: r.asset_id)
    if not rows:
        return
    ids = [r.asset_id for r in rows]
    x = np.stack([np.asarray(r.value, dtype=np.float32) for r in rows])
    pairs = dedup_semantic.cosine_pairs(x, threshold)
    label, rep = dedup_cluster.cluster_pairs(len(rows), pairs, _priority([r.rank for r in rows]))
    xn = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    sim_to_rep = np.round(np.einsum("ij,ij->i", xn, xn[rep]), 4)
    for aid, c in _clusters(ids, 0, label, rep, sim_to_rep):
        detail = "" if c.dup_of is None else (
            f"CLIP cosine similarity {c.distance:.4f} to the cluster representative {c.dup_of} "
            f"(cluster of {c.cluster_size}, threshold {threshold})")
        yield Decision(aid, c.cluster_id, c.dup_of, detail)


# --------------------------------------------------------------------------- after alignment


class GroupMember(NamedTuple):
    """A duplicate group's member as the align step sees it."""

    asset_id: str
    passed: bool  # passed the alignment filter on its own
    rank: tuple[int, int, str] | None  # representative rank (members that passed need one)
    standby: bool  # a duplicate on standby (not the group's representative)


def regroup(members: list[GroupMember]) -> str | None:
    """The asset a duplicate group keeps once alignment has judged every member alone.

    The representative stays if it passed. If it failed, the best-ranked member that passed
    takes its place. If every member failed, the group keeps nothing (each member is then
    rejected for its own alignment). So a group is lost only when every member fails. A
    group whose representative is gone (taken down) keeps nothing either: its duplicates are
    copies of a removed asset."""
    rep = next((m for m in members if not m.standby), None)
    if rep is None:
        return None
    if rep.passed:
        return rep.asset_id
    passing = sorted((m for m in members if m.standby and m.passed), key=lambda m: m.rank)
    return passing[0].asset_id if passing else None
