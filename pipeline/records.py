"""Frozen record types that flow between pipeline stages, and the reject reasons.

Every manifest row becomes exactly one ledger row: either a kept `Asset` at the end
of the run or a `Rejected` emitted by the stage that dropped it.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass, field
from typing import Any

from manifests.schema import ManifestEntry
from pipeline.storage import read_span


class RejectReason(str, enum.Enum):
    """Why a manifest row was dropped; the ledger's `reason` column holds `.value`."""

    # manifest parsing / validation
    MALFORMED_ROW = "MALFORMED_ROW"
    MISSING_FIELD = "MISSING_FIELD"
    BAD_FIELD_TYPE = "BAD_FIELD_TYPE"
    BAD_DATE = "BAD_DATE"
    DUPLICATE_ASSET_ID = "DUPLICATE_ASSET_ID"
    # license gate
    LICENSE_UNKNOWN = "LICENSE_UNKNOWN"
    LICENSE_DISALLOWED = "LICENSE_DISALLOWED"
    LICENSE_EXPIRED = "LICENSE_EXPIRED"
    LICENSE_NOT_YET_VALID = "LICENSE_NOT_YET_VALID"
    USE_NOT_ALLOWED = "USE_NOT_ALLOWED"
    TDM_OPT_OUT = "TDM_OPT_OUT"
    METADATA_UNREADABLE = "METADATA_UNREADABLE"  # an XMP block that may hold an opt-out cannot be parsed
    # fetch
    URI_NOT_ALLOWED = "URI_NOT_ALLOWED"
    FILE_NOT_FOUND = "FILE_NOT_FOUND"
    ACCESS_DENIED = "ACCESS_DENIED"  # HTTP 401/403, a permission error: not retried
    NOT_A_FILE = "NOT_A_FILE"  # a directory, FIFO, socket or device: not read, not retried
    FETCH_FAILED = "FETCH_FAILED"
    CHECKSUM_MISMATCH = "CHECKSUM_MISMATCH"
    # decode
    EMPTY_FILE = "EMPTY_FILE"
    NOT_AN_IMAGE = "NOT_AN_IMAGE"
    TRUNCATED_IMAGE = "TRUNCATED_IMAGE"
    DECOMPRESSION_BOMB = "DECOMPRESSION_BOMB"
    WORKER_CRASHED = "WORKER_CRASHED"  # the row killed its worker (segfault, OOM) twice, the second time alone
    # content filters
    TOO_SMALL = "TOO_SMALL"
    BAD_ASPECT_RATIO = "BAD_ASPECT_RATIO"
    CAPTION_EMPTY = "CAPTION_EMPTY"
    CAPTION_TOO_LONG = "CAPTION_TOO_LONG"
    CAPTION_NOT_TEXT = "CAPTION_NOT_TEXT"
    # dedup
    EXACT_DUPLICATE = "EXACT_DUPLICATE"
    NEAR_DUPLICATE = "NEAR_DUPLICATE"
    SEMANTIC_DUPLICATE = "SEMANTIC_DUPLICATE"
    # alignment
    LOW_ALIGNMENT = "LOW_ALIGNMENT"
    # token sequences
    SEQUENCE_TOO_LONG = "SEQUENCE_TOO_LONG"  # the document alone exceeds tokens.max_tokens
    # audit
    TAKEN_DOWN = "TAKEN_DOWN"
    # anything unexpected: the exception message goes to `detail`
    ERROR = "ERROR"


@dataclass(frozen=True)
class SourceRow:
    """One raw row of a manifest, before validation. `raw` is a dict, or a str for a line
    that could not be parsed (then `parse_error` says why)."""

    manifest_uri: str
    manifest_row: int
    raw: Any
    parse_error: str | None = None


@dataclass(frozen=True)
class Rejected:
    """A dropped row. `manifest_uri` + `manifest_row` identify the ledger row."""

    asset_id: str | None
    stage: str
    reason: RejectReason
    detail: str
    manifest_uri: str
    manifest_row: int
    entry: ManifestEntry | None = None
    sha256: str | None = None
    phash: str | None = None
    dup_of: str | None = None
    cluster_id: str | None = None
    clip_score: float | None = None


@dataclass(frozen=True)
class Asset:
    """A validated manifest row and what later stages derived from it."""

    entry: ManifestEntry
    manifest_uri: str
    manifest_row: int
    # fetch
    source_uri: str | None = None  # resolved absolute URI
    source_bytes: bytes | None = field(default=None, repr=False)
    sha256: str | None = None  # of the source bytes
    source_size: int | None = None
    # decode + normalise
    source_format: str | None = None
    source_width: int | None = None
    source_height: int | None = None
    source_mode: str | None = None
    image: bytes | None = field(default=None, repr=False)  # normalised JPEG
    image_uri: str | None = None  # staged JPEG as `file@offset:length` (then `image` is None)
    pixel_sha256: str | None = None  # of the normalised pixels, for cross-encoding exact dedup
    # dedup / alignment (filled by later stages)
    phash: str | None = None
    phash_mirror: str | None = None  # hash of the mirrored frame (dedup.mirror); reaches Decide, not the store
    cluster_id: str | None = None
    dup_of: str | None = None
    clip_score: float | None = None
    captions: tuple[str, ...] = ()  # cleaned captions (filters applied)

    @property
    def asset_id(self) -> str:
        return self.entry.asset_id

    def image_bytes(self) -> bytes:
        """The normalised JPEG, from memory or from the staging area."""
        if self.image is not None:
            return self.image
        if self.image_uri is None:
            raise ValueError(f"asset {self.asset_id} has no decoded image")
        return read_span(self.image_uri)

    def replace(self, **changes: Any) -> "Asset":
        return dataclasses.replace(self, **changes)

    def reject(self, stage: str, reason: RejectReason, detail: str, **extra: Any) -> Rejected:
        """Turn this asset into a ledger rejection, carrying what is known about it."""
        values = dict(
            asset_id=self.asset_id,
            stage=stage,
            reason=reason,
            detail=detail,
            manifest_uri=self.manifest_uri,
            manifest_row=self.manifest_row,
            entry=self.entry,
            sha256=self.sha256,
            phash=self.phash,
            dup_of=self.dup_of,
            cluster_id=self.cluster_id,
            clip_score=self.clip_score,
        )
        values.update(extra)
        return Rejected(**values)
