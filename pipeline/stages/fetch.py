"""Fetch source bytes through fsspec: allowed roots only, bounded retries, checksum verify."""

from __future__ import annotations

import hashlib
import io
import logging
import os
import posixpath
import time
from urllib.parse import urlsplit

import fsspec

from pipeline.config import FetchConfig, missing_backend
from pipeline.records import Asset, RejectReason
from pipeline.stages.base import Reject, StageDoFn

log = logging.getLogger(__name__)


def split_url(url: str) -> tuple[str, str]:
    """(scheme, path) with local paths as scheme 'file' and an absolute, normalised path."""
    if "://" in url:
        scheme, rest = url.split("://", 1)
        scheme = scheme.lower()
        if scheme == "file":
            return "file", os.path.realpath(rest or "/")
        parts = urlsplit(url)
        if parts.netloc and scheme in ("http", "https"):
            return scheme, f"{parts.netloc.lower()}{posixpath.normpath(parts.path or '/')}"
        return scheme, posixpath.normpath("/" + rest).lstrip("/") if scheme != "memory" else posixpath.normpath("/" + rest)
    return "file", os.path.realpath(url)


def resolve_uri(uri: str, manifest_uri: str) -> str:
    """An absolute URL stays; a relative one is joined to the manifest's folder."""
    if "://" in uri or uri.startswith("/"):
        return uri
    base = manifest_uri.rsplit("/", 1)[0] if "/" in manifest_uri else "."
    if "://" in base:
        scheme, path = base.split("://", 1)
        return f"{scheme}://{posixpath.normpath(posixpath.join(path, uri))}"
    return os.path.normpath(os.path.join(base, uri))


def manifest_root(manifest_uri: str) -> str:
    return manifest_uri.rsplit("/", 1)[0] if "/" in manifest_uri else "."


def is_allowed(url: str, roots: tuple[str, ...], schemes: tuple[str, ...]) -> tuple[bool, str]:
    """True when `url` uses an allowed scheme and lies under one of `roots` (after `..`/symlinks)."""
    scheme, path = split_url(url)
    if scheme not in schemes:
        why = missing_backend(scheme)
        return False, (f"scheme {scheme!r} has no backend installed here: {why}" if why
                       else f"scheme {scheme!r} is not in allowed_schemes")
    for root in roots:
        root_scheme, root_path = split_url(root)
        if root_scheme != scheme:
            continue
        prefix = root_path.rstrip("/")
        if path == prefix or path.startswith(prefix + "/"):
            return True, ""
    return False, f"{url} is outside the allowed roots"


class _Transient(Exception):
    pass


_CHUNK = 1 << 20


def _read_capped(handle, cap: int) -> bytes:
    """Read at most cap + 1 bytes (one more than allowed tells an oversized object apart).

    Never asks for `cap + 1` bytes in one call: `read(n)` allocates n bytes up front, and a
    64 MiB buffer per image both costs time and, once glibc raises its mmap threshold,
    fragments the heap so a worker's RSS grows with every image it has fetched. The size is
    taken from the file when it is known, else the object is read in 1 MiB chunks.
    """
    size = None
    try:
        size = os.fstat(handle.fileno()).st_size
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        size = getattr(handle, "size", None)
    if isinstance(size, int) and size > cap:
        raise Reject(RejectReason.FETCH_FAILED, f"object is larger than fetch.max_bytes={cap}")
    if isinstance(size, int) and size >= 0:
        return handle.read(size + 1)  # + 1: an object that grew since stat is still caught
    chunks: list[bytes] = []
    total = 0
    while total <= cap:
        chunk = handle.read(min(_CHUNK, cap + 1 - total))
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
    return b"".join(chunks)


def read_bytes(url: str, cfg: FetchConfig, sleep=time.sleep) -> bytes:
    """Read a whole object with bounded retries and exponential backoff on transient errors.

    A missing object is final (FILE_NOT_FOUND); permission or size problems are final
    (FETCH_FAILED); other I/O errors and timeouts are retried `cfg.retries` times.
    """
    delay = cfg.backoff_s
    last: Exception | None = None
    for attempt in range(cfg.retries + 1):
        try:
            local = "://" not in url or url.startswith("file://")
            path = url[len("file://"):] if url.startswith("file://") else url
            with (open(path, "rb") if local else fsspec.open(url, "rb")) as handle:
                data = _read_capped(handle, cfg.max_bytes)
            if len(data) > cfg.max_bytes:
                raise Reject(RejectReason.FETCH_FAILED, f"object is larger than fetch.max_bytes={cfg.max_bytes}")
            return data
        except Reject:
            raise
        except FileNotFoundError as exc:
            raise Reject(RejectReason.FILE_NOT_FOUND, f"not found: {url}") from exc
        except (PermissionError, IsADirectoryError, NotADirectoryError, ValueError) as exc:
            raise Reject(RejectReason.FETCH_FAILED, f"{type(exc).__name__}: {exc}") from exc
        except Exception as exc:  # noqa: BLE001 - network/filesystem errors are retried
            last = exc
            if attempt < cfg.retries:
                log.info("fetch %s failed (%s), retry %d/%d in %.1fs", url, exc, attempt + 1, cfg.retries, delay)
                sleep(delay)
                delay = min(delay * 2, cfg.max_backoff_s)
    raise Reject(RejectReason.FETCH_FAILED, f"gave up after {cfg.retries + 1} attempts: {type(last).__name__}: {last}")


class FetchImages(StageDoFn):
    """Resolve, check and fetch each asset's bytes; verify the manifest's sha256 if given."""

    stage = "fetch"

    def __init__(self, cfg: FetchConfig):
        super().__init__()
        self.cfg = cfg

    def handle(self, asset: Asset) -> Asset:
        url = resolve_uri(asset.entry.uri, asset.manifest_uri)
        roots = self.cfg.allowed_roots or (manifest_root(asset.manifest_uri),)
        ok, why = is_allowed(url, roots, self.cfg.schemes())
        if not ok:
            raise Reject(RejectReason.URI_NOT_ALLOWED, why)
        data = read_bytes(url, self.cfg)
        digest = hashlib.sha256(data).hexdigest()
        if asset.entry.sha256 and asset.entry.sha256 != digest:
            raise Reject(RejectReason.CHECKSUM_MISMATCH, f"manifest sha256 {asset.entry.sha256[:12]}… != bytes {digest[:12]}…",
                         sha256=digest)
        return asset.replace(source_uri=url, source_bytes=data, sha256=digest, source_size=len(data))
