"""`curate audit`: answer an auditor's questions with SQL over a run's own tables (DuckDB).

Every table a run writes is Parquet, so DuckDB reads them in place, local or on an object
store (through fsspec), with no copy and no server. Views:

    ledger      OUT/ledger/*.parquet             one row per manifest row: kept or why not
    curated     OUT/curated/metadata-*.parquet   one row per kept asset: license, source, shard
    sequences   OUT/tokens/sequences.parquet/    one row per token sequence: its assets and roles
    neighbours  OUT/index/neighbours-*.parquet   each document's retrieved neighbours
    takedowns   OUT/takedowns.jsonl              assets taken down (empty until there are any)

`trace`, `asset` and `license` are fixed queries over those views (docs/audit.md); `sql`
runs yours.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Sequence

from pipeline import storage

VIEWS = {
    "ledger": ("ledger", "*.parquet"),
    "curated": ("curated", "metadata-*.parquet"),
    "sequences": ("tokens/sequences.parquet", "*.parquet"),
    "neighbours": ("index", "neighbours-*.parquet"),
}
EMPTY_TAKEDOWNS = ("SELECT NULL::VARCHAR AS asset_id, NULL::VARCHAR AS sha256, NULL::VARCHAR AS reason, "
                   "NULL::VARCHAR AS taken_down_at WHERE false")


class AuditError(ValueError):
    """The run folder lacks what a question needs, or the question is malformed: one line."""


@dataclass
class Answer:
    title: str
    columns: list[str]
    rows: list[tuple]
    note: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"title": self.title, "rows": [dict(zip(self.columns, r)) for r in self.rows],
                **({"note": self.note} if self.note else {})}

    def to_text(self, width: int = 48) -> str:
        def cell(v: Any) -> str:
            text = "" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v))
            half = (width - 1) // 2  # keep both ends: a path's file name, a hash's start
            return text if len(text) <= width else text[:half] + "…" + text[-(width - 1 - half):]

        cells = [[cell(v) for v in row] for row in self.rows]
        widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(self.columns)]
        lines = [self.title, "  ".join(c.ljust(w) for c, w in zip(self.columns, widths)),
                 "  ".join("-" * w for w in widths)]
        lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in cells]
        lines.append(f"({len(self.rows)} row{'s' if len(self.rows) != 1 else ''})")
        if self.note:
            lines.append(self.note)
        return "\n".join(lines)


def connect(out: str):
    """A DuckDB connection with the run's views; a view whose files are absent is left out."""
    import duckdb
    from fsspec.core import url_to_fs

    con = duckdb.connect(":memory:")
    if "://" in out and not out.startswith("file://"):
        fs, _ = url_to_fs(out)
        con.register_filesystem(fs)
    if not storage.exists(storage.join(out, "ledger")):
        raise AuditError(f"{out} holds no ledger: is it a run's output folder?")
    for view, (folder, pattern) in VIEWS.items():
        if storage.list_files(storage.join(out, folder), pattern):
            source = storage.join(out, folder, pattern).replace("'", "''")
            con.execute(f"CREATE VIEW {view} AS SELECT * FROM read_parquet('{source}')")
    takedowns = storage.join(out, "takedowns.jsonl")
    if storage.exists(takedowns):
        con.execute(f"CREATE VIEW takedowns AS SELECT * FROM read_json_auto('{takedowns.replace(chr(39), chr(39) * 2)}')")
    else:
        con.execute(f"CREATE VIEW takedowns AS {EMPTY_TAKEDOWNS}")
    return con


def _has(con, view: str) -> bool:
    return bool(con.execute("SELECT count(*) FROM duckdb_views() WHERE view_name = ?", [view]).fetchone()[0])


def _need(con, view: str, what: str) -> None:
    if not _has(con, view):
        raise AuditError(f"this run has no {view} table ({what}): run it --until "
                         f"{'tokens' if view == 'sequences' else 'curated'} first")


def _answer(con, title: str, sql: str, params: Sequence[Any] = (), note: str = "") -> Answer:
    cursor = con.execute(sql, list(params))
    return Answer(title, [d[0] for d in cursor.description], cursor.fetchall(), note)


