"""Read manifests (JSONL / CSV / Parquet, any fsspec URL), cut them into chunks, validate rows.

Every raw row leaves validation either as an `Asset` or as a `Rejected`, so the ledger can
account for it; a malformed line is a rejection, never a crashed run. Repeated asset_ids
need the whole delivery: the prepare step finds them (pipeline/stages/prepare.py).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import unicodedata
from typing import Iterable, Iterator, NamedTuple

import fsspec
from fsspec.utils import infer_compression

from manifests.schema import RowError, parse_entry
from pipeline.config import ValidateConfig
from pipeline.records import Asset, Rejected, RejectReason, SourceRow
from pipeline.stages.base import Reject, Stage, StageCounters, StageDoFn

log = logging.getLogger(__name__)

FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".csv": "csv", ".parquet": "parquet"}
_COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst")


def manifest_format(url: str) -> str:
    """Format from the file name (a compression suffix is looked through)."""
    name = url.lower()
    for suffix in _COMPRESSIONS:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    for suffix, fmt in FORMATS.items():
        if name.endswith(suffix):
            return fmt
    raise ValueError(f"{url}: unknown manifest format (expected .jsonl, .csv or .parquet)")


def read_manifest(url: str) -> Iterator[SourceRow]:
    """Yield every row of one manifest with its 1-based row number; streams, never loads all."""
    fmt = manifest_format(url)
    if fmt == "parquet":
        yield from _read_parquet(url)
        return
    with fsspec.open(url, "rb", compression="infer") as raw:
        if fmt == "jsonl":
            yield from _read_jsonl(url, raw)
        else:
            # utf-8-sig: Excel's "CSV UTF-8" starts with a BOM; surrogateescape keeps bad bytes
            # visible, so the row they are in is rejected rather than silently altered
            yield from _read_csv(url, io.TextIOWrapper(raw, encoding="utf-8-sig", errors="surrogateescape",
                                                       newline=""))


def jsonl_text(line: bytes) -> tuple[str, str | None]:
    """One JSONL line (split on \\n only, as the format says) as text, without a leading BOM,
    and the problem with its encoding if it is not valid UTF-8 (then bad bytes are replaced
    in the text kept for the ledger: two different ids must never decode to the same string)."""
    try:
        text, problem = line.decode("utf-8"), None
    except UnicodeDecodeError as exc:
        text, problem = line.decode("utf-8", errors="replace"), f"invalid UTF-8 at byte {exc.start}"
    return text.lstrip("\ufeff"), problem


def _read_jsonl(url: str, lines: Iterable[bytes], start_row: int = 0) -> Iterator[SourceRow]:
    """Rows of JSONL lines; blank lines are skipped and not counted. `start_row` is the
    number of rows before these lines (a reader of a byte range passes it)."""
    row_no = start_row
    for raw_line in lines:
        line, problem = jsonl_text(raw_line)
        if not line.strip():
            continue
        row_no += 1
        if problem:
            yield SourceRow(url, row_no, line.strip()[:500], parse_error=problem)
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            yield SourceRow(url, row_no, line.strip()[:500], parse_error=f"invalid JSON: {exc.msg} at column {exc.colno}")
            continue
        except (ValueError, RecursionError) as exc:  # a 5,000-digit number, arrays nested 100,000 deep
            yield SourceRow(url, row_no, line.strip()[:500], parse_error=f"unreadable JSON: {type(exc).__name__}: "
                                                                          f"{str(exc)[:200]}")
            continue
        if not isinstance(value, dict):
            yield SourceRow(url, row_no, line.strip()[:500], parse_error=f"line is a JSON {type(value).__name__}, not an object")
            continue
        yield SourceRow(url, row_no, value)


def _read_csv(url: str, text: io.TextIOBase) -> Iterator[SourceRow]:
    reader = csv.reader(text)
    try:
        header = next(reader)
    except StopIteration:
        return
    header = [h.strip() for h in header]
    row_no = 0
    for cells in reader:
        if not any(c.strip() for c in cells):
            continue  # blank lines are skipped and not counted, as in JSONL
        row_no += 1
        bad = next((c for c in cells if _has_bad_bytes(c)), None)
        if bad is not None:
            yield SourceRow(url, row_no, _visible(",".join(cells))[:500], parse_error="invalid UTF-8 in a cell")
            continue
        if len(cells) != len(header):
            yield SourceRow(url, row_no, ",".join(cells)[:500],
                            parse_error=f"{len(cells)} cells for {len(header)} columns")
            continue
        yield SourceRow(url, row_no, {k: (v if v != "" else None) for k, v in zip(header, cells)})


def _has_bad_bytes(text: str) -> bool:
    return any("\udc80" <= ch <= "\udcff" for ch in text)


def _visible(text: str) -> str:
    """Text holding undecodable bytes (surrogate escapes) with each shown as U+FFFD."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _read_parquet(url: str) -> Iterator[SourceRow]:
    import pyarrow.parquet as pq

    with fsspec.open(url, "rb") as handle:
        parquet = pq.ParquetFile(handle)
        row_no = 0
        for batch in parquet.iter_batches(batch_size=4096):
            for record in batch.to_pylist():
                row_no += 1
                yield SourceRow(url, row_no, record)


def count_manifest_rows(url: str) -> int:
    """Independent row count used for the ledger invariant."""
    return sum(1 for _ in read_manifest(url))


