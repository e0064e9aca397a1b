"""The `curated` phase: prepare (ingest, license gate, fetch, decode, exact and near dedup),
clip (train the licensed-lineage CLIP) and align (CLIP scores, the alignment filter,
semantic dedup, the curated store and the ledger)."""

from __future__ import annotations

import dataclasses
import logging

import apache_beam as beam

from pipeline import ledger, storage
from pipeline.progress import Progress, counted
from pipeline.runner import run_beam
from pipeline.stages.dedup import DedupSemantic, RegroupAfterAlignment
from pipeline.stages.ingest import read_chunks
from pipeline.stages.store import StageImages, WriteCuratedStore, write_index
from pipeline.steps.context import (CALIBRATION, DECISIONS, PREPARED, SLICES, STAGING, STANDBY, WORK, NothingToDo,
                                    RunContext, WorkerDied, clip_config, copy_file)
from pipeline.takedown import taken_down

log = logging.getLogger(__name__)


def build_prepare_graph(p: beam.Pipeline, ctx: RunContext, progress: Progress | None = None,
                        isolate: frozenset[str] = frozenset()) -> None:
    """A–B: manifests -> validated, licensed, fetched, decoded, deduplicated assets.

    Per-row work runs in chunks that never leave their worker; only compact records reach
    the global steps (see pipeline/stages/prepare.py), so memory does not grow with the
    delivery. Semantic dedup needs CLIP embeddings: it runs in the align step.
    """
    from pipeline.stages import decide, prepare

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
        | "Decide" >> beam.ParDo(decide.Decide(cfg.dedup, work, cfg.curated.samples_per_shard,
                                                taken_down(cfg.out))).with_outputs(
            decide.Decide.LEDGER, decide.Decide.STANDBY, main="shards")
    )
    for label, members, folder in (("", plan.shards, ctx.path(PREPARED)),
                                   ("Standby", plan[decide.Decide.STANDBY], ctx.path(STANDBY))):
        counter = "standby_written" if label else "samples_written"
        _ = (
            members
            | f"GroupBy{label}Shard" >> beam.GroupByKey()
            | f"Write{label}Shards" >> beam.ParDo(decide.WriteShardFromRecords(folder, counter))
            | f"Collect{label}Index" >> beam.combiners.ToList()
            | f"Write{label}Index" >> beam.Map(lambda shards, folder=folder: write_index(folder, shards))
        )
    prepared = ctx.path(PREPARED)
    _ = (
        plan[decide.Decide.LEDGER]
        | "SpreadLedger" >> beam.Reshuffle()
        | "WriteLedger" >> beam.ParDo(decide.WriteLedgerPart(work, prepared))
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
    info = {"trained": True, **{k: v for k, v in info.items() if isinstance(v, (int, float, str, bool))}}
    folds = fold_weights(ctx)
    for k, weights in enumerate(folds):  # out-of-fold scoring: model k never sees fold k's rows
        fold = train_clip(clip, ctx.cfg.clip_train, shards, weights.rsplit("/", 1)[0], holdout=(k, len(folds)))
        info[f"fold_{k}_final_loss"] = fold.get("final_loss")
    if folds:
        info["folds"] = len(folds)
    return {}, info


def fold_weights(ctx: RunContext) -> tuple[str, ...]:
    """The out-of-fold CLIPs the align step scores with: K of them when this run trains its own
    CLIP and filters by score (align.folds >= 2, mode not off); none otherwise (a CLIP the user
    brings never saw this data, so it scores every row itself)."""
    align = ctx.cfg.align
    if align.clip.weights or align.folds < 2 or align.mode == "off":
        return ()
    return tuple(ctx.path("models", "clip", f"fold-{k}-of-{align.folds}", "clip.safetensors")
                 for k in range(align.folds))


# ----------------------------------------------------------------------------- step: align


def _earlier_rejections(prepared_ledger_dir: str):
    """The prepare step's ledger rows that are already final (rejected)."""
    for url in storage.list_files(prepared_ledger_dir, "ledger-*.parquet"):
        for row in storage.read_table(url).cast(ledger.LEDGER_SCHEMA).to_pylist():
            if row["status"] == "rejected":
                yield row


def standby_rows(ctx: RunContext) -> dict[str, tuple[str, str, str]]:
    """asset_id -> (stage, reason, detail) of every duplicate on standby (its prepare-step row)."""
    store = ctx.path(STANDBY)
    ids = {a for url in storage.list_files(store, "metadata-*.parquet")
           for a in storage.read_table(url, ["asset_id"]).column("asset_id").to_pylist()}
    if not ids:
        return {}
    return {r["asset_id"]: (r["stage"], r["reason"], r["detail"]) for url in
            storage.list_files(ctx.path(PREPARED, "ledger"), "ledger-*.parquet")
            for r in storage.read_table(url, ["asset_id", "stage", "reason", "detail"]).to_pylist()
            if r["asset_id"] in ids}


def build_align_graph(p: beam.Pipeline, ctx: RunContext, progress: Progress | None = None) -> None:
    """C: score every prepared asset (and every duplicate on standby) with CLIP, filter,
    re-decide the duplicate groups, (semantic dedup), write the store and the ledger."""
    from pipeline.stages.align import FilterAlignment, KeptEmbeddings, ScoreAlignment, WriteEmbeddings, read_batches

    cfg = ctx.cfg
    standby = standby_rows(ctx)
    shard_urls = [u for store in (PREPARED, STANDBY) if store == PREPARED or standby
                  for u in storage.list_files(ctx.path(store), "images-*.tar")]
    batches = (p | "ShardUrls" >> beam.Create(shard_urls)
               | "ReadBatches" >> beam.FlatMap(read_batches, cfg.align.clip.batch_size))
    earlier = p | "PreparedLedger" >> beam.Create([ctx.path(PREPARED, "ledger")]) \
        | "EarlierRejections" >> beam.FlatMap(_earlier_rejections)
    curated = ctx.path("curated")
    align_cfg = dataclasses.replace(cfg.align, clip=clip_config(ctx))
    scored = counted(batches, progress, weight=len) | "ScoreAlignment" >> ScoreAlignment(align_cfg, fold_weights(ctx))
    staged = scored.kept | "StageImages" >> beam.ParDo(StageImages(ctx.path(STAGING)))
    filtered = staged | "FilterAlignment" >> FilterAlignment(align_cfg, scored.mismatched, ctx.path(CALIBRATION))
    kept = filtered.kept
    rejections = [scored.rejected, filtered.rejected]
    if standby:  # dedup and alignment agree: a group keeps a member that passed, if any did
        failed = tuple(rejections) | "Failed" >> beam.Flatten()
        kept, rejected, replaced = (kept, failed) | "Regroup" >> RegroupAfterAlignment(
            standby, cfg.dedup.license_preference)
        rejections = [rejected]
        earlier = (
            {"row": earlier | "KeyEarlier" >> beam.Map(lambda r: (r["asset_id"], r)),
             "replaced": replaced | "KeyReplaced" >> beam.Map(lambda a: (a, True))}
            | "JoinReplaced" >> beam.CoGroupByKey()
            | "KeepUnreplaced" >> beam.FlatMap(lambda kv: [] if list(kv[1]["replaced"]) else list(kv[1]["row"]))
        )
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
            copy_file(url, storage.join(ctx.path("curated"), url.rsplit("/", 1)[-1]))
    for url in storage.list_files(ctx.path(PREPARED, "ledger"), "ledger-*.parquet"):
        copy_file(url, storage.join(ctx.path("ledger"), url.rsplit("/", 1)[-1]))


def step_align(ctx: RunContext):
    if not ctx.cfg.align.enabled:
        _copy_prepared(ctx)
        index = storage.read_json(ctx.path("curated", "index.json"))
        return {}, {"samples": index["samples"], "shards": len(index["shards"]), "clip_weights": None}
    samples = sum(storage.read_json(storage.join(store, "index.json"))["samples"]
                  for store in (ctx.path(PREPARED), ctx.path(STANDBY)) if storage.exists(storage.join(store, "index.json")))
    with ctx.beam_step("align", samples, "images") as progress:
        counters = run_beam(lambda p: build_align_graph(p, ctx, progress), ctx.options)
    ledger.point_duplicates_at_kept(ctx.out)
    storage.remove_tree(ctx.path(STAGING))
    index = storage.read_json(ctx.path("curated", "index.json"))
    info = {"samples": index["samples"], "shards": len(index["shards"]), "clip_weights": clip_config(ctx).weights,
            "mode": ctx.cfg.align.mode, "scored_out_of_fold": len(fold_weights(ctx))}
    if storage.exists(ctx.path(CALIBRATION)):
        info["calibration"] = storage.read_json(ctx.path(CALIBRATION))
        storage.remove_tree(ctx.path(CALIBRATION))
    return counters, info
