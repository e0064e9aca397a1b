"""Run assembly: the steps of a run, their Beam graphs, resume, and the run record.

Steps run in order; each belongs to a user-facing phase (`--until`):

    curated  prepare (A–B: ingest, license gate, fetch, decode, exact/near dedup)
             clip    (train the licensed-lineage CLIP, unless weights are configured)
             align   (C: CLIP scores, alignment filter, semantic dedup, curated store, ledger)
    models   vq      (D: train the VQ image tokenizer, unless weights are configured)
             text    (D: byte-level BPE on the captions + the joint vocabulary)
             encode  (apply the VQ tokenizer to every curated image: codes Parquet)
    index    index   (E: FAISS index over document embeddings + neighbour table)
    tokens   tokens  (F: CM3 sequences -> Megatron .bin/.idx shards + provenance; ledger
                      rejects documents too long for tokens.max_tokens)
             sft     (only with sft.enabled: CM3leon-style task examples -> `sft/`, a shard
                      set of its own; the ledger is not touched)

A step is done when `OUT/_state/<step>.json` holds the same config hash; the hash chains
the hashes of the steps before it, so changing an upstream setting reruns everything
downstream. An interrupted step has no state file: a rerun deletes its outputs and runs
it again, and since outputs are deterministic the result equals an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import hashlib
import json
import logging
import os
import platform
import time
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, Callable, Iterator, Sequence

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions

from manifests.policy import LicensePolicy, load_policy
from pipeline import ledger, rundir, storage
from pipeline.progress import Monitor, Progress, counted, stderr_to_log
from pipeline.card import write_attribution, write_card
from pipeline.lineage import Lineage
from pipeline.report import write_report
from pipeline.takedown import taken_down
from pipeline.config import ConfigError, RunConfig, describe_yaml_error, missing_backend, url_scheme
from pipeline.stages.base import REJECTED
from pipeline.stages.dedup import DedupSemantic
from pipeline.stages.ingest import count_manifest_rows, read_chunks
from pipeline.stages.store import ReadCuratedStore, StageImages, WriteCuratedStore, write_index

log = logging.getLogger(__name__)

PHASES = ("curated", "models", "index", "tokens")
PACKAGES = ("apache-beam", "pyarrow", "pillow", "numpy", "torch", "torchvision", "open-clip-torch",
            "faiss-cpu", "tokenizers", "safetensors", "webdataset", "imagehash", "fsspec")


class NothingToDo(RuntimeError):
    """A step has no input left (every row was rejected): the run stops with this one line."""


class WorkerDied(RuntimeError):
    """A worker process died (a native crash, an out-of-memory kill) in the prepare step."""


@dataclass
class StepResult:
    name: str
    phase: str
    skipped: bool
    seconds: float
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class RunReport:
    out: str
    steps: list[StepResult]
    summary: ledger.LedgerSummary
    counters: dict[str, int]


@dataclass(frozen=True)
class RunContext:
    cfg: RunConfig
    policy: LicensePolicy
    options: PipelineOptions
    config_hash: str = ""  # the running step's chained config hash (recorded in its outputs)
    show_progress: bool = False  # a live bar per Beam step on stderr (pipeline/progress.py)
    logs_to_file: bool = False  # Beam's own logs to OUT/_logs/<step>.log instead of the console
    rows_in: int | None = None  # rows in all manifests (the ledger invariant's left side)

    @property
    def out(self) -> str:
        return self.cfg.out

    def path(self, *parts: str) -> str:
        return storage.join(self.cfg.out, *parts)

    @contextlib.contextmanager
    def beam_step(self, step: str, total: int | None, unit: str = "rows") -> Iterator[Progress | None]:
        """While a Beam step runs: its log in OUT/_logs/<step>.log (with `logs_to_file`), and the
        `Progress` its workers tick, drawn as a bar on the console (with `show_progress`)."""
        with contextlib.ExitStack() as stack:
            console = stack.enter_context(stderr_to_log(self.path(LOGS, f"{step}.log"))) if self.logs_to_file else None
            if self.show_progress:
                yield stack.enter_context(Monitor(step, total, unit, stream=console)).progress
            else:
                yield None


@dataclass(frozen=True)
class Step:
    name: str
    phase: str
    sections: tuple[str, ...]  # config sections that change this step's outputs
    outputs: tuple[str, ...]  # folders under OUT owned (and cleared) by this step
    action: Callable[[RunContext], tuple[dict[str, int], dict[str, Any]]]
    gate: str | None = None  # a config section with `enabled`: when false the step is left out entirely
    reads: tuple[str, ...] = ()  # what it reads, for lineage: paths under OUT, or MANIFESTS


def beam_options(cfg: RunConfig, extra_flags: Sequence[str] = ()) -> PipelineOptions:
    """Config runner settings first, then config `beam.options`, then CLI flags (last wins)."""
    flags = [f"--runner={cfg.beam.runner}"]
    if cfg.beam.runner in ("DirectRunner", "direct"):
        workers = cfg.beam.direct_num_workers or os.cpu_count() or 1
        flags += [f"--direct_num_workers={workers}", f"--direct_running_mode={cfg.beam.direct_running_mode}"]
    flags += list(cfg.beam.options) + list(extra_flags)
    return PipelineOptions(flags)


def _counters(result: Any) -> dict[str, int]:
    counters: dict[str, int] = {}
    try:
        for item in result.metrics().query()["counters"]:
            name = f"{item.key.metric.namespace}/{item.key.metric.name}"
            counters[name] = counters.get(name, 0) + int(item.committed or item.attempted or 0)
    except Exception as exc:  # noqa: BLE001 - some runners do not report metrics
        log.warning("could not read Beam metrics: %s", exc)
    return dict(sorted(counters.items()))


def limit_malloc_arenas(arenas: int = 2) -> None:
    """Cap glibc's malloc arenas for this process and the local Beam workers it starts.

    glibc gives each thread that allocates its own arena (up to 8 per core), and memory
    freed in one arena is not reused by another; with the SDK harness's thread pool and
    gRPC threads, the local runner's processes then grow with every bundle. Two arenas cut
    the growth measured by benchmarks/ingest.py (docs/benchmarks.md). A value the user set
    in MALLOC_ARENA_MAX wins; on a non-glibc system this does nothing.
    """
    if "MALLOC_ARENA_MAX" in os.environ:
        return
    os.environ["MALLOC_ARENA_MAX"] = str(arenas)  # inherited by the worker processes
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-8, arenas)  # M_ARENA_MAX, for this process
    except (OSError, AttributeError):
        pass


def run_beam(build: Callable[[beam.Pipeline], None], options: PipelineOptions) -> dict[str, int]:
    from apache_beam.options.pipeline_options import DirectOptions, StandardOptions

    if str(options.view_as(StandardOptions).runner or "DirectRunner") in ("DirectRunner", "direct"):
        if options.view_as(DirectOptions).direct_running_mode == "multi_processing":
            limit_malloc_arenas()
    pipeline = beam.Pipeline(options=options)
    build(pipeline)
    result = pipeline.run()
    result.wait_until_finish()
    return _counters(result)


# ----------------------------------------------------------------------------- paths

WORK = "_work"
LOGS = "_logs"
PREPARED = "_work/prepared"
STAGING = "_work/staging"
SLICES = "_work/slices"
DECISIONS = "_work/decisions"


def clip_config(ctx: RunContext):
    """The CLIP the align/index steps use: the configured weights, or the one trained here."""
    clip = ctx.cfg.align.clip
    if clip.weights:
        return clip
    return dataclasses.replace(clip, weights=ctx.path("models", "clip", "clip.safetensors"))


# ----------------------------------------------------------------------------- step: prepare


def build_prepare_graph(p: beam.Pipeline, ctx: RunContext, progress: Progress | None = None,
                        isolate: frozenset[str] = frozenset()) -> None:
    """A–B: manifests -> validated, licensed, fetched, decoded, deduplicated assets.

    Per-row work runs in chunks that never leave their worker; only compact records reach
    the global steps (see pipeline/stages/prepare.py), so memory does not grow with the
    delivery. Semantic dedup needs CLIP embeddings: it runs in the align step.
    """
    from pipeline.stages import prepare

    cfg = ctx.cfg
    work = ctx.path(WORK)
    summaries = (
        p
        | "ManifestUrls" >> beam.Create(list(enumerate(sorted(cfg.manifests))))
        | "ReadChunks" >> beam.FlatMap(read_chunks, cfg.curated.chunk_rows)
        | "Rebalance" >> beam.Reshuffle()
        | "ProcessChunks" >> beam.ParDo(prepare.ProcessChunk(
            cfg.validate, ctx.policy, cfg.fetch, cfg.decode, dataclasses.replace(cfg.dedup, semantic=False), work,
            progress, isolate))
    )
    plan = (
        summaries
        | "CollectChunks" >> beam.combiners.ToList()
        | "Decide" >> beam.ParDo(prepare.Decide(cfg.dedup, work, cfg.curated.samples_per_shard,
                                                taken_down(cfg.out))).with_outputs(
            prepare.Decide.LEDGER, main="shards")
    )
    prepared = ctx.path(PREPARED)
    _ = (
        plan.shards
        | "GroupByShard" >> beam.GroupByKey()
        | "WriteShards" >> beam.ParDo(prepare.WriteShardFromRecords(prepared))
        | "CollectIndex" >> beam.combiners.ToList()
        | "WriteIndex" >> beam.Map(lambda shards: write_index(prepared, shards))
    )
    _ = (
        plan[prepare.Decide.LEDGER]
        | "SpreadLedger" >> beam.Reshuffle()
        | "WriteLedger" >> beam.ParDo(prepare.WriteLedgerPart(work, prepared))
    )


def _write_ledger(kept, rejections, out: str, stage: str, earlier=None) -> None:
    kept_rows = kept | "KeptRows" >> beam.Map(ledger.kept_row, stage)
    parts = [kept_rows]
    if rejections:
        parts.append(tuple(rejections) | "FlattenRejected" >> beam.Flatten()
                     | "RejectedRows" >> beam.Map(ledger.rejected_row))
    if earlier is not None:
        parts.append(earlier)
    _ = tuple(parts) | "AllLedgerRows" >> beam.Flatten() | "WriteLedger" >> ledger.WriteLedger(out)


def step_prepare(ctx: RunContext):
    inflight = ctx.path(WORK, "inflight")
    suspects = frozenset(url.rsplit("/", 1)[-1] for url in storage.list_files(inflight, "*"))
    if suspects:
        log.warning("prepare: a worker died on chunk(s) %s last time: their rows are probed one at a time",
                    sorted(suspects))
    storage.remove_tree(inflight)
    try:
        with ctx.beam_step("prepare", ctx.rows_in) as progress:
            counters = run_beam(lambda p: build_prepare_graph(p, ctx, progress, suspects), ctx.options)
    except Exception as exc:  # noqa: BLE001 - re-raised, one line if a worker process died
        left = sorted(url.rsplit("/", 1)[-1] for url in storage.list_files(inflight, "*"))
        if left:
            raise WorkerDied(
                f"prepare: a worker process died while processing chunk(s) {', '.join(left[:5])} "
                f"({type(exc).__name__}); rerun the same command: those chunks' rows are then tried one at a "
                "time, and a row that kills its process again is rejected as WORKER_CRASHED") from exc
        raise
    for work in (STAGING, SLICES, DECISIONS):
        storage.remove_tree(ctx.path(work))
    index = storage.read_json(ctx.path(PREPARED, "index.json"))
    return counters, {"samples": index["samples"], "shards": len(index["shards"])}


# ----------------------------------------------------------------------------- step: clip


def step_clip(ctx: RunContext):
    clip = ctx.cfg.align.clip
    if not ctx.cfg.align.enabled:
        return {}, {"skipped": "align.enabled is false"}
    if clip.weights:
        return {}, {"weights": clip.weights, "trained": False}
    from pipeline.clip import train_clip

    shards = storage.list_files(ctx.path(PREPARED), "images-*.tar")
    if not shards:
        raise NothingToDo("no curated images to train the CLIP on: every row was rejected before alignment "
                          "(see the ledger: OUT/_work/prepared/ledger/)")
    info = train_clip(clip, ctx.cfg.clip_train, shards, ctx.path("models", "clip"))
    return {}, {"trained": True, **{k: v for k, v in info.items() if isinstance(v, (int, float, str, bool))}}


# ----------------------------------------------------------------------------- step: align


def _earlier_rejections(prepared_ledger_dir: str):
    """The prepare step's ledger rows that are already final (rejected)."""
    import pyarrow.parquet as pq
    import fsspec

    for url in storage.list_files(prepared_ledger_dir, "ledger-*.parquet"):
        with fsspec.open(url, "rb") as handle:
            for row in pq.read_table(handle, schema=ledger.LEDGER_SCHEMA).to_pylist():
                if row["status"] == "rejected":
                    yield row


