"""The `index` phase: the FAISS index over the curated documents' embeddings and the
neighbour table every token sequence draws its retrieved documents from."""

from __future__ import annotations

import apache_beam as beam

from pipeline import ledger, storage
from pipeline.progress import Progress, counted
from pipeline.runner import run_beam
from pipeline.stages.base import Stage
from pipeline.steps.context import NEIGHBOUR_ERRORS, NothingToDo, RunContext, clip_config


def build_neighbours_graph(p: beam.Pipeline, ctx: RunContext, progress: Progress | None = None) -> None:
    from pipeline.stages.index import ComputeNeighbours, NeighboursConfig, ReadEmbeddingRows, WriteNeighbours

    cfg = NeighboursConfig(index_dir=ctx.path("index"), rules=ctx.cfg.neighbours, clip=clip_config(ctx))
    pattern = storage.join(ctx.path("curated"), "embeddings-*.parquet")
    neighbours, errors = (counted(p | "ReadEmbeddings" >> ReadEmbeddingRows(pattern), progress)
                          | "ComputeNeighbours" >> ComputeNeighbours(cfg))
    _ = neighbours | "WriteNeighbours" >> WriteNeighbours(ctx.path("index"))
    _ = errors | "WriteErrors" >> ledger.WriteChanges(ctx.path(NEIGHBOUR_ERRORS))


def step_index(ctx: RunContext):
    from pipeline.retrieval import build_index_from_embeddings

    urls = storage.list_files(ctx.path("curated"), "embeddings-*.parquet")
    if not urls:
        raise NothingToDo("no embeddings to index: the curated store is empty (see OUT/ledger/)")
    info = build_index_from_embeddings(urls, ctx.path("index"), ctx.cfg.index)
    samples = storage.read_json(ctx.path("curated", "index.json"))["samples"]
    ledger.update_statuses(ctx.out, Stage.NEIGHBOURS, restore=True)  # a rerun decides afresh
    storage.remove_tree(ctx.path(NEIGHBOUR_ERRORS))
    with ctx.beam_step("index", samples, "documents") as progress:
        counters = run_beam(lambda p: build_neighbours_graph(p, ctx, progress), ctx.options)
    errors = ledger.apply_changes(ctx.out, Stage.NEIGHBOURS, ctx.path(NEIGHBOUR_ERRORS), as_notes=True)
    info = {k: v for k, v in info.items() if isinstance(v, (int, float, str, bool))}
    return counters, {**info, "documents_without_neighbours_by_error": len(errors)} if errors else info
