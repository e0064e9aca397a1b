"""The step contract shared by every stage.

A per-row step (`StageDoFn`) implements `handle(asset) -> asset` (the same asset, possibly
enriched) and raises `Reject(reason, detail)` to drop it. `apply(asset)` runs `handle` under
the contract and returns `(asset, None)` or `(None, Rejected)`: unexpected exceptions become
`RejectReason.ERROR` with the message, they never crash the run and never drop a row. Under
Beam, `process` sends kept assets to the main output and rejections to the `rejected` tagged
output; the prepare step calls `apply` directly for the steps it runs in its chunks.

A composite (a `PTransform`) returns `(kept, rejected)` PCollections (`StageOutputs`, with
more fields where it has more outputs). Stage names are `Stage` members; every stage's
counters are made by `StageCounters`: `<stage>/in`, `<stage>/kept`, `<stage>/rejected/<reason>`.
"""

from __future__ import annotations

import logging
from enum import StrEnum
from typing import Any, Callable, Iterable, NamedTuple

import apache_beam as beam
from apache_beam.metrics import Metrics

from pipeline.records import Asset, Rejected, RejectReason

log = logging.getLogger(__name__)

REJECTED = "rejected"


class Stage(StrEnum):
    """The stage names the ledger (`stage`) and the counters use, in pipeline order."""

    INGEST = "ingest"
    VALIDATE = "validate"
    LICENSE = "license"
    FETCH = "fetch"
    DECODE = "decode"
    DEDUP_EXACT = "dedup_exact"
    DEDUP_NEAR = "dedup_near"
    CLIP = "clip"  # CLIP scoring (errors only: scoring never judges)
    ALIGN = "align"
    DEDUP_SEMANTIC = "dedup_semantic"
    CURATED = "curated"  # the stage of every kept ledger row
    STORE = "store"
    ENCODE = "encode"
    NEIGHBOURS = "neighbours"
    TOKENS = "tokens"
    AUDIT = "audit"  # takedowns


class StageOutputs(NamedTuple):
    """What a stage composite returns."""

    kept: Any
    rejected: Any


class Reject(Exception):
    """Raised inside `StageDoFn.handle` to reject the current asset with a reason."""

    def __init__(self, reason: RejectReason, detail: str, **extra):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail
        self.extra = extra


class StageCounters:
    """Beam counters for one stage, created lazily per reason: the one way counters are made."""

    def __init__(self, stage: Stage | str):
        self.stage = stage
        self.seen = Metrics.counter(stage, "in")
        self.kept = Metrics.counter(stage, "kept")
        self._rejected: dict[str, object] = {}

    def rejected(self, reason: RejectReason, n: int = 1) -> None:
        counter = self._rejected.get(reason.value)
        if counter is None:
            counter = Metrics.counter(self.stage, f"rejected/{reason.value}")
            self._rejected[reason.value] = counter
        counter.inc(n)


class StageDoFn(beam.DoFn):
    """A per-row step: subclasses set `stage` and implement `handle(asset) -> Asset`, raising
    `Reject`. With `counts_rows = False` only rejections are counted (a step whose rows are
    counted where a later step decides, e.g. the perceptual hash before dedup)."""

    stage: Stage
    counts_rows = True

    def __init__(self) -> None:
        super().__init__()
        self._counters: StageCounters | None = None

    @property
    def counters(self) -> StageCounters:
        if self._counters is None:
            self._counters = StageCounters(self.stage)
        return self._counters

    def handle(self, asset: Asset) -> Asset:  # pragma: no cover - abstract
        raise NotImplementedError

    def rejection(self, item: Any, reason: RejectReason, detail: str, **extra) -> Rejected:
        """The ledger row for a rejected input (an Asset here; other inputs override this)."""
        return item.reject(self.stage, reason, detail, **extra)

    def apply(self, item: Any, handle: Callable[[Any], Asset] | None = None) -> tuple[Asset | None, Rejected | None]:
        """`handle(item)` under the contract: (asset, None) if kept, (None, Rejected) if not."""
        counters = self.counters
        if self.counts_rows:
            counters.seen.inc()
        try:
            result = (handle or self.handle)(item)
        except Reject as rej:
            rejected = self.rejection(item, rej.reason, rej.detail, **rej.extra)
        except Exception as exc:  # noqa: BLE001 - the contract: errors become ledger rows
            log.warning("%s: unexpected error on %s: %s", self.stage, getattr(item, "asset_id", item), exc)
            rejected = self.rejection(item, RejectReason.ERROR, f"{type(exc).__name__}: {exc}"[:2000])
        else:
            if self.counts_rows:
                counters.kept.inc()
            return result, None
        if not self.counts_rows:
            counters.seen.inc()
        counters.rejected(rejected.reason)
        return None, rejected

    def process(self, item: Any) -> Iterable:
        kept, rejected = self.apply(item)
        yield kept if rejected is None else beam.pvalue.TaggedOutput(REJECTED, rejected)
