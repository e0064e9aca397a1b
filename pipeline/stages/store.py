"""Write the curated store: webdataset tar shards + one metadata Parquet per shard.

Records go to shard `stable_bucket(key, n)` where n = ceil(kept / samples_per_shard), are
sorted by key inside a shard, and tar headers are fixed (mtime 0, root owner), so the same
inputs and config give byte-identical shards; each file is written atomically.
"""

from __future__ import annotations

import io
import json
import math
import tarfile
from typing import Any, Iterable

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.metrics import Metrics

from pipeline import storage
from pipeline.records import Asset
from pipeline.stages.base import Stage

METADATA_SCHEMA = pa.schema([
    ("key", pa.string()),
    ("asset_id", pa.string()),
    ("shard", pa.int32()),
    ("manifest_uri", pa.string()),
    ("manifest_row", pa.int64()),
    ("source_uri", pa.string()),
    ("captions", pa.list_(pa.string())),
    ("license_id", pa.string()),
    ("license_name", pa.string()),
    ("license_url", pa.string()),
    ("licensor", pa.string()),
    ("allowed_uses", pa.list_(pa.string())),
    ("license_start", pa.string()),
    ("license_expiry", pa.string()),
    ("sha256", pa.string()),
    ("pixel_sha256", pa.string()),
    ("phash", pa.string()),
    ("cluster_id", pa.string()),
    ("source_format", pa.string()),
    ("source_mode", pa.string()),
    ("source_width", pa.int32()),
    ("source_height", pa.int32()),
    ("source_size", pa.int64()),
    ("image_bytes", pa.int32()),
    ("extra_json", pa.string()),
])


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


def metadata_row(asset: Asset, key: str, shard: int, image_bytes: int) -> dict[str, Any]:
    e = asset.entry
    return {
        "key": key,
        "asset_id": asset.asset_id,
        "shard": shard,
        "manifest_uri": asset.manifest_uri,
        "manifest_row": asset.manifest_row,
        "source_uri": asset.source_uri,
        "captions": list(asset.captions),
        "license_id": e.license_id,
        "license_name": e.license_name,
        "license_url": e.license_url,
        "licensor": e.licensor,
        "allowed_uses": list(e.allowed_uses),
        "license_start": e.license_start.isoformat() if e.license_start else None,
        "license_expiry": e.license_expiry.isoformat() if e.license_expiry else None,
        "sha256": asset.sha256,
        "pixel_sha256": asset.pixel_sha256,
        "phash": asset.phash,
        "cluster_id": asset.cluster_id,
        "source_format": asset.source_format,
        "source_mode": asset.source_mode,
        "source_width": asset.source_width,
        "source_height": asset.source_height,
        "source_size": asset.source_size,
        "image_bytes": image_bytes,
        "extra_json": extra_json(e),
    }


def extra_json(entry) -> str:
    """The manifest's extra fields as JSON, plus its validated `objects` when it has some
    (where an unknown `objects` field went before the field was known; rows without boxes
    give the same bytes as before)."""
    extra = dict(entry.extra)
    if entry.objects:
        extra["objects"] = [o.to_json() for o in entry.objects]
    return json.dumps(extra, sort_keys=True)


def shard_name(index: int, kind: str = "images", ext: str = "tar") -> str:
    return f"{kind}-{index:06d}.{ext}"


def _tar_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def write_shard(out_dir: str, shard: int, records: Iterable[tuple[str, Asset]]) -> dict[str, Any]:
    """Write one tar + metadata Parquet; returns the shard's index entry."""
    ordered = sorted(records, key=lambda kv: kv[0])
    tar_url = storage.join(out_dir, shard_name(shard))
    rows = []
    with storage.atomic_open(tar_url, "wb") as handle:
        with tarfile.open(fileobj=handle, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for key, asset in ordered:
                image = asset.image_bytes()
                _tar_member(tar, f"{key}.jpg", image)
                meta = json.dumps(sample_json(asset, key, shard), sort_keys=True, ensure_ascii=False)
                _tar_member(tar, f"{key}.json", meta.encode("utf-8"))
                rows.append(metadata_row(asset, key, shard, len(image)))
    table = pa.Table.from_pylist(rows, schema=METADATA_SCHEMA)
    meta_url = storage.join(out_dir, shard_name(shard, "metadata", "parquet"))
    storage.write_table(meta_url, table)
    return {
        "shard": shard,
        "tar": shard_name(shard),
        "metadata": shard_name(shard, "metadata", "parquet"),
        "samples": len(ordered),
        "tar_sha256": storage.file_sha256(tar_url),
    }


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


def write_index(out_dir: str, shards: list[dict[str, Any]]) -> dict[str, Any]:
    """`index.json`: every shard with its sample count and tar sha256 (readers start here)."""
    ordered = sorted(shards, key=lambda s: s["shard"])
    index = {"format": "webdataset", "samples": sum(s["samples"] for s in ordered), "shards": ordered}
    storage.write_json(storage.join(out_dir, "index.json"), index)
    return index


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
