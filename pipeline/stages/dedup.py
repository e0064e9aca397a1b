"""Dedup stages: exact (bytes / decoded pixels), near (perceptual hash) and semantic (CLIP).

Each stage keeps one representative per duplicate group, chosen by one documented rule
(`representative_rank`), and sends the others to the `rejected` output with `dup_of` (the
kept asset, or an asset of a previous run) and `cluster_id`. With `previous_run` set, a new
delivery is deduplicated against the hashes of an earlier curated store as well, so a
re-delivered (or re-licensed) copy of an asset that was already curated, or taken down,
cannot come back in under another name. Previous assets are never rejected again.
"""

from __future__ import annotations

import logging
from typing import Any, Iterable, NamedTuple

import apache_beam as beam
import numpy as np

from pipeline import dedup_cluster, dedup_hash, dedup_semantic
from pipeline.config import DedupConfig
from pipeline.records import Asset, RejectReason
from pipeline.stages.base import REJECTED, StageCounters

log = logging.getLogger(__name__)



# --------------------------------------------------------------------------- representative rule


def representative_rank(asset: Asset, license_preference: tuple[str, ...] = ()) -> tuple[int, int, str]:
    """Sort key, smallest wins: larger source resolution, then the license earliest in the
    preference list (unlisted licenses after listed ones), then the smallest asset_id.

    Deterministic whatever the order records arrive in, so reruns keep the same asset.
    """
    area = (asset.source_width or 0) * (asset.source_height or 0)
    return rank_key(area, asset.entry.license_id, asset.asset_id, license_preference)


def rank_key(area: int, license_id: str | None, asset_id: str, license_preference: tuple[str, ...] = ()) -> tuple[int, int, str]:
    """`representative_rank` from its three inputs (the prepare step has them as columns)."""
    lic_rank = license_preference.index(license_id) if license_id in license_preference else len(license_preference)
    return (-area, lic_rank, asset_id)


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
        cols = {c: (table.column(c).to_pylist() if c in names else [None] * table.num_rows) for c in ("sha256", "pixel_sha256", "phash")}
        for k, aid in enumerate(table.column("asset_id").to_pylist()):
            out.append(PreviousAsset(str(aid), cols["sha256"][k], cols["pixel_sha256"][k], cols["phash"][k]))
    log.info("loaded %d previous-run hashes from %s (%d files)", len(out), url, len(files))
    return out


class ReadPreviousHashes(beam.PTransform):
    """The previous run's hashes as a PCollection (read on a worker, not at graph build)."""

    def __init__(self, url: str | None):
        super().__init__()
        self.url = url

    def expand(self, pbegin):
        urls = [self.url] if self.url else []
        return pbegin | "Url" >> beam.Create(urls) | "Read" >> beam.FlatMap(load_previous_hashes)


# --------------------------------------------------------------------------- exact


def _exact_key(asset: Asset, pixel_exact: bool) -> str:
    """Same bytes imply same decoded pixels, so grouping by pixel hash (when on) also groups
    byte-identical files; assets without any hash get a unique key (nothing to compare)."""
    return exact_key(asset.sha256, asset.pixel_sha256, asset.asset_id, pixel_exact)


def exact_key(sha256: str | None, pixel_sha256: str | None, asset_id: str, pixel_exact: bool) -> str:
    if pixel_exact and pixel_sha256:
        return "px:" + pixel_sha256
    if sha256:
        return "sha:" + sha256
    return "none:" + asset_id


class _PickExactRepresentative(beam.DoFn):
    """One exact-duplicate group in, its representative out; the rest become ledger rows."""

    def __init__(self, stage: str, config: DedupConfig):
        super().__init__()
        self.stage = stage
        self.config = config
        self._counters: StageCounters | None = None

    def setup(self) -> None:
        self._counters = StageCounters(self.stage)

    def process(self, element: tuple[str, Iterable[Asset]], previous: dict[str, str]) -> Iterable:
        _, assets = element
        members = list(assets)
        counters = self._counters
        for _ in members:
            counters.seen.inc()
        try:
            outputs = pick_exact(members, previous, self.config, self.stage)
        except Exception as exc:  # noqa: BLE001 - the contract: errors become ledger rows
            log.warning("%s: unexpected error on a group of %d: %s", self.stage, len(members), exc)
            detail = f"{type(exc).__name__}: {exc}"[:2000]
            outputs = [(RejectReason.ERROR, a.reject(self.stage, RejectReason.ERROR, detail)) for a in members]
        for reason, out in outputs:
            if reason is None:
                counters.kept.inc()
                yield out
            else:
                counters.rejected(reason)
                yield beam.pvalue.TaggedOutput(REJECTED, out)


