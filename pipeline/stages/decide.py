"""The prepare step's global decisions (steps 3 and 4 of pipeline/stages/prepare.py's plan):
`Decide` reads the compact columns of every chunk's slice and decides what needs the whole
delivery (repeated asset ids, takedowns, exact and near duplicates by the rules of
pipeline/dedup_rules.py, the duplicates on standby, the shard of every kept asset);
`WriteShardFromRecords` writes one shard of the prepared (or standby) store from the staged
records; `WriteLedgerPart` writes one ledger file from its slices and the decisions."""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import Any, Iterable, Iterator

import apache_beam as beam
import pyarrow as pa
from apache_beam.metrics import Metrics

from pipeline import dedup_hash, dedup_rules, ledger, storage
from pipeline.config import DedupConfig
from pipeline.records import RejectReason
from pipeline.stages.base import Stage, StageCounters
from pipeline.stages.prepare import ledger_part, load_record, slice_url
from pipeline.stages.store import shard_count, write_shard

log = logging.getLogger(__name__)

DECISION_SCHEMA = pa.schema([
    ("manifest_uri", pa.string()), ("manifest_row", pa.int64()), ("status", pa.string()), ("stage", pa.string()),
    ("reason", pa.string()), ("detail", pa.string()), ("dup_of", pa.string()), ("cluster_id", pa.string()),
])
_DECISION_FIELDS = tuple(DECISION_SCHEMA.names[2:])
_DECIDE_COLUMNS = ("asset_id", "manifest_uri", "manifest_row", "status", "validated", "sha256", "pixel_sha256",
                   "phash", "phash_mirror", "area", "license_id", "record")


def decision_url(work_dir: str, part: str) -> str:
    return storage.join(work_dir, "decisions", part + ".parquet")


def _read_parquet(url: str, columns: Iterable[str] | None = None, schema: pa.Schema | None = None) -> pa.Table:
    table = storage.read_table(url, columns)
    return table.select(schema.names).cast(schema) if schema is not None else table


