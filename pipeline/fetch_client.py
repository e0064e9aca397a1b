"""Read source bytes: allowed roots only, classified errors, bounded retries (`read_bytes`; the
Beam stage that uses it is `pipeline.stages.fetch`, the URL policy `pipeline.fetch_urls`).

Three readers, one contract (`read_bytes`):

- local files are opened without blocking and must be regular files, so a FIFO, socket or
  device inside a delivery is NOT_A_FILE at once instead of a worker that never returns;
- http(s) goes through urllib3 (a dependency of the base install) with a shared connection
  pool, connect/read timeouts, a deadline per attempt, and redirects followed by hand: every
  hop is checked against the allowed roots again, so an allowed host cannot bounce the
  fetcher to another host, port or path. fsspec's HTTP filesystem is not used: it sends a
  HEAD before every GET, follows redirects unchecked and has no per-object deadline;
- every other scheme (s3, gs, az, memory, ...) through fsspec.

Errors are classified. Permanent ones get their own reason with no retry: FILE_NOT_FOUND
(404/410, a missing object), ACCESS_DENIED (401/403, a permission error), NOT_A_FILE, an
object over `fetch.max_bytes`. Transient ones (5xx, 429, 408, timeouts, connection resets)
are retried with exponential backoff (a server's Retry-After is honoured up to
`max_backoff_s`) and counted by kind; after `fetch.retries` retries the row is FETCH_FAILED.

Allowed roots are checked by `pipeline.fetch_urls.is_allowed`, on every redirect hop too.
Credentials in a URL (`user:pass@`, presigned signatures, SAS tokens) never reach a reason, a
log line or an output (`storage.redact_url`).
"""

from __future__ import annotations

import collections
import io
import logging
import os
import stat
import threading
import time
from email.utils import parsedate_to_datetime
from typing import Callable
from urllib.parse import quote, unquote, urljoin, urlunsplit

import fsspec

from pipeline.config import FetchConfig
from pipeline.fetch_urls import DEFAULT_PORTS, http_parts, is_allowed
from pipeline.records import RejectReason
from pipeline.stages.base import Reject
from pipeline.storage import RedactingFilter, redact_text, redact_url

log = logging.getLogger(__name__)
for _name in ("urllib3.connectionpool", "fsspec", "s3fs", "gcsfs", "adlfs"):  # they log request URLs whole
    logging.getLogger(_name).addFilter(RedactingFilter())

_TRANSIENT_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
_REDIRECT_STATUS = frozenset({301, 302, 303, 307, 308})


class _Transient(Exception):
    """A failure worth retrying; `kind` names it in the retry counters."""

    def __init__(self, kind: str, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.kind = kind
        self.retry_after = retry_after


_CHUNK = 1 << 20


def _too_large(cap: int) -> Reject:
    return Reject(RejectReason.FETCH_FAILED, f"object is larger than fetch.max_bytes={cap}")


def _read_capped(handle, cap: int, deadline: float | None = None) -> bytes:
    """Read at most cap + 1 bytes (one more than allowed tells an oversized object apart).

    Never asks for `cap + 1` bytes in one call: `read(n)` allocates n bytes up front, and a
    64 MiB buffer per image both costs time and, once glibc raises its mmap threshold,
    fragments the heap so a worker's RSS grows with every image it has fetched. The size is
    taken from the file when it is known, else the object is read in 1 MiB chunks, checking
    the attempt's deadline between chunks (a server trickling bytes cannot hold a worker).
    """
    size = None
    try:
        st = os.fstat(handle.fileno())
        size = st.st_size if stat.S_ISREG(st.st_mode) else None  # a socket's size means nothing
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        size = getattr(handle, "size", None)
    if isinstance(size, int) and size > cap:
        raise _too_large(cap)
    if isinstance(size, int) and size >= 0 and deadline is None:
        return handle.read(size + 1)  # + 1: an object that grew since stat is still caught
    # with a deadline, read1 returns whatever has arrived, so the deadline is checked even
    # when the sender trickles (read(n) would wait for all n bytes)
    read = getattr(handle, "read1", handle.read) if deadline is not None else handle.read
    chunks: list[bytes] = []
    total = 0
    while total <= cap:
        chunk = read(min(_CHUNK, cap + 1 - total))
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
        if deadline is not None and time.monotonic() > deadline:
            raise _Transient("timeout", "the object did not arrive within fetch.timeout_s")
    return b"".join(chunks)


# -- local files ------------------------------------------------------------------------------


def _read_local(path: str, cap: int) -> bytes:
    """A regular file only: a FIFO or device is refused before it is opened for a blocking read."""
    st = os.stat(path)  # FileNotFoundError / PermissionError: classified by the caller
    if stat.S_ISDIR(st.st_mode):
        raise Reject(RejectReason.NOT_A_FILE, "a directory, not a file")
    if not stat.S_ISREG(st.st_mode):
        raise Reject(RejectReason.NOT_A_FILE, "not a regular file (a FIFO, socket or device)")
    if st.st_size > cap:
        raise _too_large(cap)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0))
    with os.fdopen(fd, "rb") as handle:
        if not stat.S_ISREG(os.fstat(fd).st_mode):  # swapped for a FIFO since the stat
            raise Reject(RejectReason.NOT_A_FILE, "not a regular file (a FIFO, socket or device)")
        return _read_capped(handle, cap)