def trace(out: str, key: str) -> Answer:
    """Every asset in a sequence (by sequence key) or one curated asset (by key or asset_id),
    with its license, licensor, manifest row and curation decisions."""
    con = connect(out)
    decisions = ("l.license_id, l.licensor, l.manifest_uri, l.manifest_row, l.status, l.clip_score, l.cluster_id, "
                 "l.sha256")
    if _has(con, "sequences") and con.execute("SELECT count(*) FROM sequences WHERE key = ?", [key]).fetchone()[0]:
        return _answer(con, f"sequence {key}: every asset in it", f"""
            WITH s AS (SELECT shard, "index", unnest(asset_ids) AS asset_id, unnest(roles) AS role,
                              generate_subscripts(asset_ids, 1) AS position
                       FROM sequences WHERE key = ?)
            SELECT s.position, s.role, s.asset_id, s.shard, s."index" AS sequence_index, {decisions}
            FROM s LEFT JOIN (SELECT * FROM ledger WHERE status = 'kept') l USING (asset_id)
            ORDER BY s.position""", [key])
    found = _answer(con, f"asset {key}", f"""
        SELECT l.asset_id, l.key, {decisions}, l.stage, l.reason, l.detail
        FROM ledger l WHERE l.key = ? OR l.asset_id = ? ORDER BY l.manifest_uri, l.manifest_row""", [key, key])
    if not found.rows:
        raise AuditError(f"{key!r} is neither a sequence key, a curated key nor an asset_id of this run")
    return found


def asset(out: str, asset_id: str) -> Answer:
    """Every sequence and shard holding the asset (as main document or neighbour), or why it
    was rejected."""
    con = connect(out)
    ledger_rows = _answer(con, "", "SELECT status, stage, reason, detail, manifest_uri, manifest_row FROM ledger "
                                   "WHERE asset_id = ? ORDER BY manifest_uri, manifest_row", [asset_id]).rows
    if not ledger_rows:
        raise AuditError(f"asset {asset_id!r} is in no manifest row of this run")
    kept = [r for r in ledger_rows if r[0] == "kept"]
    if not kept:
        return _answer(con, f"asset {asset_id}: not in any sequence, rejected", """
            SELECT manifest_uri, manifest_row, status, stage, reason, detail FROM ledger WHERE asset_id = ?
            ORDER BY manifest_uri, manifest_row""", [asset_id])
    _need(con, "sequences", "token sequences")
    return _answer(con, f"asset {asset_id}: every sequence that contains it", """
        SELECT key AS sequence, shard, "index" AS sequence_index, roles[list_position(asset_ids, ?)] AS role,
               num_tokens
        FROM sequences WHERE list_contains(asset_ids, ?) ORDER BY role, shard, "index" """, [asset_id, asset_id])


def license_report(out: str, license_id: str) -> Answer:
    """The kept assets under a license, and the sequences and tokens they account for."""
    con = connect(out)
    has_sequences = _has(con, "sequences")
    joins = """
        LEFT JOIN (SELECT main_asset_id AS asset_id, count(*) AS main_sequences, sum(num_tokens) AS main_tokens
                   FROM sequences GROUP BY 1) m USING (asset_id)
        LEFT JOIN (SELECT a AS asset_id, count(*) AS neighbour_in
                   FROM (SELECT unnest(asset_ids) AS a, unnest(roles) AS r FROM sequences) WHERE r = 'neighbour'
                   GROUP BY 1) n USING (asset_id)""" \
        if has_sequences else ""
    counts = ("coalesce(m.main_sequences, 0) AS main_sequences, coalesce(m.main_tokens, 0) AS main_tokens, "
              "coalesce(n.neighbour_in, 0) AS neighbour_in") if has_sequences else "NULL AS main_sequences"
    answer = _answer(con, f"license {license_id}: kept assets", f"""
        SELECT l.asset_id, l.licensor, l.manifest_uri, l.manifest_row, {counts}
        FROM (SELECT * FROM ledger WHERE status = 'kept' AND license_id = ?) l {joins}
        ORDER BY l.asset_id""", [license_id])
    if has_sequences:
        sequences = sum(r[4] for r in answer.rows)
        tokens = sum(r[5] for r in answer.rows)
        answer.note = (f"{len(answer.rows)} kept assets; {sequences} sequences ({tokens:,} tokens) have one as their "
                       f"main document; as a neighbour they appear {sum(r[6] for r in answer.rows)} times")
    return answer


def sql(out: str, query: str) -> Answer:
    """An ad-hoc query over the views (ledger, curated, sequences, neighbours, takedowns)."""
    import duckdb

    con = connect(out)
    try:
        return _answer(con, "query", query)
    except duckdb.Error as exc:
        raise AuditError(f"sql: {str(exc).splitlines()[0]}") from None


def render(answer: Answer, as_json: bool) -> str:
    return json.dumps(answer.to_json(), indent=2, default=str) if as_json else answer.to_text()
