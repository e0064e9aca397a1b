"""Output paths on any fsspec filesystem: atomic writes, listing, removal, stable keys.

A file is written under a temporary name in the same folder and renamed when complete,
so a reader (or a resumed run) never sees half a shard. The one atomic writer,
`atomic_open`, lives in `tokenizer.shards` (Beam-free, so `tokenizer/` and `trainer/` use it
too); it is re-exported here for the pipeline.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import IO, Any

import fsspec
from fsspec.core import url_to_fs

from tokenizer.shards import atomic_open, write_bytes_atomic  # noqa: F401  (atomic_open: re-exported)


def join(base: str, *parts: str) -> str:
    base = base.rstrip("/")
    return "/".join([base, *[p.strip("/") for p in parts]])


def asset_key(asset_id: str) -> str:
    """Stable 16-hex key for an asset (webdataset keys cannot hold dots or slashes)."""
    return hashlib.blake2b(asset_id.encode("utf-8"), digest_size=8).hexdigest()


def stable_bucket(key: str, buckets: int) -> int:
    """Deterministic bucket of a key, independent of Python's hash seed and of partitioning."""
    digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % buckets


def write_bytes(url: str, data: bytes) -> None:
    """`data` as the whole file `url`, atomically (`tokenizer.shards.write_bytes_atomic`)."""
    write_bytes_atomic(url, data)


def write_json(url: str, value: Any) -> None:
    write_bytes(url, (json.dumps(value, indent=2, sort_keys=True, default=str) + "\n").encode("utf-8"))


def read_json(url: str) -> Any:
    with fsspec.open(url, "rt", encoding="utf-8") as handle:
        return json.load(handle)


def exists(url: str) -> bool:
    fs, path = url_to_fs(url)
    return fs.exists(path)


def remove_tree(url: str) -> None:
    fs, path = url_to_fs(url)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def list_files(url: str, pattern: str) -> list[str]:
    """Sorted full URLs of files in folder `url` matching a glob pattern."""
    fs, path = url_to_fs(url)
    found = sorted(fs.glob(f"{path.rstrip('/')}/{pattern}"))
    protocol = fs.protocol[0] if isinstance(fs.protocol, (tuple, list)) else fs.protocol
    if protocol in ("file", "local"):
        return found
    return [f"{protocol}://{p.lstrip('/')}" if protocol != "memory" else f"memory://{p}" for p in found]


def file_sha256(url: str) -> str:
    digest = hashlib.sha256()
    with fsspec.open(url, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class SpanWriter:
    """An append-only file of many small objects; `append` returns a `file@offset:length`
    pointer that `read_span` reads back. Opened on the first append; writing again to the
    same URL (a retried bundle) starts it over."""

    def __init__(self, url: str, flush_each: bool = False):
        self.url = url
        self.flush_each = flush_each  # for a reader fused into the same bundle
        self._handle: IO[bytes] | None = None
        self._offset = 0

    def append(self, data: bytes) -> str:
        if self._handle is None:
            fs, path = url_to_fs(self.url)
            if "/" in path:
                fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
            self._handle = fs.open(path, "wb")
            self._offset = 0
        self._handle.write(data)
        if self.flush_each:
            self._handle.flush()
        ref = f"{self.url}@{self._offset}:{len(data)}"
        self._offset += len(data)
        return ref

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


def read_span(ref: str) -> bytes:
    """The bytes behind a `file@offset:length` pointer (a plain URL: the whole file)."""
    url, _, span = ref.rpartition("@")
    offset, _, length = span.partition(":")
    if not url or not length.isdigit():
        url, offset, length = ref, "0", "-1"
    opener = open if "://" not in url else fsspec.open  # local: skip fsspec's URL handling
    with opener(url, "rb") as handle:
        handle.seek(int(offset))
        return handle.read(int(length))


_SECRET_QUERY_KEYS = ("signature", "sig", "token", "credential", "security-token", "key", "password", "secret", "auth")


def redact_url(url: str | None) -> str | None:
    """`url` with credentials masked: the password of `user:password@`, and the values of
    query parameters that carry a secret (presigned S3/GCS signatures, Azure SAS `sig`,
    tokens, keys). What the ledger, the metadata, the logs and the reasons show."""
    if not url or "://" not in url:
        return url
    from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

    try:
        parts = urlsplit(url)
    except ValueError:
        return url.split("://", 1)[0] + "://<unparseable URL>"
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        user = userinfo.split(":", 1)[0]
        netloc = f"{user}:***@{host}" if ":" in userinfo else f"***@{host}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        masked = [(k, "***" if any(s in k.lower() for s in _SECRET_QUERY_KEYS) else v) for k, v in pairs]
        if masked != pairs:
            query = urlencode(masked, safe="*")
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


_SECRET_IN_TEXT = re.compile(
    r"(?P<param>[?&][^=&\s\"']*(?:" + "|".join(re.escape(k) for k in _SECRET_QUERY_KEYS) + r")[^=&\s\"']*=)[^&\s\"']+"
    r"|(?P<auth>://[^/@\s:\"']+:)[^/@\s\"']+@", re.IGNORECASE)


def redact_text(text: str) -> str:
    """Credentials masked wherever a URL appears inside free text (a log line, an error)."""
    def mask(match: re.Match) -> str:
        return match.group("param") + "***" if match.group("param") else match.group("auth") + "***@"

    return _SECRET_IN_TEXT.sub(mask, text)


class RedactingFilter:
    """A logging filter that masks URL credentials in every record it sees (for urllib3's and
    fsspec's debug lines, which print request URLs whole)."""

    def filter(self, record) -> bool:
        message = record.getMessage()
        masked = redact_text(message)
        if masked != message:
            record.msg, record.args = masked, ()
        return True


def read_table(url: str, columns=None):
    """A Parquet file (any fsspec URL) as a pyarrow Table, optionally only `columns`."""
    import pyarrow.parquet as pq

    with fsspec.open(url, "rb") as handle:
        return pq.read_table(handle, columns=list(columns) if columns else None)


def write_table(url: str, table) -> None:
    """A pyarrow Table as a zstd Parquet file, written atomically (the project's one Parquet writer
    for whole tables; Beam sinks aside)."""
    import pyarrow.parquet as pq

    with atomic_open(url, "wb") as handle:
        pq.write_table(table, handle, compression="zstd")
