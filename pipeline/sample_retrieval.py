"""Retrieval for a sampling prompt (`curate sample --retrieve K`), as CM3leon does at inference:
embed the caption with the run's CLIP text tower, search the run's document index with the
run's neighbour rules, and hand the neighbours' documents (read from the run's token shards)
to `trainer.sample`. It lives on the pipeline side because it needs CLIP and FAISS, which the
trainer package does not depend on.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from pipeline import storage
from pipeline.config import ClipConfig
from pipeline.retrieval import NeighbourConfig, load_index, select_neighbours
from trainer.sample import Neighbour, neighbour_documents

log = logging.getLogger(__name__)


def _run_config(run_out: str) -> dict[str, Any]:
    url = storage.join(run_out, "run.json")
    return storage.read_json(url).get("config", {}) if storage.exists(url) else {}


def _known(cls: type, values: dict[str, Any]) -> dict[str, Any]:
    """The fields of `cls` in `values` (a run.json from another version may carry more)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in values.items() if k in names}


def run_clip_config(run_out: str, device: str = "cpu") -> ClipConfig:
    """The CLIP the run embedded its documents with: `align.clip` of run.json, its weights
    defaulting to the run's own `models/clip/clip.safetensors` (as the pipeline does)."""
    clip = ClipConfig(**_known(ClipConfig, _run_config(run_out).get("align", {}).get("clip", {})))
    weights = clip.weights or storage.join(run_out, "models", "clip", "clip.safetensors")
    if not storage.exists(weights):
        raise FileNotFoundError(f"no CLIP weights at {weights}: retrieval needs the run's CLIP")
    return dataclasses.replace(clip, weights=weights, device=device)


def retrieve_keys(run_out: str, caption: str, k: int, device: str = "cpu") -> list[tuple[str, float]]:
    """Up to `k` `(key, score)` neighbours of `caption` in `OUT/index`: the caption's normalised
    CLIP text embedding, maximum inner product, the run's `neighbours` rules (near copies above
    `max_score` and pairs above `max_pair_similarity` skipped, image+text documents first). No
    query-token dropout: that is a training-time augmentation."""
    from pipeline.clip import ClipEmbedder

    if k < 1:
        raise ValueError("k must be >= 1")
    rules = NeighbourConfig(**_known(NeighbourConfig, _run_config(run_out).get("neighbours", {})))
    rules = dataclasses.replace(rules, k=k, query="text")
    query = ClipEmbedder(run_clip_config(run_out, device)).embed_texts([caption])
    index = load_index(storage.join(run_out, "index"))
    if index.index.d != query.shape[1]:
        raise ValueError(f"the index holds {index.index.d}-d vectors, the run's CLIP gives {query.shape[1]}-d")
    return select_neighbours(index, query, keys=[""], cluster_ids=[None], cfg=rules)[0]


def retrieve_neighbours(run_out: str, caption: str, k: int, device: str = "cpu") -> list[Neighbour]:
    """The `k` best neighbours' documents for a caption prompt, best first. Twice `k` are
    retrieved so that a neighbour without a sequence in `OUT/tokens` (rejected as too long)
    is replaced by the next one instead of leaving the prompt short."""
    found = retrieve_keys(run_out, caption, 2 * k, device)
    docs = neighbour_documents(storage.join(run_out, "tokens"), [key for key, _ in found], [s for _, s in found])
    log.info("retrieved %d neighbours for the prompt: %s", min(k, len(docs)), [d.key for d in docs[:k]])
    return docs[:k]
