"""Phase F's retrieval step: neighbours for every curated document, by CM3leon's rules.

The FAISS index (built by `pipeline.retrieval.build_index`) is loaded once per worker
process; when the query includes text, captions are re-encoded with 20 % of their tokens
dropped (CM3leon's query dropout), so the CLIP text tower is loaded once per worker too.
Output: `OUT/index/neighbours-NNNNNN.parquet` with key → neighbour_keys + scores.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Iterable

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics
from apache_beam.utils import shared

from pipeline.config import ClipConfig
from pipeline.clip import ClipEmbedder, document_embedding, normalise
from pipeline.records import RejectReason
from pipeline.stages.base import Stage
from pipeline.stages.store import WriteKeyedParquet
from pipeline.retrieval import (
    LoadedIndex,
    NeighbourConfig,
    drop_query_tokens,
    key_seed,
    load_index,
    select_neighbours,
)

log = logging.getLogger(__name__)

STAGE = Stage.NEIGHBOURS


@dataclass(frozen=True)
class NeighboursConfig:
    """Where the index is, the neighbour rules, and the CLIP for text-query dropout (needed
    only when the query has text and `query_token_dropout` > 0)."""

    index_dir: str
    rules: NeighbourConfig = field(default_factory=NeighbourConfig)
    clip: ClipConfig | None = None
    batch_size: int = 256

    def __post_init__(self) -> None:
        if not self.index_dir:
            raise ValueError("NeighboursConfig.index_dir is required")
        uses_text = self.rules.query in ("document", "text") and self.rules.query_token_dropout > 0
        if uses_text and self.clip is None:
            raise ValueError("query dropout on text needs NeighboursConfig.clip (the CLIP that made the embeddings)")


class _Loaded:
    """Weak-referenceable per-process holder of the index and (optionally) the CLIP."""

    def __init__(self, cfg: NeighboursConfig):
        self.index: LoadedIndex = load_index(cfg.index_dir)
        uses_text = cfg.rules.query in ("document", "text") and cfg.rules.query_token_dropout > 0
        self.embedder = ClipEmbedder(cfg.clip) if uses_text else None


def query_vectors(rows: list[dict[str, Any]], rules: NeighbourConfig, embedder: ClipEmbedder | None) -> np.ndarray:
    """The query embedding of each document: image, text-with-dropout, or their CM3leon
    document mean. Without dropout the stored embeddings are used as they are."""
    def vec(row: dict[str, Any], name: str) -> np.ndarray | None:
        v = row.get(name)
        return None if v is None else normalise(np.asarray(v, np.float32)[None])[0]

    texts: list[np.ndarray | None] = [vec(r, "text_emb") for r in rows]
    if embedder is not None and rules.query != "image":
        flat, owner, seeds = [], [], []
        for i, r in enumerate(rows):
            for j, caption in enumerate(r.get("captions") or []):
                flat.append(caption)
                owner.append(i)
                seeds.append(key_seed(rules.seed, f"{r['key']}/{j}"))
        if flat:
            tokens = drop_query_tokens(embedder.tokenizer(flat), rules.query_token_dropout, seeds)
            embs = embedder.embed_tokens(tokens)
            owner_arr = np.asarray(owner)
            for i in set(owner):
                texts[i] = normalise(embs[owner_arr == i].mean(axis=0, keepdims=True))[0]
    out = []
    for r, text in zip(rows, texts):
        image = vec(r, "image_emb")
        if rules.query == "image":
            out.append(image)
        elif rules.query == "text":
            out.append(text if text is not None else image)
        else:
            out.append(document_embedding(image, text))
    return np.stack(out).astype(np.float32)


ERRORS = "errors"  # tagged output of ComputeNeighbours: {key, reason, detail} for the ledger


class _NeighboursBatch(beam.DoFn):
    """A batch of documents -> their neighbour rows. A batch that fails is retried one
    document at a time; a document that fails alone keeps an empty neighbour list (it still
    trains, as a document without retrieved context) and its error goes to the ERRORS output,
    which the index step writes into the ledger (a note on the kept row)."""

    def __init__(self, cfg: NeighboursConfig):
        super().__init__()
        self.cfg = cfg
        self._shared = shared.Shared()

    def setup(self) -> None:
        self.loaded = self._shared.acquire(lambda: _Loaded(self.cfg), tag=f"index:{self.cfg.index_dir}")
        self.seen = Metrics.counter(STAGE, "in")
        self.short = Metrics.counter(STAGE, "fewer_than_k")
        self.errors = Metrics.counter(STAGE, "error")

    def _select(self, rows: list[dict[str, Any]]) -> list[list[tuple[str, float]]]:
        queries = query_vectors(rows, self.cfg.rules, self.loaded.embedder)
        return select_neighbours(self.loaded.index, queries, [r["key"] for r in rows],
                                 [r.get("cluster_id") for r in rows], self.cfg.rules)

    def process(self, rows: list[dict[str, Any]]) -> Iterable[Any]:
        self.seen.inc(len(rows))
        try:
            picked = self._select(rows)
        except Exception as exc:  # noqa: BLE001 - retried one document at a time below
            log.warning("%s: batch of %d failed (%s); retrying one document at a time", STAGE, len(rows), exc)
            picked = []
            for row in rows:
                try:
                    picked.extend(self._select([row]))
                except Exception as one:  # noqa: BLE001 - a document without neighbours still trains
                    self.errors.inc()
                    picked.append([])
                    yield beam.pvalue.TaggedOutput(ERRORS, {
                        "key": row["key"], "reason": RejectReason.ERROR.value,
                        "detail": f"no retrieved neighbours: {type(one).__name__}: {one}"[:1000]})
        for row, neighbours in zip(rows, picked):
            if len(neighbours) < self.cfg.rules.k:
                self.short.inc()
            yield {"key": row["key"], "neighbour_keys": [k for k, _ in neighbours],
                   "scores": [s for _, s in neighbours]}


class ComputeNeighbours(beam.PTransform):
    """Embedding rows (as in `embeddings-*.parquet`) → (`{key, neighbour_keys, scores}` rows,
    `{key, reason, detail}` errors for the ledger)."""

    def __init__(self, cfg: NeighboursConfig, label: str | None = None):
        super().__init__(label)
        self.cfg = cfg

    def expand(self, rows: beam.PCollection):
        bs = self.cfg.batch_size
        out = (
            rows
            | "Batch" >> beam.BatchElements(min_batch_size=bs, max_batch_size=bs)
            | "Select" >> beam.ParDo(_NeighboursBatch(self.cfg)).with_outputs(ERRORS, main="neighbours")
        )
        return out.neighbours, out[ERRORS]


class ReadEmbeddingRows(beam.PTransform):
    """Read the curated store's `embeddings-*.parquet` as dict rows."""

    def __init__(self, file_pattern: str, label: str | None = None):
        super().__init__(label)
        self.file_pattern = file_pattern

    def expand(self, pbegin):
        return pbegin | "Read" >> beam.io.ReadFromParquet(self.file_pattern)


def neighbours_table(rows: list[dict[str, Any]]):
    """Rows → the neighbours Parquet table, sorted by key."""
    import pyarrow as pa

    rows = sorted(rows, key=lambda r: r["key"])
    return pa.table({
        "key": pa.array([r["key"] for r in rows], pa.string()),
        "neighbour_keys": pa.array([r["neighbour_keys"] for r in rows], pa.list_(pa.string())),
        "scores": pa.array([r["scores"] for r in rows], pa.list_(pa.float32())),
    })


def WriteNeighbours(out_dir: str, num_shards: int = 4, label: str | None = None):
    """Neighbour rows -> `out_dir/neighbours-NNNNNN.parquet` (stable shard per key, sorted)."""
    return WriteKeyedParquet(out_dir, "neighbours", neighbours_table, num_shards, label)