# -- http(s) ----------------------------------------------------------------------------------

_POOLS: dict[int, object] = {}
_POOLS_LOCK = threading.Lock()


def _http_pool(size: int):
    """One urllib3 pool manager per process and pool size: keep-alive connections are reused
    across rows and chunks. urllib3 is thread-safe; `size` connections per host."""
    import urllib3

    with _POOLS_LOCK:
        pool = _POOLS.get(size)
        if pool is None:
            pool = _POOLS[size] = urllib3.PoolManager(num_pools=32, maxsize=size, block=False, retries=False)
        return pool


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        try:
            return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
        except (TypeError, ValueError):
            return None


def _read_http(url: str, cfg: FetchConfig, roots: tuple[str, ...] | None, schemes: tuple[str, ...]) -> bytes:
    """One attempt: GET, following at most `max_redirects` redirects, each re-checked."""
    import urllib3

    deadline = time.monotonic() + cfg.timeout_s
    timeout = urllib3.Timeout(connect=cfg.connect_timeout_s, read=cfg.read_timeout_s)
    pool = _http_pool(max(cfg.concurrency, 1))
    for _hop in range(cfg.max_redirects + 1):
        scheme, host, port, path, query, userinfo = http_parts(url)
        netloc = host if port == DEFAULT_PORTS[scheme] else f"{host}:{port}"
        if ":" in host:  # IPv6 literal
            netloc = f"[{host}]" if port == DEFAULT_PORTS[scheme] else f"[{host}]:{port}"
        target = urlunsplit((scheme, netloc, quote(path, safe="/:@!$&'()*+,;=-._~"), query, ""))
        headers = {"User-Agent": "cm3curate"}
        if userinfo is not None:
            user, _, password = userinfo.partition(":")
            headers.update(urllib3.make_headers(basic_auth=f"{unquote(user)}:{unquote(password)}"))
        try:
            resp = pool.request("GET", target, headers=headers, redirect=False, retries=False,
                                preload_content=False, timeout=timeout)
        except urllib3.exceptions.SSLError as exc:
            raise Reject(RejectReason.FETCH_FAILED, f"TLS error: {type(exc).__name__}") from None
        except (urllib3.exceptions.TimeoutError, TimeoutError) as exc:
            raise _Transient("timeout", f"timed out: {type(exc).__name__}") from None
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise _Transient("connection", f"connection failed: {type(exc).__name__}") from None
        complete = False
        try:
            status = resp.status
            if status in _REDIRECT_STATUS:
                location = resp.headers.get("Location")
                if not location:
                    raise Reject(RejectReason.FETCH_FAILED, f"HTTP {status} without a Location")
                nxt = urljoin(url, location)
                ok, why = is_allowed(nxt, roots or (), schemes)
                if not ok:
                    raise Reject(RejectReason.URI_NOT_ALLOWED,
                                 f"redirect from {redact_url(url)} to {redact_url(nxt)} refused: {why}")
                url = nxt
                continue
            if status in (404, 410):
                raise Reject(RejectReason.FILE_NOT_FOUND, f"HTTP {status}: {redact_url(url)}")
            if status in (401, 403):
                raise Reject(RejectReason.ACCESS_DENIED, f"HTTP {status}: {redact_url(url)}")
            if status in _TRANSIENT_STATUS or 500 <= status < 600:
                raise _Transient(f"http_{status}", f"HTTP {status}", _retry_after(resp.headers.get("Retry-After")))
            if status != 200:
                raise Reject(RejectReason.FETCH_FAILED, f"HTTP {status}: {redact_url(url)}")
            length = resp.headers.get("Content-Length")
            if length and length.isdigit() and int(length) > cfg.max_bytes:
                raise _too_large(cfg.max_bytes)
            try:
                data = _read_capped(resp, cfg.max_bytes, deadline)
                complete = len(data) <= cfg.max_bytes  # read to the end: the connection can be reused
                return data
            except (urllib3.exceptions.TimeoutError, TimeoutError) as exc:
                raise _Transient("timeout", f"timed out reading: {type(exc).__name__}") from None
            except (urllib3.exceptions.HTTPError, OSError) as exc:
                raise _Transient("connection", f"connection broken while reading: {type(exc).__name__}") from None
        finally:
            if complete:
                resp.release_conn()
            else:
                resp.close()
    raise Reject(RejectReason.FETCH_FAILED, f"more than fetch.max_redirects={cfg.max_redirects} redirects")