def pick_exact(members: list[Asset], previous: dict[str, str], config: DedupConfig, stage: str) -> list[tuple[RejectReason | None, Any]]:
    """One exact-duplicate group: the representative (reason None) and the rejections.

    `previous` maps "sha:<sha256>" / "px:<pixel sha256>" to a previous-run asset_id; a member
    identical to one is rejected, and nothing in the group is kept.
    """
    members.sort(key=lambda a: representative_rank(a, config.license_preference))
    prev_id = None
    for a in members:
        prev_id = previous_match(a.sha256, a.pixel_sha256, previous, config.pixel_exact)
        if prev_id:
            break
    rep = None if prev_id else members[0]
    target = prev_id or rep.asset_id
    outputs: list[tuple[RejectReason | None, Any]] = []
    for a in members:
        if a is rep:
            outputs.append((None, a.replace(cluster_id=target) if len(members) > 1 else a))
            continue
        if prev_id:
            detail = f"identical to {prev_id} from the previous run"
        elif a.sha256 and a.sha256 == rep.sha256:
            detail = f"same source bytes (sha256) as {target}"
        else:
            detail = f"same decoded pixels as {target} under a different encoding"
        reject = a.reject(stage, RejectReason.EXACT_DUPLICATE, detail, dup_of=target, cluster_id=target)
        outputs.append((RejectReason.EXACT_DUPLICATE, reject))
    return outputs


def previous_match(sha256: str | None, pixel_sha256: str | None, previous: dict[str, str], pixel_exact: bool) -> str | None:
    """The previous-run asset_id with the same source bytes (or, with pixel_exact, pixels)."""
    return previous.get("sha:" + (sha256 or "")) or (
        previous.get("px:" + pixel_sha256) if pixel_exact and pixel_sha256 else None)


def _previous_exact_keys(prev: PreviousAsset) -> Iterable[tuple[str, str]]:
    if prev.sha256:
        yield "sha:" + prev.sha256, prev.asset_id
    if prev.pixel_sha256:
        yield "px:" + prev.pixel_sha256, prev.asset_id


class _DedupStage(beam.PTransform):
    """Shared set-up of the dedup stages: the config, the stage name, the previous run."""

    def __init__(self, config: DedupConfig, stage: str, previous: beam.PCollection | None = None):
        super().__init__()
        if not isinstance(config, DedupConfig):
            raise TypeError(f"{type(self).__name__} needs a DedupConfig")
        self.config = config
        self.stage = stage
        self.previous = previous

    def previous_hashes(self, assets: beam.PCollection) -> beam.PCollection:
        if self.previous is not None:
            return self.previous
        return assets.pipeline | "Previous" >> ReadPreviousHashes(self.config.previous_run)


class DedupExact(_DedupStage):
    """Exact duplicates: one GroupByKey on the pixel hash (or content sha256).

    Returns `(kept, rejected)`. The representative follows `representative_rank`; an asset
    identical to a previous-run asset is rejected with `dup_of` = that previous asset.
    """

    def __init__(self, config: DedupConfig, stage: str = "dedup_exact", previous: beam.PCollection | None = None):
        super().__init__(config, stage, previous)

    def expand(self, assets: beam.PCollection):
        cfg = self.config
        previous = self.previous_hashes(assets)
        prev_keys = previous | "PreviousKeys" >> beam.FlatMap(_previous_exact_keys)
        keyed = assets | "Key" >> beam.Map(lambda a, px: (_exact_key(a, px), a), cfg.pixel_exact)
        grouped = keyed | "Group" >> beam.GroupByKey()
        out = grouped | "Pick" >> beam.ParDo(
            _PickExactRepresentative(self.stage, cfg), previous=beam.pvalue.AsDict(prev_keys)
        ).with_outputs(REJECTED, main="kept")
        return out.kept, out[REJECTED]


