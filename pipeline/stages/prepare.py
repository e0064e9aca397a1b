"""The prepare step in bounded memory: per-row work in chunks, global steps on compact records.

A runner that executes a batch pipeline stage by stage (the local DirectRunner does) holds
every PCollection that crosses a shuffle in memory, so a graph that shuffles one record per
manifest row grows with the delivery. Here no full record crosses a shuffle:

1. `ingest.read_chunks` cuts each manifest into chunks of `curated.chunk_rows` rows. A chunk of an
   uncompressed JSONL manifest is a byte range that the worker reads; CSV, Parquet and
   compressed manifests carry their raw rows in the chunk (then those rows are the only
   per-row data a runner holds, once, packed 500 to an element).
2. `ProcessChunk` runs validate -> license gate -> fetch -> decode (+ perceptual hash) for
   one chunk inside one worker and writes, under `work_dir`:
     staging/<chunk>.bin     the normalised JPEGs and the records (JSON, `store.encode_record`), appended;
     slices/<chunk>.parquet  one row per manifest row: its ledger row so far, plus the
                             columns the global steps need (hashes, area, record pointer).
   It emits one small summary per chunk.
3. `Decide` (one worker) reads only the compact columns of every slice and makes the
   decisions that need the whole delivery: repeated asset_ids (among rows that passed
   validation, the earliest manifest row wins), exact and near duplicates (the rules of
   pipeline/dedup_rules.py), and the shard of every kept asset. It writes the
   ledger changes per ledger file (decisions/<part>.parquet) and emits one
   (shard, (key, record pointer, cluster_id)) per kept asset and one task per ledger file.
   (`Decide` and the writers below are in pipeline/stages/decide.py.)
4. `WriteShardFromRecords` loads one shard's records from staging and writes the tar +
   metadata Parquet (`store.write_shard`); `WriteLedgerPart` writes one ledger file from
   its slices and their changes.

Outputs are the same as those of a per-row graph: shards by `stable_bucket(key, n)`,
sorted by key, byte-identical across runs and worker counts. A repeated asset_id is found
after fetch and decode here (the earliest valid row still wins and the others are
rejected at stage `validate`), so duplicates of an id are fetched once each: a cost only a
broken manifest pays.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Iterable, Iterator

import apache_beam as beam
import pyarrow as pa

from manifests.policy import LicensePolicy
from pipeline import ledger, storage
from pipeline.progress import Progress
from pipeline.config import DecodeConfig, DedupConfig, FetchConfig, ValidateConfig
from pipeline.records import Asset, RejectReason, SourceRow
from pipeline.stages.base import Stage, StageCounters, StageDoFn
from pipeline.stages.decode import DecodeImages
from pipeline.stages.dedup import HashImage
from pipeline.stages.fetch import Fetched, FetchImages
from pipeline.stages.ingest import Chunk, ValidateRows
from pipeline.stages.licenses import VerifyLicenses
from pipeline.stages.store import decode_record, encode_record

log = logging.getLogger(__name__)

CHUNKS_PER_LEDGER_FILE = 10  # a ledger file holds ten chunks' rows (5,000 by default), in manifest order

SLICE_SCHEMA = pa.schema(list(ledger.LEDGER_SCHEMA) + [
    pa.field("validated", pa.bool_()),  # passed validation: takes part in the repeated-id check
    pa.field("pixel_sha256", pa.string()),
    pa.field("phash_mirror", pa.string()),  # kept rows with dedup.mirror: the mirrored frame's hash, for the near rule
    pa.field("area", pa.int64()),  # source width * height, for the representative rule
    pa.field("record", pa.string()),  # kept rows: the Asset's JSON record in staging, `file@offset:length`
])
def ledger_part(manifest_index: int, chunk_index: int) -> str:
    """The ledger file a chunk's rows go to: ledger-<manifest>-<part>.parquet."""
    return f"ledger-{manifest_index:04d}-{chunk_index // CHUNKS_PER_LEDGER_FILE:05d}"


def load_record(ref: str) -> Asset:
    return decode_record(storage.read_span(ref))


def after_fetch_steps(decode: DecodeConfig, dedup: DedupConfig) -> list[StageDoFn]:
    """The steps after fetch, in order: decode, and the perceptual hash when near dedup is on.
    The hash of the source bytes (hash_input=source) is taken before decode drops them;
    otherwise after it (with auto, decode hashes the full frame and the hash step keeps it)."""
    decode_step = DecodeImages(decode, dedup.hash_kind if dedup.near else None, dedup.near and dedup.mirror)
    if not dedup.near:
        return [decode_step]
    hash_step = HashImage(dedup)
    return [hash_step, decode_step] if dedup.hash_input == "source" else [decode_step, hash_step]


