"""Write the curated store: webdataset tar shards + one metadata Parquet per shard.

Records go to shard `stable_bucket(key, n)` where n = ceil(kept / samples_per_shard) and are
sorted by key inside a shard. The format itself (sample fields, metadata schema, the tar
writer with fixed headers, the reader) is `tokenizer.shards`, Beam-free; this module maps
`Asset` records onto it and runs it under Beam.
"""

from __future__ import annotations

import io
import json
import math
from typing import Any, Iterable

import apache_beam as beam
import pyarrow.parquet as pq
from apache_beam.metrics import Metrics

from pipeline import storage
from pipeline.records import Asset
from pipeline.stages.base import Stage
from tokenizer import shards as curated_format
from tokenizer.shards import write_index


def sample_json(asset: Asset, key: str, shard: int) -> dict[str, Any]:
    """The `key.json` member: every manifest field plus what the pipeline derived."""
    meta = asset.entry.to_json()
    meta.update(
        key=key,
        shard=shard,
        captions=list(asset.captions),
        manifest_captions=list(asset.entry.captions),
        manifest_uri=asset.manifest_uri,
        manifest_row=asset.manifest_row,
        source_uri=asset.source_uri,
        sha256=asset.sha256,
        manifest_sha256=asset.entry.sha256,
        pixel_sha256=asset.pixel_sha256,
        phash=asset.phash,
        cluster_id=asset.cluster_id,
        source_format=asset.source_format,
        source_mode=asset.source_mode,
        source_width=asset.source_width,
        source_height=asset.source_height,
        source_size=asset.source_size,
    )
    return meta


def extra_json(entry) -> str:
    """The manifest's extra fields (and validated `objects`) as the metadata's `extra_json`."""
    return curated_format.extra_json(entry.to_json())


def write_shard(out_dir: str, shard: int, records: Iterable[tuple[str, Asset]]) -> dict[str, Any]:
    """Write one tar + metadata Parquet (`tokenizer.shards.write_shard`); returns the shard's index entry.
    Images are read one at a time from staging, in key order."""
    ordered = sorted(records, key=lambda kv: kv[0])
    return curated_format.write_shard(
        out_dir, shard, ((key, asset.image_bytes(), sample_json(asset, key, shard)) for key, asset in ordered))


class StageImages(beam.DoFn):
    """Spill normalised JPEGs to `staging_dir` so later shuffles carry only small records.

    Grouping records into shards is a shuffle; with the pixels in the records, a runner
    holds the whole corpus in memory there. Each bundle appends its images to one staging
    file (one open per bundle, not per image) and the record keeps `file@offset:length`.
    The staging folder is cleared whenever its step (re)starts.
    """

    def __init__(self, staging_dir: str):
        super().__init__()
        self.staging_dir = staging_dir
        self._writer: storage.SpanWriter | None = None

    def start_bundle(self) -> None:
        import uuid

        # a consumer fused into this bundle may read an image right away: flush each one
        self._writer = storage.SpanWriter(storage.join(self.staging_dir, f"{uuid.uuid4().hex}.bin"), flush_each=True)

    def process(self, asset: Asset):
        if asset.image is None:
            yield asset
            return
        yield asset.replace(image=None, image_uri=self._writer.append(asset.image))

    def finish_bundle(self) -> None:
        self._writer.close()


class _WriteShard(beam.DoFn):
    def __init__(self, out_dir: str):
        super().__init__()
        self.out_dir = out_dir
        self.written = Metrics.counter(Stage.STORE, "samples_written")

    def process(self, item):
        shard, records = item
        entry = write_shard(self.out_dir, shard, records)
        self.written.inc(entry["samples"])
        yield entry


def shard_count(kept: int, samples_per_shard: int) -> int:
    return max(1, math.ceil(kept / samples_per_shard))


class WriteCuratedStore(beam.PTransform):
    """Assets -> tar + Parquet shards under `out_dir`; emits one index entry per shard."""

    def __init__(self, out_dir: str, samples_per_shard: int):
        super().__init__()
        self.out_dir = out_dir
        self.samples_per_shard = samples_per_shard

    def expand(self, assets):
        per_shard = self.samples_per_shard
        count = assets | "Count" >> beam.combiners.Count.Globally()

        def assign(asset: Asset, total: int):
            key = storage.asset_key(asset.asset_id)
            return storage.stable_bucket(key, shard_count(total, per_shard)), (key, asset)

        out_dir = self.out_dir
        entries = (
            assets
            | "AssignShard" >> beam.Map(assign, total=beam.pvalue.AsSingleton(count))
            | "GroupByShard" >> beam.GroupByKey()
            | "WriteShard" >> beam.ParDo(_WriteShard(out_dir))
        )
        return (
            entries
            | "CollectIndex" >> beam.combiners.ToList()
            | "WriteIndex" >> beam.Map(lambda shards: write_index(out_dir, shards))
        )