class Decide(beam.DoFn):
    """All chunk summaries in (one element) -> ledger changes written; out: the members of each
    shard of the prepared store, the duplicates on standby (STANDBY), one task per ledger file.

    Reads only the compact columns of the slices (about 200 bytes a row), so its memory is
    a small multiple of the delivery's hashes, like any global dedup.
    """

    LEDGER = "ledger"
    STANDBY = "standby"

    def __init__(self, dedup: DedupConfig, work_dir: str, samples_per_shard: int,
                 taken_down: tuple[frozenset[str], frozenset[str]] = (frozenset(), frozenset())):
        super().__init__()
        self.dedup = dedup
        self.work_dir = work_dir
        self.samples_per_shard = samples_per_shard
        self.taken_down = taken_down  # (asset ids, sha256s) of OUT/takedowns.jsonl: never come back

    def process(self, summaries: list[dict[str, Any]]) -> Iterator[Any]:
        chunks = sorted(summaries, key=lambda s: (s["manifest_index"], s["index"]))
        cols: dict[str, list[Any]] = {c: [] for c in _DECIDE_COLUMNS}
        part_of: list[str] = []
        for s in chunks:
            table = _read_parquet(slice_url(self.work_dir, s["chunk"]), _DECIDE_COLUMNS)
            for name in _DECIDE_COLUMNS:
                cols[name].extend(table.column(name).to_pylist())
            part_of.extend([ledger_part(s["manifest_index"], s["index"])] * table.num_rows)
        changes: dict[int, dict[str, Any]] = {}
        survivors = self._repeated_ids(cols, changes)
        survivors = self._not_taken_down(cols, survivors, changes)
        previous = dedup_rules.load_previous_hashes(self.dedup.previous_run) if self.dedup.previous_run else []
        if self.dedup.exact:
            survivors = self._exact(cols, survivors, previous, changes)
        if self.dedup.near:
            survivors = self._near(cols, survivors, previous, changes)
        standby = self._standby(cols, survivors, changes)

        by_part: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for i in sorted(changes):
            by_part[part_of[i]].append({"manifest_uri": cols["manifest_uri"][i], "manifest_row": cols["manifest_row"][i],
                                        **{f: changes[i].get(f) for f in _DECISION_FIELDS}})
        for part, rows in by_part.items():
            storage.write_table(decision_url(self.work_dir, part), pa.Table.from_pylist(rows, schema=DECISION_SCHEMA))
        slices_of: dict[str, list[str]] = defaultdict(list)
        for s in chunks:
            slices_of[ledger_part(s["manifest_index"], s["index"])].append(s["chunk"])
        for part, names in slices_of.items():
            yield beam.pvalue.TaggedOutput(self.LEDGER, (part, tuple(names), part in by_part))

        shards = shard_count(len(survivors), self.samples_per_shard)
        for i in survivors:
            key = storage.asset_key(cols["asset_id"][i])
            cluster = changes.get(i, {}).get("cluster_id")
            yield storage.stable_bucket(key, shards), (key, cols["record"][i], cluster)
        shards = shard_count(len(standby), self.samples_per_shard)
        for i in standby:
            key = storage.asset_key(cols["asset_id"][i])
            yield beam.pvalue.TaggedOutput(self.STANDBY, (storage.stable_bucket(key, shards),
                                                          (key, cols["record"][i], changes[i]["cluster_id"])))

    # -- duplicates on standby ------------------------------------------------------------

    def _standby(self, cols, survivors: list[int], changes: dict[int, dict[str, Any]]) -> list[int]:
        """The duplicates of a kept representative, on standby for the align step: if the
        representative fails alignment, the best member that passes takes its place
        (dedup_rules.regroup). Each points at its group's final representative: an exact
        duplicate of an asset that is itself a near duplicate points at what that one points at.
        Duplicates of a previous-run asset are not on standby (that asset is already curated)."""
        position = {cols["asset_id"][i]: i for i in survivors}
        dups = {cols["asset_id"][i]: i for i, c in changes.items()
                if c.get("reason") in (RejectReason.EXACT_DUPLICATE.value, RejectReason.NEAR_DUPLICATE.value)}
        standby = []
        for i in sorted(dups.values()):
            target = changes[i]["dup_of"]
            while target in dups:
                target = changes[dups[target]]["dup_of"]
            if target not in position:
                continue  # a previous-run asset
            rep = position[target]
            changes[i].update(dup_of=target, cluster_id=changes.get(rep, {}).get("cluster_id") or target)
            standby.append(i)
        return standby

    # -- repeated asset ids ---------------------------------------------------------------

    def _repeated_ids(self, cols: dict[str, list[Any]], changes: dict[int, dict[str, Any]]) -> list[int]:
        """Among rows that passed validation, the earliest (manifest, row) of an id wins."""
        counters = StageCounters(Stage.VALIDATE)
        first: dict[str, int] = {}
        survivors = []
        for i, aid in enumerate(cols["asset_id"]):  # slices are in (manifest, row) order
            if not cols["validated"][i]:
                continue
            j = first.setdefault(aid, i)
            if j != i:
                counters.rejected(RejectReason.DUPLICATE_ASSET_ID)
                changes[i] = {"status": "rejected", "stage": Stage.VALIDATE, "reason": RejectReason.DUPLICATE_ASSET_ID.value,
                              "detail": f"asset_id already used at {cols['manifest_uri'][j]} row {cols['manifest_row'][j]}",
                              "dup_of": aid, "cluster_id": None}
            elif cols["status"][i] == "kept":
                survivors.append(i)
        return survivors

    # -- takedowns --------------------------------------------------------------------------

    def _not_taken_down(self, cols: dict[str, list[Any]], survivors: list[int],
                        changes: dict[int, dict[str, Any]]) -> list[int]:
        """An asset taken down in this output folder stays out: by id, and by sha256 (a re-upload
        under a new id, or an exact copy)."""
        ids, shas = self.taken_down
        if not ids and not shas:
            return survivors
        counters = StageCounters(Stage.AUDIT)
        kept = []
        for i in survivors:
            by = "asset_id" if cols["asset_id"][i] in ids else "sha256" if cols["sha256"][i] in shas else None
            if by is None:
                kept.append(i)
                continue
            counters.rejected(RejectReason.TAKEN_DOWN)
            changes[i] = {"status": "rejected", "stage": Stage.AUDIT, "reason": RejectReason.TAKEN_DOWN.value,
                          "detail": f"taken down earlier (matched by {by}; OUT/takedowns.jsonl)", "dup_of": None,
                          "cluster_id": None}
        return kept

    # -- exact duplicates -----------------------------------------------------------------

    def _member(self, cols, i: int) -> dedup_rules.Member:
        return dedup_rules.Member(cols["asset_id"][i], cols["sha256"][i], cols["pixel_sha256"][i], self._rank(cols, i))

    def _rank(self, cols, i: int) -> tuple[int, int, str]:
        return dedup_rules.rank_key(cols["area"][i] or 0, cols["license_id"][i], cols["asset_id"][i],
                                    self.dedup.license_preference)

    def _exact(self, cols, survivors: list[int], previous, changes) -> list[int]:
        cfg = self.dedup
        counters = StageCounters(Stage.DEDUP_EXACT)
        counters.seen.inc(len(survivors))
        prev_keys = dedup_rules.previous_exact_keys(previous)
        groups: dict[str, list[int]] = defaultdict(list)
        for i in survivors:
            groups[dedup_rules.exact_key(cols["sha256"][i], cols["pixel_sha256"][i], cols["asset_id"][i],
                                         cfg.pixel_exact)].append(i)
        kept = []
        for members in groups.values():
            one = members[0]
            if len(members) == 1 and not dedup_rules.previous_match(cols["sha256"][one], cols["pixel_sha256"][one],
                                                                    prev_keys, cfg.pixel_exact):
                kept.extend(members)
                continue
            position = {cols["asset_id"][i]: i for i in members}
            for d in dedup_rules.exact_decisions([self._member(cols, i) for i in members], prev_keys, cfg.pixel_exact):
                i = position[d.asset_id]
                if d.dup_of is None:
                    kept.append(i)
                    if d.cluster_id:
                        changes[i] = {"status": "kept", "stage": Stage.CURATED, "cluster_id": d.cluster_id}
                else:
                    counters.rejected(RejectReason.EXACT_DUPLICATE)
                    changes[i] = {"status": "rejected", "stage": Stage.DEDUP_EXACT,
                                  "reason": RejectReason.EXACT_DUPLICATE.value, "detail": d.detail,
                                  "dup_of": d.dup_of, "cluster_id": d.cluster_id}
        counters.kept.inc(len(kept))
        return sorted(kept)

    # -- near duplicates ------------------------------------------------------------------

    def _near(self, cols, survivors: list[int], previous, changes) -> list[int]:
        cfg = self.dedup
        counters = StageCounters(Stage.DEDUP_NEAR)
        counters.seen.inc(len(survivors))
        mirrors = cols["phash_mirror"] if cfg.mirror else [None] * len(cols["phash"])
        rows = [dedup_rules.Row(cols["asset_id"][i], dedup_hash.hex_to_hash(cols["phash"][i]), self._rank(cols, i),
                                dedup_hash.hex_to_hash(mirrors[i]) if mirrors[i] else None) for i in survivors]
        position = {cols["asset_id"][i]: i for i in survivors}
        rejected = set()
        for d in dedup_rules.near_decisions(rows, previous, cfg.hamming_radius, cfg.bucket_cap, cfg.engine,
                                            cfg.threads):
            i = position[d.asset_id]
            if d.dup_of is None:
                if not changes.get(i, {}).get("cluster_id"):
                    changes[i] = {"status": "kept", "stage": Stage.CURATED, "cluster_id": d.cluster_id}
                continue
            counters.rejected(RejectReason.NEAR_DUPLICATE)
            rejected.add(i)
            changes[i] = {"status": "rejected", "stage": Stage.DEDUP_NEAR, "reason": RejectReason.NEAR_DUPLICATE.value,
                          "detail": d.detail, "dup_of": d.dup_of, "cluster_id": d.cluster_id}
        kept = [i for i in survivors if i not in rejected]
        counters.kept.inc(len(kept))
        return kept