def build_align_graph(p: beam.Pipeline, ctx: RunContext, progress: Progress | None = None) -> None:
    """C: score every prepared asset with CLIP, filter, (semantic dedup), write the store."""
    from pipeline.stages.align import FilterAlignment, KeptEmbeddings, ScoreAlignment, WriteEmbeddings

    cfg = ctx.cfg
    assets = p | "ReadPrepared" >> ReadCuratedStore(ctx.path(PREPARED))
    earlier = p | "PreparedLedger" >> beam.Create([ctx.path(PREPARED, "ledger")]) \
        | "EarlierRejections" >> beam.FlatMap(_earlier_rejections)
    curated = ctx.path("curated")
    align_cfg = dataclasses.replace(cfg.align, clip=clip_config(ctx))
    scored = counted(assets, progress) | "ScoreAlignment" >> ScoreAlignment(align_cfg)
    staged = scored.kept | "StageImages" >> beam.ParDo(StageImages(ctx.path(STAGING)))
    filtered = staged | "FilterAlignment" >> FilterAlignment(align_cfg)
    kept = filtered.kept
    rejections = [scored[REJECTED], filtered[REJECTED]]
    if cfg.dedup.semantic:
        vectors = scored.embeddings | "ImageVectors" >> beam.Map(
            lambda r: (r["asset_id"], r["image_emb"].astype("float32")))
        kept, rejected_sem = kept | "DedupSemantic" >> DedupSemantic(cfg.dedup, vectors)
        rejections.append(rejected_sem)
    _ = kept | "WriteCurated" >> WriteCuratedStore(curated, cfg.curated.samples_per_shard)
    shards = max(1, len(storage.list_files(ctx.path(PREPARED), "images-*.tar")))
    _ = (scored.embeddings | "KeptEmbeddings" >> KeptEmbeddings(kept)
         | "WriteEmbeddings" >> WriteEmbeddings(curated, num_shards=shards))
    _write_ledger(kept, rejections, ctx.out, stage="curated", earlier=earlier)


