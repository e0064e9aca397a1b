"""The provenance ledger: one Parquet row per input manifest row, kept or rejected.

The invariant `rows_in == kept + rejected`, with every (manifest_uri, manifest_row) once,
is checked at the end of every run; a run that breaks it fails loudly.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterable

import apache_beam as beam
import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.records import Asset, Rejected

ROWS_PER_FILE = 5_000

LEDGER_SCHEMA = pa.schema([
    ("manifest_uri", pa.string()),
    ("manifest_row", pa.int64()),
    ("asset_id", pa.string()),
    ("status", pa.string()),
    ("stage", pa.string()),
    ("reason", pa.string()),
    ("detail", pa.string()),
    ("key", pa.string()),
    ("license_id", pa.string()),
    ("license_name", pa.string()),
    ("license_url", pa.string()),
    ("licensor", pa.string()),
    ("license_expiry", pa.string()),
    ("uri", pa.string()),
    ("sha256", pa.string()),
    ("phash", pa.string()),
    ("cluster_id", pa.string()),
    ("dup_of", pa.string()),
    ("clip_score", pa.float32()),
])


class LedgerInvariantError(RuntimeError):
    """rows_in != kept + rejected, or a manifest row appears twice: the run is not trustworthy."""


def _license_fields(entry) -> dict[str, Any]:
    if entry is None:
        return {"license_id": None, "license_name": None, "license_url": None, "licensor": None,
                "license_expiry": None, "uri": None}
    return {
        "license_id": entry.license_id,
        "license_name": entry.license_name,
        "license_url": entry.license_url,
        "licensor": entry.licensor,
        "license_expiry": entry.license_expiry.isoformat() if entry.license_expiry else None,
        "uri": storage.redact_url(entry.uri),  # no credentials in the ledger
    }


def kept_row(asset: Asset, stage: str = "curated") -> dict[str, Any]:
    row = {
        "manifest_uri": asset.manifest_uri,
        "manifest_row": asset.manifest_row,
        "asset_id": asset.asset_id,
        "status": "kept",
        "stage": stage,
        "reason": None,
        "detail": None,
        "key": storage.asset_key(asset.asset_id),
        "sha256": asset.sha256,
        "phash": asset.phash,
        "cluster_id": asset.cluster_id,
        "dup_of": None,
        "clip_score": asset.clip_score,
    }
    row.update(_license_fields(asset.entry))
    return row


def rejected_row(rej: Rejected) -> dict[str, Any]:
    row = {
        "manifest_uri": rej.manifest_uri,
        "manifest_row": rej.manifest_row,
        "asset_id": rej.asset_id,
        "status": "rejected",
        "stage": rej.stage,
        "reason": rej.reason.value,
        "detail": rej.detail,
        "key": storage.asset_key(rej.asset_id) if rej.asset_id else None,
        "sha256": rej.sha256,
        "phash": rej.phash,
        "cluster_id": rej.cluster_id,
        "dup_of": rej.dup_of,
        "clip_score": rej.clip_score,
    }
    row.update(_license_fields(rej.entry))
    return row


def _sort_key(row: dict[str, Any]) -> tuple[str, int]:
    return row["manifest_uri"], row["manifest_row"]


def write_ledger_file(url: str, rows: Iterable[dict[str, Any]]) -> int:
    ordered = sorted(rows, key=_sort_key)
    table = pa.Table.from_pylist(ordered, schema=LEDGER_SCHEMA)
    with storage.atomic_open(url, "wb") as handle:
        pq.write_table(table, handle, compression="zstd")
    return len(ordered)


def ledger_file(out: str, index: int) -> str:
    return storage.join(out, "ledger", f"ledger-{index:06d}.parquet")


class WriteLedger(beam.PTransform):
    """Ledger row dicts -> ledger-NNNNNN.parquet files, rows bucketed by a stable hash."""

    def __init__(self, out: str):
        super().__init__()
        self.out = out

    def expand(self, rows):
        out = self.out
        total = rows | "CountRows" >> beam.combiners.Count.Globally()

        def assign(row, n):
            files = max(1, math.ceil(n / ROWS_PER_FILE))
            return storage.stable_bucket(f"{row['manifest_uri']}#{row['manifest_row']}", files), row

        return (
            rows
            | "AssignFile" >> beam.Map(assign, n=beam.pvalue.AsSingleton(total))
            | "GroupByFile" >> beam.GroupByKey()
            | "WriteFile" >> beam.MapTuple(lambda idx, group: write_ledger_file(ledger_file(out, idx), group))
        )


def read_ledger(out: str) -> pa.Table:
    files = storage.list_files(storage.join(out, "ledger"), "ledger-*.parquet")
    if not files:
        return LEDGER_SCHEMA.empty_table()
    tables = []
    for url in files:
        with fsspec.open(url, "rb") as handle:
            tables.append(pq.read_table(handle, schema=LEDGER_SCHEMA))
    return pa.concat_tables(tables)


def rewrite_ledger(out: str, table: pa.Table) -> None:
    """Replace the ledger with `table` (used by later phases that reject more rows)."""
    rows = table.to_pylist()
    files = max(1, math.ceil(len(rows) / ROWS_PER_FILE))
    buckets: dict[int, list[dict[str, Any]]] = {i: [] for i in range(files)}
    for row in rows:
        buckets[storage.stable_bucket(f"{row['manifest_uri']}#{row['manifest_row']}", files)].append(row)
    old = storage.list_files(storage.join(out, "ledger"), "ledger-*.parquet")
    for index, group in buckets.items():
        write_ledger_file(ledger_file(out, index), group)
    keep = {ledger_file(out, i).rsplit("/", 1)[-1] for i in buckets}
    for url in old:
        if url.rsplit("/", 1)[-1] not in keep:
            storage.remove_tree(url)


def update_statuses(out: str, stage: str, reject: dict[str, tuple[str, str]] | None = None,
                   restore: bool = False, notes: dict[str, str] | None = None) -> int:
    """Changes a later step makes, by asset key: `reject` maps key -> (reason, detail) for
    kept rows; `notes` maps key -> a note on a kept row that stays kept (its `detail`, as
    "<stage>: note"). `restore` first undoes this stage's earlier changes: its rejections
    become kept rows again and its notes are cleared (a rerun with another config decides
    afresh). Rewrites the ledger only when something changed."""
    rows = read_ledger(out).to_pylist()
    changed = 0
    for row in rows:
        if restore and row["status"] == "rejected" and row["stage"] == stage:
            row.update(status="kept", stage="curated", reason=None, detail=None)
            changed += 1
        if restore and row["status"] == "kept" and (row["detail"] or "").startswith(f"{stage}: "):
            row.update(detail=None)
            changed += 1
        if reject and row["status"] == "kept" and row["key"] in reject:
            reason, detail = reject[row["key"]]
            row.update(status="rejected", stage=stage, reason=reason, detail=detail[:2000])
            changed += 1
        elif notes and row["status"] == "kept" and row["key"] in notes:
            row.update(detail=f"{stage}: {notes[row['key']]}"[:2000])
            changed += 1
    if changed:
        rewrite_ledger(out, pa.Table.from_pylist(rows, schema=LEDGER_SCHEMA))
    return changed


DUPLICATE_REASONS = ("EXACT_DUPLICATE", "NEAR_DUPLICATE", "SEMANTIC_DUPLICATE")


def point_duplicates_at_kept(out: str) -> int:
    """Make every duplicate's `dup_of` name the asset its group kept: a duplicate of an asset
    that is itself a duplicate (an exact copy of a near duplicate, a near duplicate of an asset
    semantic dedup removed) points at what that one points at, to the end of the chain (a kept
    asset, or a previous run's). Rewrites the ledger only when a chain was found."""
    rows = read_ledger(out).to_pylist()
    duplicate_of = {r["asset_id"]: r["dup_of"] for r in rows
                    if r["status"] == "rejected" and r["reason"] in DUPLICATE_REASONS and r["asset_id"]}
    changed = 0
    for row in rows:
        if row["asset_id"] not in duplicate_of or row["dup_of"] not in duplicate_of:
            continue
        target, seen = row["dup_of"], {row["asset_id"]}
        while target in duplicate_of and target not in seen:
            seen.add(target)
            target = duplicate_of[target]
        row["dup_of"] = target
        changed += 1
    if changed:
        rewrite_ledger(out, pa.Table.from_pylist(rows, schema=LEDGER_SCHEMA))
    return changed


# Steps after curation (encode, neighbours, tokens) find rejections (or notes) on workers and
# hand them to the driver in one JSONL work file, which `apply_changes` applies to the ledger.


def write_changes(url: str, changes: Iterable[dict[str, str]]) -> str:
    """Write {key, reason, detail} rows, sorted by key, to `url` (JSONL); no rows, no file."""
    changes = list(changes)
    if not changes:
        return url
    lines = "".join(json.dumps({"key": c["key"], "reason": c["reason"], "detail": c["detail"]}, sort_keys=True)
                    + "\n" for c in sorted(changes, key=lambda c: c["key"]))
    storage.write_bytes(url, lines.encode("utf-8"))
    return url


class WriteChanges(beam.PTransform):
    """A PCollection of {key, reason, detail} -> one JSONL work file (`write_changes`)."""

    def __init__(self, url: str, label: str | None = None):
        super().__init__(label)
        self.url = url

    def expand(self, changes: beam.PCollection):
        url = self.url
        return changes | "Collect" >> beam.combiners.ToList() | "Write" >> beam.Map(lambda rows: write_changes(url, rows))


def apply_changes(out: str, stage: str, url: str, as_notes: bool = False) -> dict[str, tuple[str, str]]:
    """Apply a step's work file to the ledger (rejections, or notes on rows that stay kept),
    remove the file, and return key -> (reason, detail)."""
    changes: dict[str, tuple[str, str]] = {}
    if storage.exists(url):
        with fsspec.open(url, "rt", encoding="utf-8") as handle:
            for line in handle:
                if line.strip():
                    row = json.loads(line)
                    changes[row["key"]] = (row["reason"], row["detail"])
    if changes and as_notes:
        update_statuses(out, stage, notes={k: f"{r}: {d}" for k, (r, d) in changes.items()})
    elif changes:
        update_statuses(out, stage, reject=changes)
    storage.remove_tree(url)
    return changes


@dataclass(frozen=True)
class LedgerSummary:
    rows_in: int
    kept: int
    rejected: int
    by_stage_reason: dict[str, int]

    def to_json(self) -> dict[str, Any]:
        return {"rows_in": self.rows_in, "kept": self.kept, "rejected": self.rejected,
                "by_stage_reason": dict(sorted(self.by_stage_reason.items()))}


def check_invariant(out: str, rows_in: int) -> LedgerSummary:
    """Raise LedgerInvariantError unless every input row is in the ledger exactly once."""
    table = read_ledger(out)
    keys = list(zip(table.column("manifest_uri").to_pylist(), table.column("manifest_row").to_pylist()))
    duplicates = len(keys) - len(set(keys))
    statuses = table.column("status").to_pylist()
    status = Counter(statuses)
    kept, rejected = status.get("kept", 0), status.get("rejected", 0)
    other = sum(v for k, v in status.items() if k not in ("kept", "rejected"))
    if duplicates or other or rows_in != kept + rejected:
        raise LedgerInvariantError(
            f"ledger invariant broken: rows_in={rows_in}, kept={kept}, rejected={rejected}, "
            f"duplicate rows={duplicates}, bad status={other}"
        )
    reasons = Counter(
        f"{stage}/{reason}" for stage, reason, st in zip(
            table.column("stage").to_pylist(), table.column("reason").to_pylist(), statuses)
        if st == "rejected"
    )
    return LedgerSummary(rows_in, kept, rejected, dict(reasons))