class ProcessChunk(beam.DoFn):
    """Validate, license, fetch, decode and stage one chunk; write its slice; emit a summary.

    Runs the per-row steps (`apply`, counters included), one row at a time, except fetch: up to `fetch.concurrency` objects are fetched at once by a thread
    pool while this thread decodes the rows before them, so network waits overlap with
    decode. Rows are finished in manifest order, so the staging file, the slice and every
    output are byte-identical to a sequential run. A new fetch starts only while the bytes
    fetched but not yet decoded stay under `fetch.max_bytes_in_flight`.
    """

    def __init__(self, validate: ValidateConfig, policy: LicensePolicy, fetch: FetchConfig, decode: DecodeConfig,
                 dedup: DedupConfig, work_dir: str, progress: Progress | None = None,
                 isolate: frozenset[str] = frozenset()):
        super().__init__()
        self.isolate = isolate  # chunks a worker died on in the last attempt: rows probed one by one
        self.validate_cfg, self.policy, self.fetch_cfg, self.decode_cfg, self.dedup_cfg = validate, policy, fetch, decode, dedup
        self.work_dir = work_dir
        self.progress = progress
        self._validate: ValidateRows | None = None
        self._license: VerifyLicenses | None = None
        self._fetch: FetchImages | None = None
        self._after_fetch: list[StageDoFn] = []
        self._pool: ThreadPoolExecutor | None = None
        self._ticker = None
        self._decode_counters: StageCounters | None = None

    def setup(self) -> None:
        self._validate = ValidateRows(self.validate_cfg)
        self._license = VerifyLicenses(self.policy)
        self._fetch = FetchImages(self.fetch_cfg)
        self._after_fetch = after_fetch_steps(self.decode_cfg, self.dedup_cfg)
        self._decode_counters = StageCounters(Stage.DECODE)
        for step in (self._validate, self._license, self._fetch, *self._after_fetch):
            step.setup()
        self._pool = ThreadPoolExecutor(max_workers=self.fetch_cfg.concurrency, thread_name_prefix="fetch")
        self._ticker = self.progress.ticker() if self.progress else None

    def teardown(self) -> None:
        for dofn in (self._validate, self._license, self._fetch, *self._after_fetch):
            if dofn is not None:
                dofn.teardown()
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)

    def process(self, chunk: Chunk) -> Iterator[dict[str, Any]]:
        marker = inflight_url(self.work_dir, chunk.name)  # left behind only if this worker dies
        storage.write_bytes(marker, b"")
        staging = storage.SpanWriter(storage.join(self.work_dir, "staging", chunk.name + ".bin"))
        rows: list[dict[str, Any]] = []
        ticker = self._ticker
        isolate = chunk.name in self.isolate
        try:
            for row in self._rows(chunk.source_rows(), staging, isolate):
                rows.append(row)
                if ticker:
                    ticker.add(1)
        finally:
            staging.close()
            if ticker:
                ticker.flush()
        table = pa.Table.from_pylist(rows, schema=SLICE_SCHEMA)
        storage.write_table(slice_url(self.work_dir, chunk.name), table)
        storage.remove_tree(marker)
        _injected_kill(self.work_dir)
        yield {"chunk": chunk.name, "manifest_index": chunk.manifest_index, "index": chunk.index,
               "rows": len(rows), "kept": sum(r["status"] == "kept" for r in rows)}

    def _rows(self, sources: Iterable[SourceRow], staging: storage.SpanWriter,
              isolate: bool = False) -> Iterator[dict[str, Any]]:
        """Each source row's slice row, in order, with fetches running ahead in the pool."""
        cfg = self.fetch_cfg
        held = _HeldBytes()
        pending: deque[tuple[Asset | None, Any, bool, Future | None]] = deque()
        fetching = 0  # pending entries with a fetch (running or done, not yet finished here)
        sources = iter(sources)
        exhausted = False
        while True:
            while not exhausted and fetching < cfg.concurrency and held.value < cfg.max_bytes_in_flight:
                source = next(sources, None)
                if source is None:
                    exhausted = True
                    break
                asset, rejected = self._validate.apply(source)
                validated = asset is not None
                if asset is not None:
                    asset, rejected = self._license.apply(asset)
                future = None
                if asset is not None:
                    future = self._pool.submit(held.fetch, self._fetch, asset)
                    fetching += 1
                pending.append((asset, rejected, validated, future))
            if not pending:
                return
            asset, rejected, validated, future = pending.popleft()
            if future is not None:
                fetching -= 1
                fetched = future.result()
                held.release(fetched.size)
                asset, rejected = self._fetch.apply(asset, lambda a, f=fetched: self._fetch.finish(a, f))
                del fetched
            if isolate and asset is not None:
                died = _probe(lambda a=asset: self._after(a))
                if died:
                    self._decode_counters.rejected(RejectReason.WORKER_CRASHED)
                    asset, rejected = None, asset.reject(Stage.DECODE, RejectReason.WORKER_CRASHED, died)
            yield self._finish(asset, rejected, validated, staging)

    def _after(self, asset: Asset) -> None:
        """The stages after fetch (decode, hashes), where native code can kill a process."""
        _injected_crash(asset)
        for step in self._after_fetch:
            if asset is None:
                return
            asset, _ = step.apply(asset)

    def _finish(self, asset: Asset | None, rejected: Any, validated: bool, staging: storage.SpanWriter) -> dict[str, Any]:
        if asset is not None:
            _injected_crash(asset)
        for step in self._after_fetch:
            if asset is None:
                break
            asset, rejected = step.apply(asset)
        if asset is None:
            row = ledger.rejected_row(rejected)
            row.update(validated=validated, pixel_sha256=None, area=None, record=None)
            return row
        asset = asset.replace(image=None, image_uri=staging.append(asset.image), source_bytes=None)
        row = ledger.kept_row(asset)
        row.update(validated=True, pixel_sha256=asset.pixel_sha256, phash_mirror=asset.phash_mirror,
                   area=(asset.source_width or 0) * (asset.source_height or 0),
                   record=staging.append(encode_record(asset)))
        return row


