"""The `tokens` phase: tokens (CM3 sequences with retrieved neighbours -> Megatron shards
and provenance; documents too long for the budget are rejected in the ledger) and sft
(CM3leon-style task examples, a shard set of its own, only with sft.enabled)."""

from __future__ import annotations

import math
from typing import Any, Sequence

import apache_beam as beam

from pipeline import ledger, storage
from pipeline.progress import Progress
from pipeline.runner import run_beam
from pipeline.stages.base import Stage
from pipeline.steps.context import TOO_LONG, RunContext, copy_file


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
        copy_file(storage.join(models, name), storage.join(folder, name))
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
    too_long = ledger.apply_changes(ctx.out, Stage.TOKENS, ctx.path(TOO_LONG))
    index = storage.read_json(storage.join(tokens, "index.json"))
    kept = sum(1 for status in ledger.read_ledger(ctx.out).column("status").to_pylist() if status == "kept")
    if index["sequences"] != kept:  # every kept asset is the main document of exactly one sequence
        raise RuntimeError(f"tokens: {index['sequences']} sequences for {kept} kept assets in the ledger")
    return counters, {"shards": len(index["shards"]), "sequences": index["sequences"], "tokens": index["tokens"],
                      "too_long": len(too_long), "restored": restored, "dtype": index["dtype"],
                      "sequences_with_neighbours": index["sequences_with_neighbours"]}


# ----------------------------------------------------------------------------- step: sft


def build_sft_graph(p: beam.Pipeline, ctx: RunContext, num_shards: int, dtype: str, extra: dict[str, Any]) -> None:
    from pipeline.stages.sft import WriteSftShards

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