def _copy_prepared(ctx: RunContext) -> None:
    """Without alignment the prepared store is final: copy its files (byte for byte)."""
    for pattern in ("images-*.tar", "metadata-*.parquet", "index.json"):
        for url in storage.list_files(ctx.path(PREPARED), pattern):
            _copy(url, storage.join(ctx.path("curated"), url.rsplit("/", 1)[-1]))
    for url in storage.list_files(ctx.path(PREPARED, "ledger"), "ledger-*.parquet"):
        _copy(url, storage.join(ctx.path("ledger"), url.rsplit("/", 1)[-1]))


def step_align(ctx: RunContext):
    if not ctx.cfg.align.enabled:
        _copy_prepared(ctx)
        index = storage.read_json(ctx.path("curated", "index.json"))
        return {}, {"samples": index["samples"], "shards": len(index["shards"]), "clip_weights": None}
    samples = storage.read_json(ctx.path(PREPARED, "index.json"))["samples"]
    with ctx.beam_step("align", samples, "images") as progress:
        counters = run_beam(lambda p: build_align_graph(p, ctx, progress), ctx.options)
    storage.remove_tree(ctx.path(STAGING))
    index = storage.read_json(ctx.path("curated", "index.json"))
    return counters, {"samples": index["samples"], "shards": len(index["shards"]),
                      "clip_weights": clip_config(ctx).weights}