# -- every reader ----------------------------------------------------------------------------


def _attempt(url: str, cfg: FetchConfig, roots: tuple[str, ...] | None, schemes: tuple[str, ...]) -> bytes:
    scheme = url.split("://", 1)[0].lower() if "://" in url else "file"
    if scheme in DEFAULT_PORTS:
        return _read_http(url, cfg, roots, schemes)
    if scheme == "file":
        return _read_local(url[len("file://"):] if url.startswith("file://") else url, cfg.max_bytes)
    with fsspec.open(url, "rb") as handle:
        return _read_capped(handle, cfg.max_bytes)


def read_bytes(url: str, cfg: FetchConfig, sleep: Callable[[float], None] = time.sleep,
               roots: tuple[str, ...] | None = None, schemes: tuple[str, ...] | None = None,
               retried: collections.Counter | None = None) -> bytes:
    """A whole object, or `Reject` with its reason. Transient failures are retried `cfg.retries`
    times with exponential backoff, each counted in `retried` by kind. An http(s) redirect is
    followed only to a URL under `roots` (none when `roots` is None)."""
    schemes = cfg.schemes() if schemes is None else schemes
    shown = redact_url(url)
    delay = cfg.backoff_s
    last: Exception | None = None
    for attempt in range(cfg.retries + 1):
        try:
            data = _attempt(url, cfg, roots, schemes)
            if len(data) > cfg.max_bytes:
                raise _too_large(cfg.max_bytes)
            return data
        except Reject:
            raise
        except FileNotFoundError:
            raise Reject(RejectReason.FILE_NOT_FOUND, f"not found: {shown}") from None
        except PermissionError as exc:
            raise Reject(RejectReason.ACCESS_DENIED, f"permission denied: {shown} ({type(exc).__name__})") from None
        except (IsADirectoryError, NotADirectoryError) as exc:
            raise Reject(RejectReason.NOT_A_FILE, f"{type(exc).__name__}: {shown}") from None
        except ValueError as exc:  # a URL fsspec/urllib3 cannot parse
            raise Reject(RejectReason.FETCH_FAILED, f"{type(exc).__name__}: {redact_text(str(exc))}") from None
        except Exception as exc:  # noqa: BLE001 - network/filesystem errors are retried
            last = exc
            kind = exc.kind if isinstance(exc, _Transient) else type(exc).__name__
            if attempt < cfg.retries:
                wait = delay
                if isinstance(exc, _Transient) and exc.retry_after is not None:
                    wait = min(max(delay, exc.retry_after), cfg.max_backoff_s)
                if retried is not None:
                    retried[kind] += 1
                log.info("fetch %s failed (%s), retry %d/%d in %.1fs", shown, kind, attempt + 1, cfg.retries, wait)
                sleep(wait)
                delay = min(delay * 2, cfg.max_backoff_s)
    message = str(last) if isinstance(last, _Transient) else f"{type(last).__name__}: {redact_text(str(last))}"
    raise Reject(RejectReason.FETCH_FAILED, f"gave up after {cfg.retries + 1} attempts: {message}"[:2000])
