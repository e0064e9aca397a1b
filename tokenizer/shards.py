"""The curated store's format, in one Beam-free place: sample fields, metadata schema, the
tar writer and reader, and the project's one atomic file writer.

A shard `images-NNNNNN.tar` is a plain tar whose members share a key: `KEY.jpg` (RGB JPEG,
`decode.resolution`² centre crop) and `KEY.json` (every manifest field plus what the pipeline
derived; docs/outputs.md). Beside it, `metadata-NNNNNN.parquet` holds one row per sample
(`METADATA_SCHEMA`), and `index.json` lists the shards. The pipeline (`pipeline.stages.store`),
the test fixtures and the benchmarks all write through `write_shard`, and every reader goes
through `iter_shard`, so the training side (`tokenizer/`, `trainer/`) needs no Beam.

Writer: `webdataset.TarWriter` with fixed headers (mtime 0, root owner, mode 0644), so the same
samples give the same bytes. TarWriter ignores its `format` argument and writes PAX, which for
our ASCII names under 100 characters is byte for byte the USTAR tar we wrote before (a test
holds it). Reader: not webdataset's `tar_file_iterator`, which opens with `r|*` (transparent
gzip/bz2/xz: a 285 KB gzip becomes 300 MB in memory) and reads every member whole; ours reads
plain tar only, streaming (`r|`) from any fsspec URL, and skips a member over
`max_member_bytes` with a warning before reading it. The held-out split is a pure function of
the key, so every tool agrees on it.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import tarfile
import uuid
from dataclasses import dataclass, field
from typing import IO, Any, Iterable, Iterator

import fsspec
import numpy as np
import pyarrow as pa
from PIL import Image

log = logging.getLogger(__name__)

HELDOUT_PERCENT = 10
MAX_MEMBER_BYTES = 64 * 1024 * 1024  # a member bigger than this is skipped, never read into memory

# ------------------------------------------------------------------------------ atomic writes


@contextlib.contextmanager
def atomic_open(url: str, mode: str = "wb") -> Iterator[IO[Any]]:
    """Open `url` (any fsspec URL) for writing; the data appears under its name only when the
    block exits cleanly: written as `.tmp-<uuid>-<name>` in the same folder, then renamed, so a
    reader (or a resumed run) never sees half a file. The project's one atomic writer."""
    fs, path = fsspec.core.url_to_fs(url)
    parent = path.rsplit("/", 1)[0] if "/" in path else ""
    if parent:
        fs.makedirs(parent, exist_ok=True)
    tmp = f"{parent}/.tmp-{uuid.uuid4().hex}-{path.rsplit('/', 1)[-1]}" if parent else f".tmp-{uuid.uuid4().hex}"
    try:
        with fs.open(tmp, mode) as handle:
            yield handle
        if getattr(fs, "protocol", None) in ("file", ("file", "local")) or fs.__class__.__name__ == "LocalFileSystem":
            os.replace(tmp, path)
        else:
            fs.mv(tmp, path)
    except BaseException:
        with contextlib.suppress(Exception):
            fs.rm(tmp)
        raise


def write_bytes_atomic(url: str, data: bytes) -> None:
    """`data` as the whole file `url`, atomically (`atomic_open`)."""
    with atomic_open(url, "wb") as handle:
        handle.write(data)


# ------------------------------------------------------------------------------ the format

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
# metadata columns copied from `KEY.json` as they are; the rest are derived below
_COPIED = tuple(n for n in METADATA_SCHEMA.names if n not in ("image_bytes", "extra_json"))


def shard_name(index: int, kind: str = "images", ext: str = "tar") -> str:
    return f"{kind}-{index:06d}.{ext}"


def extra_json(meta: dict[str, Any]) -> str:
    """A sample's unknown manifest fields (`extra`) as JSON, plus its validated `objects` when it
    has some (where an unknown `objects` field went before the field was known; rows without
    boxes give the same bytes as before)."""
    extra = dict(meta.get("extra") or {})
    if meta.get("objects"):
        extra["objects"] = list(meta["objects"])
    return json.dumps(extra, sort_keys=True)