CRASH_ROW_ENV = "CM3CURATE_CRASH_ROW"  # "<manifest file name>#<row>": that row kills its process (tests, drills)


def _injected_crash(asset: Asset) -> None:
    """Fault injection for tests and drills: with CM3CURATE_CRASH_ROW set to this row, the
    process dies here as a native crash in decode would (SIGSEGV). Unset: nothing happens."""
    crash_row = os.environ.get(CRASH_ROW_ENV)
    if crash_row and crash_row == f"{asset.manifest_uri.rsplit('/', 1)[-1]}#{asset.manifest_row}":
        os.kill(os.getpid(), signal.SIGSEGV)


KILL_AFTER_CHUNKS_ENV = "CM3CURATE_KILL_AFTER_CHUNKS"  # N: the run dies once N chunks are staged (tests, drills)


def _injected_kill(work_dir: str) -> None:
    """Fault injection for tests and drills: with CM3CURATE_KILL_AFTER_CHUNKS=N, once N chunks'
    slices are written the run dies as a lost machine would, at a known point of the prepare
    step: SIGKILL to its process group (driver and workers) when the run leads its own session
    (start it with setsid), else to this process only. Unset: nothing happens."""
    after = os.environ.get(KILL_AFTER_CHUNKS_ENV)
    if not after or len(storage.list_files(storage.join(work_dir, "slices"), "*.parquet")) < int(after):
        return
    if os.getpgid(0) == os.getsid(0):
        os.killpg(os.getpgid(0), signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)


def inflight_url(work_dir: str, chunk: str) -> str:
    return storage.join(work_dir, "inflight", chunk)


def _probe(work: Any, timeout_s: float = 600.0) -> str | None:
    """Run `work()` in a forked child; None if it returned, else how the child died.

    Used only for rows of a chunk that a worker died on: a segfault or an out-of-memory kill
    then costs that child, not the worker, and the row is rejected (WORKER_CRASHED). Nothing
    comes back from the child but its exit status.
    """
    import time

    pid = os.fork()
    if pid == 0:  # the child: never returns into the caller's frames
        try:
            work()  # a Python error here is the stage's to report in the parent, not a crash
        finally:
            os._exit(0)
    deadline = time.monotonic() + timeout_s
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return f"the row did not finish within {timeout_s:.0f} s when retried alone"
        time.sleep(0.005)
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else str(sig)
        return f"a worker process died on this row ({name}); retried alone, it died again"
    if os.WEXITSTATUS(status) != 0:
        return f"a worker process exited with status {os.WEXITSTATUS(status)} on this row; retried alone, again"
    return None


class _HeldBytes:
    """Bytes fetched and not yet finished by the bundle's thread (the in-flight cap)."""

    def __init__(self) -> None:
        self.value = 0
        self._lock = threading.Lock()

    def fetch(self, stage: FetchImages, asset: Asset) -> Fetched:
        fetched = stage.fetch(asset)
        with self._lock:
            self.value += fetched.size
        return fetched

    def release(self, n: int) -> None:
        with self._lock:
            self.value -= n


def slice_url(work_dir: str, chunk: str) -> str:
    return storage.join(work_dir, "slices", chunk + ".parquet")
