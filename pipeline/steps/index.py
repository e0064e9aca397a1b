"""The `index` phase: the FAISS index over the curated documents' embeddings and the
neighbour table every token sequence draws its retrieved documents from."""

from __future__ import annotations

import apache_beam as beam

from pipeline import storage
from pipeline.progress import Progress, counted
from pipeline.runner import run_beam
from pipeline.steps.context import NothingToDo, RunContext, clip_config


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