def metadata_row(meta: dict[str, Any], image_bytes: int) -> dict[str, Any]:
    """A sample's metadata Parquet row, from its `KEY.json` (absent fields are null)."""
    row = {name: meta.get(name) for name in _COPIED}
    row["image_bytes"] = image_bytes
    row["extra_json"] = extra_json(meta)
    return row


def sample_json_bytes(meta: dict[str, Any]) -> bytes:
    """The `KEY.json` member: sorted keys, UTF-8."""
    return json.dumps(meta, sort_keys=True, ensure_ascii=False).encode("utf-8")


@contextlib.contextmanager
def tar_writer(handle: IO[bytes]) -> Iterator[Any]:
    """A `webdataset.TarWriter` on an open binary handle, with fixed headers (reproducible bytes).
    `write({"__key__": KEY, EXT: bytes, ...})` adds `KEY.EXT` members, extensions sorted."""
    import webdataset as wds

    with wds.TarWriter(handle, user="", group="", mode=0o644, mtime=0, encoder=False) as writer:
        yield writer


class _Sha256Writer:
    """A write-only handle that hashes what passes through it (the shard's sha256, no re-read)."""

    def __init__(self, handle: IO[bytes]):
        self.handle, self.digest = handle, hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        return self.handle.write(data)


def write_shard(out_dir: str, shard: int, samples: Iterable[tuple[str, bytes, dict[str, Any]]]) -> dict[str, Any]:
    """Write `(key, jpeg, meta)` samples, sorted by key, as one tar + its metadata Parquet under
    `out_dir` (any fsspec URL), each atomically; returns the shard's `index.json` entry. Samples
    are consumed one at a time, so a caller can stream the images."""
    import pyarrow.parquet as pq

    rows: list[dict[str, Any]] = []
    with atomic_open(f"{out_dir.rstrip('/')}/{shard_name(shard)}", "wb") as handle:
        hashing = _Sha256Writer(handle)
        with tar_writer(hashing) as tar:
            for key, jpeg, meta in samples:
                if rows and key < rows[-1]["key"]:
                    raise ValueError(f"shard {shard}: samples must come sorted by key ({key} after {rows[-1]['key']})")
                tar.write({"__key__": key, "jpg": jpeg, "json": sample_json_bytes(meta)})
                rows.append(metadata_row({**meta, "key": key, "shard": shard}, len(jpeg)))
    with atomic_open(f"{out_dir.rstrip('/')}/{shard_name(shard, 'metadata', 'parquet')}", "wb") as handle:
        pq.write_table(pa.Table.from_pylist(rows, schema=METADATA_SCHEMA), handle, compression="zstd")
    return {"shard": shard, "tar": shard_name(shard), "metadata": shard_name(shard, "metadata", "parquet"),
            "samples": len(rows), "tar_sha256": hashing.digest.hexdigest()}


def write_index(out_dir: str, shards: list[dict[str, Any]]) -> dict[str, Any]:
    """`index.json`: every shard with its sample count and tar sha256 (readers start here)."""
    ordered = sorted(shards, key=lambda s: s["shard"])
    index = {"format": "webdataset", "samples": sum(s["samples"] for s in ordered), "shards": ordered}
    text = json.dumps(index, indent=2, sort_keys=True, default=str) + "\n"
    write_bytes_atomic(f"{out_dir.rstrip('/')}/index.json", text.encode("utf-8"))
    return index


def write_store(samples: Iterable[tuple[str, bytes, dict[str, Any]]], out_dir: str, per_shard: int = 1000) -> list[str]:
    """A whole small store (tests, benchmarks) through the pipeline's writer: samples sorted by
    key, `per_shard` to a shard, metadata Parquet and `index.json`; returns the tar URLs."""
    items = sorted(samples, key=lambda s: s[0])
    entries = []
    for i, start in enumerate(range(0, len(items), per_shard)):
        chunk = items[start:start + per_shard]
        entries.append(write_shard(out_dir, i, ((k, jpeg, {**meta, "key": k, "shard": i}) for k, jpeg, meta in chunk)))
    write_index(out_dir, entries)
    return [f"{out_dir.rstrip('/')}/{e['tar']}" for e in entries]


# ------------------------------------------------------------------------------ reading