# --------------------------------------------------------------------------- clustering (near + semantic)


class _Row(NamedTuple):
    asset_id: str
    value: Any  # int hash (near) or np.ndarray embedding (semantic)
    rank: tuple[int, int, str]


class _Decision(NamedTuple):
    cluster_id: str
    dup_of: str | None  # None for the representative
    distance: float
    cluster_size: int
    from_previous: bool


def _priority(ranks: list[tuple]) -> np.ndarray:
    """Row order by rank tuple as int priorities for the numpy core."""
    order = sorted(range(len(ranks)), key=ranks.__getitem__)
    prio = np.empty(len(ranks), dtype=np.int64)
    prio[order] = np.arange(len(ranks))
    return prio


def _decisions(ids: list[str], n_prev: int, label: np.ndarray, rep: np.ndarray, dist: np.ndarray) -> Iterable[tuple[str, _Decision]]:
    """One decision per new row in a cluster of size > 1 (previous rows are never judged)."""
    sizes = np.bincount(label, minlength=len(ids))
    for k in np.flatnonzero(sizes[label] > 1):
        k = int(k)
        if k < n_prev:
            continue
        r = int(rep[k])
        yield ids[k], _Decision(
            cluster_id=ids[r],
            dup_of=None if r == k else ids[r],
            distance=float(dist[k]),
            cluster_size=int(sizes[label[k]]),
            from_previous=r < n_prev,
        )


def _cluster_hashes(
    rows: list[_Row], previous: list[PreviousAsset], radius: int, cap: int, engine: str = "auto", threads: int | None = None
) -> Iterable[tuple[str, _Decision]]:
    """Run the numpy core once over the whole delivery (plus previous hashes, which rank first)."""
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
    hashes = np.asarray(prev_values + [r.value for r in rows], dtype=np.uint64)
    prio = np.concatenate([np.arange(len(prev)), len(prev) + _priority([r.rank for r in rows])])
    result = dedup_cluster.cluster(hashes, radius, prio, cap, engine=engine, threads=threads)
    log.info(
        "near-dup: %d hashes (%d previous), %d duplicates, candidates=%d huge_buckets=%d recursions=%d",
        len(hashes), len(prev), len(result.duplicates()), result.stats.candidates,
        result.stats.huge_buckets, result.stats.recursions,
    )
    yield from _decisions(ids, len(prev), result.label, result.representative, result.distance_to_rep)


def _cluster_embeddings(rows: list[_Row], threshold: float) -> Iterable[tuple[str, _Decision]]:
    rows = sorted(rows, key=lambda r: r.asset_id)
    if not rows:
        return
    ids = [r.asset_id for r in rows]
    x = np.stack([np.asarray(r.value, dtype=np.float32) for r in rows])
    pairs = dedup_semantic.cosine_pairs(x, threshold)
    label, rep = dedup_cluster.cluster_pairs(len(rows), pairs, _priority([r.rank for r in rows]))
    xn = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    sim_to_rep = np.einsum("ij,ij->i", xn, xn[rep])
    yield from _decisions(ids, 0, label, rep, np.round(sim_to_rep, 4))


class _ApplyDecision(beam.DoFn):
    """Join point: representatives (and singletons) continue, the rest become ledger rows."""

    def __init__(self, stage: str, reason: RejectReason, describe, count_in: bool):
        super().__init__()
        self.stage = stage
        self.reason = reason
        self.describe = describe
        self.count_in = count_in
        self._counters: StageCounters | None = None

    def setup(self) -> None:
        self._counters = StageCounters(self.stage)

    def process(self, element) -> Iterable:
        _, joined = element
        decisions = list(joined["decision"])
        for asset in joined["asset"]:
            if self.count_in:
                self._counters.seen.inc()
            if not decisions:
                self._counters.kept.inc()
                yield asset
                continue
            d = decisions[0]
            if d.dup_of is None:
                self._counters.kept.inc()
                yield asset if asset.cluster_id else asset.replace(cluster_id=d.cluster_id)
                continue
            self._counters.rejected(self.reason)
            yield beam.pvalue.TaggedOutput(
                REJECTED,
                asset.reject(self.stage, self.reason, self.describe(d), dup_of=d.dup_of, cluster_id=d.cluster_id),
            )