# ----------------------------------------------------------------------------- phase: models


def _copy(src: str, dst: str) -> None:
    import fsspec

    with fsspec.open(src, "rb") as handle:
        storage.write_bytes(dst, handle.read())


def step_vq(ctx: RunContext):
    """D: train the VQ image tokenizer on the curated store (or take the configured one)."""
    vq = ctx.cfg.vq
    out = ctx.path("models", "vq")
    if vq.weights:
        _copy(vq.weights, storage.join(out, "vq.safetensors"))
        _copy(vq.weights.rsplit(".", 1)[0] + ".json", storage.join(out, "vq.json"))
        return {}, {"trained": False, "weights": vq.weights}
    from tokenizer.vq.config import get_config
    from tokenizer.vq.train import train_vq

    shards = storage.list_files(ctx.path("curated"), "images-*.tar")
    if not shards:
        raise NothingToDo("no curated images to train the VQ tokenizer on: every row was rejected (see OUT/ledger/)")
    result = train_vq(get_config(vq.model), vq.train, shards, out)
    evaluation = storage.read_json(storage.join(out, "vq-eval.json")) if storage.exists(storage.join(out, "vq-eval.json")) else {}
    info = {"trained": True, "model": vq.model}
    info.update({k: v for k, v in evaluation.items() if isinstance(v, (int, float, str, bool))})
    if evaluation.get("resolution"):  # [h, w] of the held-out images: the curated resolution
        info["resolution_px"] = int(evaluation["resolution"][0])
    info.update({k: v for k, v in result.items() if isinstance(v, (int, float, str, bool)) and k not in info})
    return {}, info


def step_text(ctx: RunContext):
    """D: byte-level BPE on the curated captions, then the joint vocabulary (vocab.json)."""
    from tokenizer.text import captions_from_shards, train_bpe
    from tokenizer.vocab import write_vocab

    text = ctx.cfg.text
    models = ctx.path("models")
    target = storage.join(models, "text-bpe.json")
    if text.tokenizer:
        _copy(text.tokenizer, target)
    else:
        shards = storage.list_files(ctx.path("curated"), "images-*.tar")
        train_bpe(captions_from_shards(shards), text.vocab_size, target,
                  num_mask_sentinels=text.num_mask_sentinels, min_frequency=text.min_frequency)
    vocab = write_vocab(models, text_vocab_size=text.vocab_size, vq_name="vq/vq.json")
    return {}, {"text_ids": vocab.text_size, "bpe_tokens": vocab.bpe_size, "image_offset": vocab.image_offset,
                "vocab_size": vocab.size, "dtype": vocab.dtype.name}


