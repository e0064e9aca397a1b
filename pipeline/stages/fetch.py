"""The fetch stage: resolve, check and fetch each asset's bytes (`pipeline.fetch_client.read_bytes`,
under the URL policy of `pipeline.fetch_urls`), verify the manifest's sha256 if given, and
record the outcome (retry counters included). Credentials in a URL never reach the store's
metadata (`storage.redact_url`).
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import time
from dataclasses import dataclass, field
from typing import Callable

from pipeline.config import FetchConfig
from pipeline.fetch_client import read_bytes
from pipeline.fetch_urls import is_allowed, manifest_root, resolve_uri
from pipeline.records import Asset, RejectReason
from pipeline.stages.base import Reject, Stage, StageDoFn
from pipeline.storage import redact_url


@dataclass
class Fetched:
    """The outcome of fetching one asset, made in any thread: bytes, or the error to raise."""

    url: str
    data: bytes | None = None
    sha256: str | None = None
    error: BaseException | None = None
    retried: collections.Counter = field(default_factory=collections.Counter)

    @property
    def size(self) -> int:
        return len(self.data) if self.data is not None else 0


class FetchImages(StageDoFn):
    """Resolve, check and fetch each asset's bytes; verify the manifest's sha256 if given.

    `fetch` is thread-safe and touches no Beam state, so the prepare step runs up to
    `fetch.concurrency` of them at once; `finish` (in the bundle's thread) records the
    outcome, its counters included: `fetch/retries/<kind>` counts every retry.
    """

    stage = Stage.FETCH

    def __init__(self, cfg: FetchConfig):
        super().__init__()
        self.cfg = cfg

    def fetch(self, asset: Asset, sleep: Callable[[float], None] = time.sleep) -> Fetched:
        url = resolve_uri(asset.entry.uri, asset.manifest_uri)
        out = Fetched(url)
        try:
            roots = self.cfg.allowed_roots or (manifest_root(asset.manifest_uri),)
            schemes = self.cfg.schemes()
            ok, why = is_allowed(url, roots, schemes)
            if not ok:
                raise Reject(RejectReason.URI_NOT_ALLOWED, why)
            out.data = read_bytes(url, self.cfg, sleep=sleep, roots=roots, schemes=schemes, retried=out.retried)
            out.sha256 = hashlib.sha256(out.data).hexdigest()
        except Exception as exc:  # noqa: BLE001 - re-raised by `finish` in the bundle's thread
            out.error = exc
        return out

    def finish(self, asset: Asset, fetched: Fetched) -> Asset:
        from apache_beam.metrics import Metrics

        for kind, n in sorted(fetched.retried.items()):
            Metrics.counter(self.stage, f"retries/{kind}").inc(n)
        if fetched.error is not None:
            raise fetched.error
        digest = fetched.sha256
        if asset.entry.sha256 and asset.entry.sha256 != digest:
            raise Reject(RejectReason.CHECKSUM_MISMATCH, f"manifest sha256 {asset.entry.sha256[:12]}… != bytes {digest[:12]}…",
                         sha256=digest)
        # from here on the URL is only shown, never fetched: no credentials in the store's metadata
        entry = dataclasses.replace(asset.entry, uri=redact_url(asset.entry.uri))
        return asset.replace(entry=entry, source_uri=redact_url(fetched.url), source_bytes=fetched.data, sha256=digest,
                             source_size=fetched.size)

    def handle(self, asset: Asset) -> Asset:
        return self.finish(asset, self.fetch(asset))