class Chunk(NamedTuple):
    """Up to `chunk_rows` consecutive rows of one manifest (manifests in sorted URL order).

    An uncompressed JSONL manifest's chunk is a byte range (`span`) that the worker reads
    itself, so no row passes through the runner; other formats carry their `rows`.
    """

    manifest_index: int
    manifest_uri: str
    index: int
    rows: tuple[SourceRow, ...] = ()
    span: tuple[int, int] | None = None  # [start, end) bytes of the manifest
    rows_before: int = 0  # rows of the manifest before this chunk (for row numbers)

    @property
    def name(self) -> str:
        return chunk_name(self.manifest_index, self.index)

    def source_rows(self) -> Iterable[SourceRow]:
        if self.span is None:
            return self.rows
        start, end = self.span
        with fsspec.open(self.manifest_uri, "rb") as handle:
            handle.seek(start)
            data = handle.read(end - start)
        return list(_read_jsonl(self.manifest_uri, io.BytesIO(data), self.rows_before))


def chunk_name(manifest_index: int, index: int) -> str:
    return f"chunk-{manifest_index:04d}-{index:06d}"


def read_chunks(item: tuple[int, str], chunk_rows: int) -> Iterator[Chunk]:
    """(manifest index, URL) -> the manifest's chunks of `chunk_rows` rows, streamed."""
    manifest_index, url = item
    if manifest_format(url) == "jsonl" and infer_compression(url) is None:
        yield from _jsonl_spans(manifest_index, url, chunk_rows)
        return
    counter = StageCounters(Stage.INGEST).seen
    rows: list[SourceRow] = []
    index = 0
    for row in read_manifest(url):
        counter.inc()
        rows.append(row)
        if len(rows) == chunk_rows:
            yield Chunk(manifest_index, url, index, tuple(rows))
            index, rows = index + 1, []
    if rows:
        yield Chunk(manifest_index, url, index, tuple(rows))


def _jsonl_spans(manifest_index: int, url: str, chunk_rows: int) -> Iterator[Chunk]:
    """Byte ranges of `chunk_rows` rows each; rows are counted as `ingest._read_jsonl` counts them."""
    counter = StageCounters(Stage.INGEST).seen
    index = rows = before = start = offset = 0
    with fsspec.open(url, "rb") as handle:
        for line in handle:
            offset += len(line)
            if jsonl_text(line)[0].strip():
                rows += 1
                counter.inc()
                if rows == chunk_rows:
                    yield Chunk(manifest_index, url, index, span=(start, offset), rows_before=before)
                    index, before, start, rows = index + 1, before + rows, offset, 0
    if rows:
        yield Chunk(manifest_index, url, index, span=(start, offset), rows_before=before)


def clean_captions(captions: Iterable[str], cfg: ValidateConfig) -> tuple[tuple[str, ...], tuple[RejectReason, str] | None]:
    """Normalise captions and drop bad ones; if none is left, say why (first failure wins)."""
    kept: list[str] = []
    failure: tuple[RejectReason, str] | None = None
    for caption in captions:
        text = unicodedata.normalize("NFC", caption)
        text = "".join(ch if unicodedata.category(ch)[0] != "C" else " " for ch in text)
        text = " ".join(text.split())
        if len(text) < cfg.min_caption_chars:
            failure = failure or (RejectReason.CAPTION_EMPTY, f"caption {caption[:40]!r} is empty or shorter than {cfg.min_caption_chars} chars")
            continue
        if len(text) > cfg.max_caption_chars:
            failure = failure or (RejectReason.CAPTION_TOO_LONG, f"caption has {len(text)} chars (max {cfg.max_caption_chars})")
            continue
        letters = sum(1 for ch in text if ch.isalpha() or ch.isspace())
        if letters / len(text) < cfg.min_letter_fraction or not any(ch.isalpha() for ch in text):
            failure = failure or (RejectReason.CAPTION_NOT_TEXT, f"caption {text[:60]!r} is not natural-language text")
            continue
        if text not in kept:
            kept.append(text)
    kept = kept[: cfg.max_captions]
    if kept:
        return tuple(kept), None
    return (), failure or (RejectReason.CAPTION_EMPTY, "no captions")


class ValidateRows(StageDoFn):
    """A manifest row (`SourceRow`) -> an `Asset` with cleaned captions, or its rejection."""

    stage = Stage.VALIDATE

    def __init__(self, cfg: ValidateConfig):
        super().__init__()
        self.cfg = cfg

    def rejection(self, row: SourceRow, reason: RejectReason, detail: str, asset_id: str | None = None,
                  entry=None) -> Rejected:
        return Rejected(asset_id, self.stage, reason, detail, row.manifest_uri, row.manifest_row, entry=entry)

    def handle(self, row: SourceRow) -> Asset:
        if row.parse_error is not None:
            raise Reject(RejectReason.MALFORMED_ROW, row.parse_error)
        try:
            entry = parse_entry(row.raw)
        except RowError as err:
            raise Reject(RejectReason[err.reason], err.detail, asset_id=err.asset_id) from None
        captions, failure = clean_captions(entry.captions, self.cfg)
        if failure is not None:
            raise Reject(failure[0], failure[1], asset_id=entry.asset_id, entry=entry)
        return Asset(entry=entry, manifest_uri=row.manifest_uri, manifest_row=row.manifest_row, captions=captions)