def step_encode(ctx: RunContext):
    """Apply the VQ tokenizer to every curated image (Beam); failures become ledger rejections."""
    from pipeline.stages.encode import encode_curated_store

    vq = ctx.cfg.vq
    samples = storage.read_json(ctx.path("curated", "index.json"))["samples"]
    with ctx.beam_step("encode", samples, "images") as progress:
        result = encode_curated_store(ctx.path("curated"), ctx.path("models", "vq", "vq.safetensors"), ctx.path("codes"),
                                      ctx.options, batch_size=vq.encode_batch_size, device=vq.device, progress=progress)
    counters = {f"encode/{k}": int(v) for k, v in result["counters"].items()}
    failed = _encode_failures(ctx.path("codes", "encode-rejected.jsonl"))
    if failed:
        ledger.update_statuses(ctx.out, "encode", reject={k: ("ERROR", v) for k, v in failed.items()})
    return counters, {"files": len(result["files"]), "rejected": len(failed)}


def _jsonl_rows(url: str) -> list[dict[str, Any]]:
    """The rows of a step's JSONL work file (rejections it hands to the ledger); none if absent."""
    if not storage.exists(url):
        return []
    import fsspec

    with fsspec.open(url, "rt") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def _encode_failures(url: str) -> dict[str, str]:
    return {row["key"]: f"{row['stage']}: {row['detail']}" for row in _jsonl_rows(url)}


# ----------------------------------------------------------------------------- step: index


def build_neighbours_graph(p: beam.Pipeline, ctx: RunContext, progress: Progress | None = None) -> None:
    from pipeline.stages.index import ComputeNeighbours, NeighboursConfig, ReadEmbeddingRows, WriteNeighbours

    cfg = NeighboursConfig(index_dir=ctx.path("index"), rules=ctx.cfg.neighbours, clip=clip_config(ctx))
    pattern = storage.join(ctx.path("curated"), "embeddings-*.parquet")
    _ = (counted(p | "ReadEmbeddings" >> ReadEmbeddingRows(pattern), progress)
         | "ComputeNeighbours" >> ComputeNeighbours(cfg)
         | "WriteNeighbours" >> WriteNeighbours(ctx.path("index")))


def step_index(ctx: RunContext):
    from pipeline.retrieval import build_index_from_embeddings

    urls = storage.list_files(ctx.path("curated"), "embeddings-*.parquet")
    if not urls:
        raise NothingToDo("no embeddings to index: the curated store is empty (see OUT/ledger/)")
    info = build_index_from_embeddings(urls, ctx.path("index"), ctx.cfg.index)
    samples = storage.read_json(ctx.path("curated", "index.json"))["samples"]
    with ctx.beam_step("index", samples, "documents") as progress:
        counters = run_beam(lambda p: build_neighbours_graph(p, ctx, progress), ctx.options)
    return counters, {k: v for k, v in info.items() if isinstance(v, (int, float, str, bool))}


# ----------------------------------------------------------------------------- step: tokens

TOO_LONG = "_work/tokens-too-long.jsonl"


DOCUMENT_COLUMNS = ["key", "asset_id", "captions", "license_id", "licensor"]


def _read_documents(p: beam.Pipeline, ctx: RunContext, columns: Sequence[str] = DOCUMENT_COLUMNS) -> dict[str, Any]:
    """The two inputs every shard set joins by document key: curated metadata rows (`columns`)
    and (key, codes) pairs."""
    from pipeline.stages.tokens import read_codes

    return {
        "meta": p | "ReadMetadata" >> beam.io.ReadFromParquet(
            storage.join(ctx.path("curated"), "metadata-*.parquet"), columns=list(columns)),
        "codes": p | "CodeFiles" >> beam.Create(storage.list_files(ctx.path("codes"), "codes-*.parquet"))
        | "ReadCodes" >> beam.FlatMap(read_codes),
    }


def _shard_set_start(ctx: RunContext, folder: str) -> tuple[str, dict[str, Any]]:
    """Copy the vocabulary into a shard set's folder (the set carries the ids' meaning); returns
    the token dtype and the index fields every shard set records."""
    from tokenizer import token_shards
    from tokenizer.vocab import JointVocab

    models = ctx.path("models")
    for name in ("vocab.json", "text-bpe.json"):
        _copy(storage.join(models, name), storage.join(folder, name))
    vocab = JointVocab.load(storage.join(folder, "vocab.json"), with_text=False)
    extra = {
        "config_hash": ctx.config_hash,
        "vocab_size": vocab.size,
        "vocab_sha256": storage.file_sha256(storage.join(models, "vocab.json")),
        "bpe_sha256": storage.file_sha256(storage.join(models, "text-bpe.json")),
        "vq_sha256": storage.file_sha256(storage.join(models, "vq", "vq.safetensors")),
    }
    return token_shards.shard_dtype(vocab.size).name, extra


