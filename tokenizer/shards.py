"""Streaming reader (and a small writer) for the curated store's webdataset tar shards.

A shard is a plain tar whose members share a key: `KEY.jpg` (RGB JPEG, 256x256) and `KEY.json`
(asset_id, key, captions, license_id, ...). We stream members with `tarfile` in pipe mode so a
shard on any fsspec URL is read once, front to back, without loading the corpus into memory.
The held-out split is a pure function of the key, so every tool agrees on it.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import tarfile
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

import fsspec
import numpy as np
from PIL import Image

log = logging.getLogger(__name__)

HELDOUT_PERCENT = 10


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


MAX_MEMBER_BYTES = 64 * 1024 * 1024  # a member bigger than this is skipped, never read into memory


def iter_shard(url: str, max_member_bytes: int = MAX_MEMBER_BYTES) -> Iterator[CuratedSample]:
    """Yield the samples of one tar shard in file order, streaming.

    Shards are plain tar (no transparent decompression: a 285 KB gzip must not become 300 MB
    in memory), and a member larger than `max_member_bytes` is skipped with a warning.
    """
    with fsspec.open(url, "rb") as raw, tarfile.open(fileobj=raw, mode="r|") as tar:
        current: str | None = None
        parts: dict[str, bytes] = {}
        for member in tar:
            if not member.isfile():
                continue
            if member.size > max_member_bytes:
                log.warning("shard %s: member %s is %d bytes (> %d); skipped", url, member.name, member.size,
                            max_member_bytes)
                continue
            name = member.name.rsplit("/", 1)[-1]
            key, _, ext = name.partition(".")
            if current is not None and key != current:
                sample = _make_sample(current, parts, url)
                if sample is not None:
                    yield sample
                parts = {}
            current = key
            fobj = tar.extractfile(member)
            parts[ext.lower()] = fobj.read() if fobj is not None else b""
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


def write_image_shards(samples: Iterable[tuple[str, bytes, dict[str, Any]]], out_dir: str, per_shard: int = 1000) -> list[str]:
    """Write (key, jpeg, meta) triples as `images-NNNNNN.tar` shards, sorted by key.

    Meant for tests and benchmarks; the pipeline has its own writer with the same format.
    """
    items = sorted(samples, key=lambda s: s[0])
    fs, root = fsspec.core.url_to_fs(out_dir)
    fs.makedirs(root, exist_ok=True)
    urls = []
    for shard_idx, start in enumerate(range(0, len(items), per_shard)):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for key, jpeg, meta in items[start : start + per_shard]:
                for ext, data in (("jpg", jpeg), ("json", json.dumps(meta, sort_keys=True).encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    info.mtime = 0
                    tar.addfile(info, io.BytesIO(data))
        url = f"{out_dir.rstrip('/')}/images-{shard_idx:06d}.tar"
        with fsspec.open(url, "wb") as f:
            f.write(buf.getvalue())
        urls.append(url)
    return urls


def normalise_photo(path: str, size: int = 256, quality: int = 95) -> bytes:
    """Resize (shorter side) + centre crop to `size` and re-encode as JPEG, like the curated store."""
    with fsspec.open(path, "rb") as f:
        img = decode_rgb(f.read())
    scale = size / min(img.size)
    w, h = max(size, round(img.width * scale)), max(size, round(img.height * scale))
    img = img.resize((w, h), Image.Resampling.BICUBIC)
    left, top = (w - size) // 2, (h - size) // 2
    img = img.crop((left, top, left + size, top + size))
    out = io.BytesIO()
    img.save(out, format="JPEG", quality=quality)
    return out.getvalue()


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