@dataclass(frozen=True)
class CuratedSample:
    """One curated image with its metadata; pixels are decoded on demand."""

    key: str
    jpeg: bytes = field(repr=False)
    meta: dict[str, Any]

    def image(self) -> Image.Image:
        return decode_rgb(self.jpeg)

    def array(self) -> np.ndarray:
        """uint8 [H, W, 3]."""
        return np.asarray(self.image(), dtype=np.uint8)


def decode_rgb(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()
    return img if img.mode == "RGB" else img.convert("RGB")


def key_bucket(key: str) -> int:
    """Stable bucket 0..99 of a key (sha256, not Python's salted hash)."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") % 100


def is_heldout(key: str, percent: int = HELDOUT_PERCENT) -> bool:
    return key_bucket(key) < percent


def list_shards(curated_url: str, pattern: str = "images-*.tar") -> list[str]:
    """Sorted shard URLs under a curated folder (any fsspec URL)."""
    fs, root = fsspec.core.url_to_fs(curated_url)
    paths = sorted(fs.glob(root.rstrip("/") + "/" + pattern))
    return [fs.unstrip_protocol(p) if "://" in curated_url else p for p in paths]


def iter_members(url: str, max_member_bytes: int | None = MAX_MEMBER_BYTES) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of every file member of a plain tar, in file order, streaming.

    Plain tar only (no transparent decompression: a 285 KB gzip must not become 300 MB in
    memory); a member larger than `max_member_bytes` (None: no cap) is skipped with a warning,
    never read."""
    with fsspec.open(url, "rb") as raw, tarfile.open(fileobj=raw, mode="r|") as tar:
        for member in tar:
            if not member.isfile():
                continue
            if max_member_bytes is not None and member.size > max_member_bytes:
                log.warning("shard %s: member %s is %d bytes (> %d); skipped", url, member.name, member.size,
                            max_member_bytes)
                continue
            fobj = tar.extractfile(member)
            yield member.name, fobj.read() if fobj is not None else b""


def iter_shard(url: str, max_member_bytes: int = MAX_MEMBER_BYTES) -> Iterator[CuratedSample]:
    """Yield the samples of one tar shard in file order, streaming (members grouped by key;
    safety rules of `iter_members`). A key without a `jpg` member is skipped with a warning."""
    current: str | None = None
    parts: dict[str, bytes] = {}
    for name, data in iter_members(url, max_member_bytes):
        key, _, ext = name.rsplit("/", 1)[-1].partition(".")
        if current is not None and key != current:
            sample = _make_sample(current, parts, url)
            if sample is not None:
                yield sample
            parts = {}
        current = key
        parts[ext.lower()] = data
    if current is not None:
        sample = _make_sample(current, parts, url)
        if sample is not None:
            yield sample


def _make_sample(key: str, parts: dict[str, bytes], url: str) -> CuratedSample | None:
    jpeg = parts.get("jpg") or parts.get("jpeg")
    if jpeg is None:
        log.warning("shard %s: key %s has no jpg member; skipped", url, key)
        return None
    meta = json.loads(parts["json"]) if "json" in parts else {"key": key}
    return CuratedSample(key=key, jpeg=jpeg, meta=meta)


def iter_samples(urls: Iterable[str], split: str | None = None, heldout_percent: int = HELDOUT_PERCENT) -> Iterator[CuratedSample]:
    """Samples of several shards; `split` is None (all), "train" or "heldout"."""
    if split not in (None, "train", "heldout"):
        raise ValueError(f"split must be None, 'train' or 'heldout', got {split!r}")
    for url in urls:
        for sample in iter_shard(url):
            if split is None or (split == "heldout") == is_heldout(sample.key, heldout_percent):
                yield sample


def iter_code_rows(urls: Iterable[str]) -> Iterator[tuple[str, str, np.ndarray]]:
    """(key, asset_id, codes uint16 [h, w]) from `codes-NNNNNN.parquet` files written by the encode stage.

    Lets a training team read image codes without Beam; decode pixels with `load_vq(...).decode_codes`.
    """
    import pyarrow.parquet as pq

    for url in urls:
        with fsspec.open(url, "rb") as f:
            table = pq.read_table(f)
        for row in table.to_pylist():
            codes = np.asarray(row["codes"], dtype=np.uint16).reshape(row["h"], row["w"])
            yield row["key"], row["asset_id"], codes