class _HashAsset(beam.DoFn):
    """Perceptual hash per asset; an undecodable image is a ledger ERROR row, not a crash.

    With hash_input="auto" a pHash already on the asset is trusted: decode can hash the
    full frame before it drops the source bytes, which keeps aspect-changing resizes
    within the radius (the 256 px centre crop does not)."""

    def __init__(self, stage: str, config: DedupConfig, count_in: bool = True):
        super().__init__()
        self.stage = stage
        self.config = config
        self.count_in = count_in  # False: the caller counts `in` where it decides (prepare.Decide)
        self._counters: StageCounters | None = None

    def setup(self) -> None:
        self._counters = StageCounters(self.stage)

    def process(self, asset: Asset) -> Iterable:
        if self.count_in:
            self._counters.seen.inc()
        cfg = self.config
        if cfg.hash_input == "auto" and cfg.hash_kind == "phash" and asset.phash:
            # computed upstream from the full frame (the best input; see docs/dedup.md)
            yield asset
            return
        try:
            data = _hash_input(asset, cfg.hash_input)
            value = dedup_hash.image_hash_from_bytes(data, cfg.hash_kind)
        except Exception as exc:  # noqa: BLE001 - the stage contract: errors become ledger rows
            if not self.count_in:
                self._counters.seen.inc()
            self._counters.rejected(RejectReason.ERROR)
            yield beam.pvalue.TaggedOutput(
                REJECTED, asset.reject(self.stage, RejectReason.ERROR, f"{type(exc).__name__}: {exc}"[:2000])
            )
            return
        yield asset.replace(phash=dedup_hash.hash_to_hex(value))


def _hash_input(asset: Asset, which: str) -> bytes:
    """Source bytes hash the full frame (robust to aspect changes: see docs/dedup.md); the
    normalised image is used when ingest dropped the source or when asked to."""
    if which == "source" or (which == "auto" and asset.source_bytes):
        if not asset.source_bytes:
            raise ValueError("no source bytes to hash (hash_input='source')")
        return asset.source_bytes
    if asset.image:
        return asset.image
    if asset.source_bytes:
        return asset.source_bytes
    raise ValueError("asset has neither a normalised image nor source bytes to hash")


def _describe_near(radius: int):
    def describe(d: _Decision) -> str:
        where = "a previous-run asset" if d.from_previous else "the cluster representative"
        return (
            f"pHash Hamming distance {int(d.distance)} to {where} {d.dup_of} "
            f"(cluster of {d.cluster_size}, radius {radius})"
        )

    return describe


def _describe_semantic(threshold: float):
    def describe(d: _Decision) -> str:
        return (
            f"CLIP cosine similarity {d.distance:.4f} to the cluster representative {d.dup_of} "
            f"(cluster of {d.cluster_size}, threshold {threshold})"
        )

    return describe


def _join_decisions(label: str, stage: str, reason: RejectReason, describe, assets, decisions, count_in: bool):
    keyed = assets | f"{label}KeyAssets" >> beam.Map(lambda a: (a.asset_id, a))
    joined = {"asset": keyed, "decision": decisions} | f"{label}Join" >> beam.CoGroupByKey()
    out = joined | f"{label}Apply" >> beam.ParDo(_ApplyDecision(stage, reason, describe, count_in)).with_outputs(
        REJECTED, main="kept"
    )
    return out.kept, out[REJECTED]