def build_tokens_graph(p: beam.Pipeline, ctx: RunContext, num_shards: int, dtype: str, extra: dict[str, Any],
                       progress: Progress | None = None) -> None:
    from pipeline.stages.tokens import WriteTokenShards

    inputs = _read_documents(p, ctx)
    inputs["neighbours"] = p | "ReadNeighbours" >> beam.io.ReadFromParquet(
        storage.join(ctx.path("index"), "neighbours-*.parquet"))
    _ = inputs | "WriteTokenShards" >> WriteTokenShards(
        ctx.cfg.tokens, ctx.path("tokens", "vocab.json"), ctx.path("tokens"), ctx.path(TOO_LONG), ctx.cfg.seed,
        num_shards, dtype, extra, progress)


def step_tokens(ctx: RunContext):
    """F: CM3 sequences -> `tokens/` (docs/shards.md); documents too long for the budget are
    rejected in the ledger (stage tokens, SEQUENCE_TOO_LONG)."""
    import math

    cfg = ctx.cfg.tokens
    tokens = ctx.path("tokens")
    dtype, extra = _shard_set_start(ctx, tokens)
    restored = ledger.update_statuses(ctx.out, "tokens", restore=True)
    curated = storage.read_json(ctx.path("curated", "index.json"))["samples"]
    num_shards = max(1, math.ceil(curated / cfg.sequences_per_shard))
    extra.update({
        "layout": "[bos] neighbour_1 <break> ... neighbour_k <break> main [eos]",
        "k": cfg.k, "max_tokens": cfg.max_tokens, "order": cfg.order, "seed": ctx.cfg.seed,
    })
    with ctx.beam_step("tokens", curated, "documents") as progress:
        counters = run_beam(lambda p: build_tokens_graph(p, ctx, num_shards, dtype, extra, progress), ctx.options)
    too_long = {row["key"]: ("SEQUENCE_TOO_LONG", row["detail"]) for row in _jsonl_rows(ctx.path(TOO_LONG))}
    ledger.update_statuses(ctx.out, "tokens", reject=too_long)
    storage.remove_tree(ctx.path(TOO_LONG))
    index = storage.read_json(storage.join(tokens, "index.json"))
    kept = sum(1 for status in ledger.read_ledger(ctx.out).column("status").to_pylist() if status == "kept")
    if index["sequences"] != kept:  # every kept asset is the main document of exactly one sequence
        raise RuntimeError(f"tokens: {index['sequences']} sequences for {kept} kept assets in the ledger")
    return counters, {"shards": len(index["shards"]), "sequences": index["sequences"], "tokens": index["tokens"],
                      "too_long": len(too_long), "restored": restored, "dtype": index["dtype"],
                      "sequences_with_neighbours": index["sequences_with_neighbours"]}


# ----------------------------------------------------------------------------- step: sft


def build_sft_graph(p: beam.Pipeline, ctx: RunContext, num_shards: int, dtype: str, extra: dict[str, Any]) -> None:
    from pipeline.stages.tokens import WriteSftShards

    inputs = _read_documents(p, ctx, DOCUMENT_COLUMNS + ["source_width", "source_height", "extra_json"])
    inputs["ledger"] = p | "ReadLedger" >> beam.io.ReadFromParquet(
        storage.join(ctx.path("ledger"), "ledger-*.parquet"), columns=["key", "status"])
    _ = inputs | "WriteSftShards" >> WriteSftShards(
        ctx.cfg.sft, ctx.path("sft", "vocab.json"), ctx.path("sft"), ctx.cfg.seed, num_shards, dtype,
        ctx.cfg.decode.resolution, extra)


def step_sft(ctx: RunContext):
    """CM3leon-style SFT examples over the kept documents -> `sft/` (docs/shards.md#sft-shard-set).
    An example over `sft.max_tokens` is skipped and counted; the ledger is not touched, since
    the asset stays in the pretraining set."""
    import math

    from tokenizer import sft as sft_format

    cfg = ctx.cfg.sft
    folder = ctx.path("sft")
    dtype, extra = _shard_set_start(ctx, folder)
    curated = storage.read_json(ctx.path("curated", "index.json"))["samples"]
    num_shards = max(1, math.ceil(curated * len(cfg.tasks) / cfg.sequences_per_shard))
    extra.update({
        "layout": sft_format.LAYOUT, "tasks": list(cfg.tasks), "templates": cfg.templates,
        "task_weights": dict(cfg.task_weights), "max_upsample": cfg.max_upsample,
        "min_downsample": cfg.min_downsample, "max_tokens": cfg.max_tokens, "resolution": ctx.cfg.decode.resolution,
        "seed": ctx.cfg.seed,
    })
    counters = run_beam(lambda p: build_sft_graph(p, ctx, num_shards, dtype, extra), ctx.options)
    index = storage.read_json(storage.join(folder, "index.json"))
    return counters, {"shards": len(index["shards"]), "sequences": index["sequences"], "tokens": index["tokens"],
                      "sequences_per_task": index["sequences_per_task"], "task_factors": index["task_factors"],
                      "skipped_too_long": sum(index["skipped_too_long"].values())}


