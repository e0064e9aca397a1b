"""The stage contract shared by every Beam stage.

A stage DoFn turns one `Asset` into either the same asset (possibly enriched) on the main
output, or a `Rejected` on the `rejected` tagged output. Unexpected exceptions become
`RejectReason.ERROR` with the message; they never crash the run and never drop a row.
Counters follow `<stage>/in`, `<stage>/kept`, `<stage>/rejected/<reason>`.
"""

from __future__ import annotations

import logging
from typing import Callable, Iterable

import apache_beam as beam
from apache_beam.metrics import Metrics

from pipeline.records import Asset, RejectReason

log = logging.getLogger(__name__)

REJECTED = "rejected"


class Reject(Exception):
    """Raised inside `StageDoFn.handle` to reject the current asset with a reason."""

    def __init__(self, reason: RejectReason, detail: str, **extra):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail
        self.extra = extra


class StageCounters:
    """Beam counters for one stage, created lazily per reason."""

    def __init__(self, stage: str):
        self.stage = stage
        self.seen = Metrics.counter(stage, "in")
        self.kept = Metrics.counter(stage, "kept")
        self._rejected: dict[str, object] = {}

    def rejected(self, reason: RejectReason) -> None:
        counter = self._rejected.get(reason.value)
        if counter is None:
            counter = Metrics.counter(self.stage, f"rejected/{reason.value}")
            self._rejected[reason.value] = counter
        counter.inc()


class StageDoFn(beam.DoFn):
    """Base DoFn: subclasses implement `handle(asset) -> Asset` and raise `Reject`."""

    stage: str = "stage"

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

    def process(self, asset: Asset) -> Iterable:
        return self.run(asset, self.handle)

    def run(self, asset: Asset, handle: Callable[[Asset], Asset]) -> Iterable:
        """`handle(asset)` under the contract: counters, `Reject` and errors to the rejected output."""
        self.counters.seen.inc()
        try:
            result = handle(asset)
        except Reject as rej:
            self.counters.rejected(rej.reason)
            yield beam.pvalue.TaggedOutput(REJECTED, asset.reject(self.stage, rej.reason, rej.detail, **rej.extra))
            return
        except Exception as exc:  # noqa: BLE001 - the contract: errors become ledger rows
            log.warning("%s: unexpected error on %s: %s", self.stage, asset.asset_id, exc)
            self.counters.rejected(RejectReason.ERROR)
            detail = f"{type(exc).__name__}: {exc}"[:2000]
            yield beam.pvalue.TaggedOutput(REJECTED, asset.reject(self.stage, RejectReason.ERROR, detail))
            return
        self.counters.kept.inc()
        yield result