class DedupNearDuplicates(_DedupStage):
    """Perceptual-hash near duplicates, clustered over the whole delivery.

    Hash per asset (parallel) -> all (asset_id, hash, rank) rows to one place (a 1M-row
    uint64 array is 8 MB) -> exact radius search + union-find once -> join decisions back.
    Returns `(kept, rejected)`; kept assets carry `phash` and, in a cluster, `cluster_id`.
    """

    def __init__(self, config: DedupConfig, stage: str = "dedup_near", previous: beam.PCollection | None = None):
        super().__init__(config, stage, previous)

    def expand(self, assets: beam.PCollection):
        cfg = self.config
        previous = self.previous_hashes(assets)
        hashed = assets | "Hash" >> beam.ParDo(_HashAsset(self.stage, cfg)).with_outputs(REJECTED, main="kept")
        prefs = cfg.license_preference
        rows = hashed.kept | "Rows" >> beam.Map(
            lambda a: _Row(a.asset_id, dedup_hash.hex_to_hash(a.phash), representative_rank(a, prefs))
        )
        gathered = rows | "Gather" >> beam.CombineGlobally(beam.combiners.ToListCombineFn())
        decisions = gathered | "Cluster" >> beam.FlatMap(
            _cluster_hashes, beam.pvalue.AsList(previous), cfg.hamming_radius, cfg.bucket_cap, cfg.engine, cfg.threads
        )
        kept, rejected = _join_decisions(
            "", self.stage, RejectReason.NEAR_DUPLICATE, _describe_near(cfg.hamming_radius), hashed.kept, decisions, False
        )
        return kept, (hashed[REJECTED], rejected) | "Rejected" >> beam.Flatten()


class DedupSemantic(beam.PTransform):
    """SemDeDup-style: cosine similarity of image embeddings >= threshold, same bookkeeping.

    `embeddings` is a PCollection of (asset_id, np.float32 vector) from the CLIP stage; assets
    without an embedding pass through. Exact blocked all-pairs (fine for a delivery of up to
    ~100k; k-means partitioning as in SemDeDup is the next step for more).
    """

    def __init__(self, config: DedupConfig, embeddings: beam.PCollection, stage: str = "dedup_semantic"):
        super().__init__()
        if not isinstance(config, DedupConfig):
            raise TypeError("DedupSemantic needs a DedupConfig")
        self.config = config
        self.embeddings = embeddings
        self.stage = stage

    def expand(self, assets: beam.PCollection):
        cfg = self.config
        prefs = cfg.license_preference
        keyed = assets | "KeyForRows" >> beam.Map(lambda a: (a.asset_id, a))
        rows = (
            {"asset": keyed, "emb": self.embeddings}
            | "WithEmbedding" >> beam.CoGroupByKey()
            | "Rows" >> beam.FlatMap(
                lambda kv: [
                    _Row(a.asset_id, e, representative_rank(a, prefs))
                    for a in list(kv[1]["asset"])[:1]
                    for e in list(kv[1]["emb"])[:1]
                ]
            )
        )
        gathered = rows | "Gather" >> beam.CombineGlobally(beam.combiners.ToListCombineFn())
        decisions = gathered | "Cluster" >> beam.FlatMap(_cluster_embeddings, cfg.semantic_threshold)
        return _join_decisions(
            "", self.stage, RejectReason.SEMANTIC_DUPLICATE, _describe_semantic(cfg.semantic_threshold), assets, decisions, True
        )


class Dedup(beam.PTransform):
    """Exact, then near, then (if switched on and embeddings given) semantic dedup.

    Exact runs first because it is cheap and its groups would all be distance-0 near pairs;
    the previous run's hashes are read once and shared by both stages.
    """

    def __init__(self, config: DedupConfig, embeddings: beam.PCollection | None = None):
        super().__init__()
        if not isinstance(config, DedupConfig):
            raise TypeError("Dedup needs a DedupConfig")
        if config.semantic and embeddings is None:
            raise ValueError("semantic dedup is on but no embeddings PCollection was given")
        self.config = config
        self.embeddings = embeddings

    def expand(self, assets: beam.PCollection):
        cfg = self.config
        previous = assets.pipeline | "Previous" >> ReadPreviousHashes(cfg.previous_run)
        rejected = []
        kept = assets
        if cfg.exact:
            kept, rej = kept | "Exact" >> DedupExact(cfg, previous=previous)
            rejected.append(rej)
        if cfg.near:
            kept, rej = kept | "Near" >> DedupNearDuplicates(cfg, previous=previous)
            rejected.append(rej)
        if cfg.semantic:
            kept, rej = kept | "Semantic" >> DedupSemantic(cfg, self.embeddings)
            rejected.append(rej)
        if not rejected:
            empty = assets.pipeline | "NoRejections" >> beam.Create([])
            return kept, empty
        return kept, tuple(rejected) | "AllRejected" >> beam.Flatten()