MANIFESTS = "@manifests"  # in Step.reads: the manifests and the license policy

STEPS: tuple[Step, ...] = (
    Step("prepare", "curated", ("validate", "fetch", "decode", "curated", "dedup"), (PREPARED, STAGING, SLICES, DECISIONS),
         step_prepare, reads=(MANIFESTS,)),
    Step("clip", "curated", ("align", "clip_train"), ("models/clip",), step_clip, reads=(PREPARED,)),
    Step("align", "curated", ("align", "dedup", "curated"), ("curated", "ledger", STAGING), step_align,
         reads=(PREPARED, DECISIONS, "models/clip")),
    Step("vq", "models", ("vq",), ("models/vq",), step_vq, reads=("curated",)),
    Step("text", "models", ("text",), ("models/text-bpe.json", "models/vocab.json"), step_text, reads=("curated",)),
    Step("encode", "models", ("vq",), ("codes",), step_encode, reads=("curated", "models/vq")),
    Step("index", "index", ("index", "neighbours"), ("index",), step_index, reads=("curated",)),
    Step("tokens", "tokens", ("tokens",), ("tokens", TOO_LONG), step_tokens,
         reads=("curated", "codes", "index", "models/text-bpe.json", "models/vocab.json")),
    Step("sft", "tokens", ("sft",), ("sft",), step_sft, gate="sft",
         reads=("curated", "codes", "models/text-bpe.json", "models/vocab.json")),
)


# ----------------------------------------------------------------------------- run


def _state_url(out: str, step: str) -> str:
    return storage.join(out, "_state", f"{step}.json")