class WriteShardFromRecords(beam.DoFn):
    """(shard, [(key, record pointer, cluster_id)]) -> tar + metadata Parquet; emits the index entry."""

    def __init__(self, out_dir: str, counter: str = "samples_written"):
        super().__init__()
        self.out_dir = out_dir
        self.written = Metrics.counter(Stage.STORE, counter)  # store/samples_written: the prepared store's

    def process(self, item: tuple[int, Iterable[tuple[str, str, str | None]]]) -> Iterator[dict[str, Any]]:
        shard, members = item
        records = []
        for key, ref, cluster in members:
            asset = load_record(ref)
            records.append((key, asset.replace(cluster_id=cluster) if cluster else asset))
        entry = write_shard(self.out_dir, shard, records)
        self.written.inc(entry["samples"])
        yield entry


class WriteLedgerPart(beam.DoFn):
    """(part, chunk names, has changes) -> ledger/<part>.parquet: the slices' rows with the changes."""

    def __init__(self, work_dir: str, out: str):
        super().__init__()
        self.work_dir = work_dir
        self.out = out

    def process(self, task: tuple[str, tuple[str, ...], bool]) -> Iterator[int]:
        part, chunks, has_changes = task
        rows: list[dict[str, Any]] = []
        for name in chunks:
            rows.extend(_read_parquet(slice_url(self.work_dir, name), schema=ledger.LEDGER_SCHEMA).to_pylist())
        if has_changes:
            changes = {(r["manifest_uri"], r["manifest_row"]): r
                       for r in _read_parquet(decision_url(self.work_dir, part)).to_pylist()}
            for row in rows:
                change = changes.get((row["manifest_uri"], row["manifest_row"]))
                if change is not None:
                    row.update({f: change[f] for f in _DECISION_FIELDS})
        yield ledger.write_ledger_file(storage.join(self.out, "ledger", part + ".parquet"), rows)