def asset_from_sample(meta: dict[str, Any], jpeg: bytes) -> Asset:
    """Rebuild an `Asset` from a curated sample (`key.json` + `key.jpg`)."""
    from manifests.schema import parse_entry

    fields = {k: meta.get(k) for k in ("asset_id", "uri", "license_id", "license_name", "license_url", "licensor",
                                        "allowed_uses", "license_start", "license_expiry", "width", "height",
                                        "objects")}
    fields["captions"] = meta.get("manifest_captions") or meta.get("captions") or []
    if meta.get("manifest_sha256"):
        fields["sha256"] = meta["manifest_sha256"]
    fields.update(meta.get("extra") or {})
    entry = parse_entry(fields)
    return Asset(
        entry=entry,
        manifest_uri=meta["manifest_uri"],
        manifest_row=meta["manifest_row"],
        source_uri=meta.get("source_uri"),
        sha256=meta.get("sha256"),
        source_size=meta.get("source_size"),
        source_format=meta.get("source_format"),
        source_width=meta.get("source_width"),
        source_height=meta.get("source_height"),
        source_mode=meta.get("source_mode"),
        image=jpeg,
        pixel_sha256=meta.get("pixel_sha256"),
        phash=meta.get("phash"),
        cluster_id=meta.get("cluster_id"),
        captions=tuple(meta.get("captions") or ()),
    )


def encode_record(asset: Asset) -> bytes:
    """A staged asset as data: its sample JSON (what `key.json` holds) plus the staged image's
    pointer. Never a pickle: a staged file is read back by other workers, and whoever can
    write to OUT must not be able to run code through it (docs/security.md)."""
    meta = sample_json(asset, key="", shard=-1)
    meta["image_uri"] = asset.image_uri
    return json.dumps(meta, sort_keys=True, allow_nan=False).encode("utf-8")


def decode_record(data: bytes) -> Asset:
    """`encode_record` reversed; a record that is not what we wrote raises ValueError."""
    meta = json.loads(data.decode("utf-8"))
    if not isinstance(meta, dict) or not isinstance(meta.get("image_uri"), str):
        raise ValueError("a staged record that this pipeline did not write")
    return asset_from_sample(meta, None).replace(image_uri=meta["image_uri"])


def read_shard(url: str) -> Iterable[Asset]:
    """Stream the assets of one curated tar shard (pairs `KEY.jpg` with `KEY.json`)."""
    from tokenizer.shards import iter_shard

    for sample in iter_shard(url):
        yield asset_from_sample(sample.meta, sample.jpeg)


class ReadCuratedStore(beam.PTransform):
    """Curated (or prepared) store folder -> Asset per sample, one reader per shard.

    No reshuffle here: the records carry pixels, and parallelism comes from the shards.
    """

    def __init__(self, store_dir: str):
        super().__init__()
        self.store_dir = store_dir

    def expand(self, pbegin):
        shards = storage.list_files(self.store_dir, "images-*.tar")
        return (
            pbegin
            | "ShardUrls" >> beam.Create(shards)
            | "ReadShard" >> beam.FlatMap(read_shard)
        )


class _WriteKeyedShard(beam.DoFn):
    def __init__(self, out_dir: str, prefix: str, to_table):
        super().__init__()
        self.out_dir = out_dir.rstrip("/")
        self.prefix = prefix
        self.to_table = to_table

    def process(self, item: tuple[int, Iterable[dict[str, Any]]]) -> Iterable[str]:
        shard, rows = item
        buf = io.BytesIO()
        pq.write_table(self.to_table(list(rows)), buf)
        url = f"{self.out_dir}/{self.prefix}-{shard:06d}.parquet"
        storage.write_bytes(url, buf.getvalue())
        yield url


class WriteKeyedParquet(beam.PTransform):
    """Dict rows with a `key` -> `out_dir/<prefix>-NNNNNN.parquet`: shard = stable hash of the
    key, `to_table` (a module-level function) sorts and types the rows, atomic writes; yields URLs."""

    def __init__(self, out_dir: str, prefix: str, to_table, num_shards: int = 4, label: str | None = None):
        super().__init__(label)
        if num_shards < 1:
            raise ValueError("num_shards must be >= 1")
        self.out_dir, self.prefix, self.to_table, self.num_shards = out_dir, prefix, to_table, num_shards

    def expand(self, rows: beam.PCollection):
        n = self.num_shards
        return (
            rows
            | "Shard" >> beam.Map(lambda r: (storage.stable_bucket(r["key"], n), r))
            | "Group" >> beam.GroupByKey()
            | "Write" >> beam.ParDo(_WriteKeyedShard(self.out_dir, self.prefix, self.to_table))
        )