def _step_done(out: str, step: str, config_hash: str) -> dict[str, Any] | None:
    url = _state_url(out, step)
    if not storage.exists(url):
        return None
    state = storage.read_json(url)
    return state if state.get("config_hash") == config_hash else None


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _policy(url: str) -> LicensePolicy:
    """The policy, or one line naming the file and the problem."""
    import yaml

    from manifests.policy import PolicyError

    if not storage.exists(url):
        raise ConfigError(f"policy {url}: not found")
    try:
        return load_policy(url)
    except (PolicyError, ConfigError) as exc:
        raise ConfigError(f"policy {url}: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"policy {url}: {describe_yaml_error(exc)}") from None
    except (OSError, UnicodeDecodeError, TypeError, ValueError) as exc:
        raise ConfigError(f"policy {url}: {type(exc).__name__}: {exc}") from None


def _check_manifests(manifests: Sequence[str]) -> int:
    """Each manifest exists, has a known format, is listed once (a repeat would put every row in
    the ledger twice) and reads to its end (a truncated .gz or a corrupt Parquet file is one
    line here, not a traceback mid-run); returns the number of rows, for the ledger invariant."""
    from pipeline.stages.ingest import manifest_format

    seen: dict[str, str] = {}
    for url in manifests:
        same = os.path.realpath(url) if "://" not in url else url.rstrip("/")
        if same in seen:
            raise ConfigError(f"manifest {url} is listed twice (as {seen[same]}): list each manifest once")
        seen[same] = url
        try:
            manifest_format(url)
        except ValueError as exc:
            raise ConfigError(f"manifest {exc}") from None
        if not storage.exists(url):
            raise ConfigError(f"manifest {url}: not found")
    total = 0
    for url in manifests:
        try:
            total += count_manifest_rows(url)
        except Exception as exc:  # noqa: BLE001 - any reader error: the file is unreadable as a whole
            message = str(exc).splitlines()[0] if str(exc) else ""
            raise ConfigError(f"manifest {url}: cannot be read to its end ({type(exc).__name__}: {message[:200]})") \
                from None
    return total


def run(cfg: RunConfig, until: str = PHASES[-1], beam_flags: Sequence[str] = (), progress: bool = False,
        logs_to_file: bool = False, force: bool = False) -> RunReport:
    """Run the steps of every phase up to `until`, skipping those already complete. With
    `progress`, each Beam step draws a live bar (rows done / total, rate, ETA) on stderr; with
    `logs_to_file`, Beam's logs go to OUT/_logs/<step>.log (the CLI does both, unless -v).

    The output folder must be empty, new or a run folder of ours (`force`: a foreign folder
    whose files do not collide with ours), and is locked for the run (pipeline/rundir.py)."""
    if not cfg.manifests:
        raise ConfigError("no manifests: pass --manifest URL or set `manifests` in the config")
    if not cfg.policy:
        raise ConfigError("no license policy: pass --policy FILE or set `policy` in the config")
    if until not in PHASES:
        raise ConfigError(f"--until must be one of {PHASES}, got {until!r}")
    if PHASES.index(until) >= PHASES.index("index") and not cfg.align.enabled:
        raise ConfigError("the retrieval index needs CLIP embeddings: set align.enabled or run --until curated")
    if cfg.tokens.k > cfg.neighbours.k:
        raise ConfigError(f"tokens.k is {cfg.tokens.k} but the neighbour table holds neighbours.k = "
                          f"{cfg.neighbours.k} per document: raise neighbours.k or lower tokens.k")
    for what, url in [*(("manifest", m) for m in cfg.manifests), ("policy", cfg.policy), ("out", cfg.out)]:
        why = missing_backend(url_scheme(url))
        if why:  # before any row is read, not a failure per row
            raise ConfigError(f"{what} {url}: {why}")
    rows_in = _check_manifests(cfg.manifests)
    policy = _policy(cfg.policy)
    rundir.claim(cfg.out, force)
    with rundir.RunLock(cfg.out):
        events = Lineage(cfg.out)
        with events.job("run", inputs=[*cfg.manifests, cfg.policy], outputs=[cfg.out]):
            return _run_steps(cfg, policy, until, beam_flags, progress, logs_to_file, rows_in, events)


def _run_steps(cfg: RunConfig, policy: LicensePolicy, until: str, beam_flags: Sequence[str], progress: bool,
               logs_to_file: bool, rows_in: int, events: Lineage) -> RunReport:
    digests = {url: storage.file_sha256(url) for url in cfg.manifests}
    ctx = RunContext(cfg, policy, beam_options(cfg, beam_flags), show_progress=progress, logs_to_file=logs_to_file,
                     rows_in=rows_in)
    results: list[StepResult] = []
    counters: dict[str, int] = {}
    chain = _digest({"policy": policy.to_json(), "manifests": digests, "seed": cfg.seed})
    data = cfg.to_json()
    last = PHASES.index(until)
    upstream_ran = False

    for step in STEPS:
        if PHASES.index(step.phase) > last:
            break
        if step.gate and not getattr(cfg, step.gate).enabled:
            continue  # not run, not recorded, its folder (if any, from an earlier run) left alone
        chain = _digest({"previous": chain, "step": step.name, **{s: data[s] for s in step.sections}})
        started = time.monotonic()
        state = None if upstream_ran else _step_done(cfg.out, step.name, chain)
        if state is not None:
            log.info("step %s: already complete (config %s), skipping", step.name, chain)
            counters.update(state.get("counters", {}))
            results.append(StepResult(step.name, step.phase, True, 0.0, state.get("info", {})))
            continue
        log.info("step %s: running (config %s)", step.name, chain)
        storage.remove_tree(_state_url(cfg.out, step.name))
        for name in step.outputs:
            storage.remove_tree(ctx.path(name))
        upstream_ran = True  # a rerun step's outputs are rewritten: everything after it reruns too
        reads = [u for r in step.reads for u in ([*cfg.manifests, cfg.policy] if r == MANIFESTS else [ctx.path(r)])]
        with events.job(step.name, inputs=reads, outputs=[ctx.path(o) for o in step.outputs]):
            step_counters, info = step.action(dataclasses.replace(ctx, config_hash=chain))
        counters.update(step_counters)
        seconds = time.monotonic() - started
        storage.write_json(_state_url(cfg.out, step.name), {
            "step": step.name, "phase": step.phase, "config_hash": chain, "seconds": round(seconds, 3),
            "finished_at": dt.datetime.now(dt.timezone.utc).isoformat(), "counters": step_counters, "info": info,
        })
        results.append(StepResult(step.name, step.phase, False, seconds, info))

    summary = ledger.check_invariant(cfg.out, rows_in)
    storage.write_json(storage.join(cfg.out, "run.json"), {
        "config": cfg.to_json(),
        "policy": policy.to_json(),
        "manifests": digests,
        "packages": package_versions(),
        "steps": [dataclasses.asdict(r) | {"seconds": round(r.seconds, 3)} for r in results],
        "counters": counters,
        "ledger": summary.to_json(),
    })
    write_attribution(cfg.out, policy.attribution_required)
    write_report(cfg.out)
    write_card(cfg.out, cfg, policy, summary.to_json())  # last: it lists every output file with its sha256
    return RunReport(cfg.out, results, summary, counters)
