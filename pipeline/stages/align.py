"""Phase C: CLIP image/text embeddings, the alignment score, and the alignment filter.

`ScoreAlignment` embeds batches of assets with a CLIP loaded once per worker process
(shared between the DoFn instances of a process) and sets `clip_score`;
`FilterAlignment` drops assets whose score is too low (absolute threshold, or below the
run's global quantile for `top_fraction`); `WriteEmbeddings` stores the embeddings next to
the curated images as float16 Parquet (layout in docs/alignment.md).
"""

from __future__ import annotations

import logging
from typing import Any, Iterable, NamedTuple

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics
from apache_beam.transforms.stats import ApproximateQuantiles
from apache_beam.utils import shared

from pipeline import storage
from pipeline.config import AlignConfig, ClipConfig
from pipeline.clip import ClipEmbedder, caption_scores, document_embedding, reduce_scores, text_embedding
from pipeline.records import Asset, RejectReason
from pipeline.stages.base import REJECTED, Reject, Stage, StageCounters, StageDoFn, StageOutputs
from pipeline.stages.store import WriteKeyedParquet

log = logging.getLogger(__name__)

EMBEDDINGS = "embeddings"
SCORE_STAGE = Stage.CLIP
FILTER_STAGE = Stage.ALIGN


class _SharedEmbedder:
    """Weak-referenceable holder so `shared.Shared` can keep one model per process."""

    def __init__(self, cfg: ClipConfig):
        self.embedder = ClipEmbedder(cfg)


class _ScoreBatch(beam.DoFn):
    """Embed a batch of assets; per-asset failures become ERROR rejections, not batch loss."""

    def __init__(self, cfg: AlignConfig):
        super().__init__()
        self.cfg = cfg
        self._shared = shared.Shared()
        self.embedder: ClipEmbedder | None = None
        self.counters: StageCounters | None = None

    def setup(self) -> None:
        tag = f"clip:{self.cfg.clip.arch}:{self.cfg.clip.weights}:{self.cfg.clip.device}"
        self._holder = self._shared.acquire(lambda: _SharedEmbedder(self.cfg.clip), tag=tag)  # keeps it alive
        self.embedder = self._holder.embedder
        self.counters = StageCounters(SCORE_STAGE)
        self.score_dist = Metrics.distribution(SCORE_STAGE, "score_x1000")
        self.batch_sizes = Metrics.distribution(SCORE_STAGE, "batch_size")

    def _reject(self, asset: Asset, reason: RejectReason, detail: str):
        self.counters.rejected(reason)
        return beam.pvalue.TaggedOutput(REJECTED, asset.reject(SCORE_STAGE, reason, detail[:2000]))

    def process(self, batch: list[Asset]) -> Iterable:
        self.batch_sizes.update(len(batch))
        ready: list[tuple[Asset, Any]] = []
        for asset in batch:
            self.counters.seen.inc()
            try:
                ready.append((asset, self.embedder.prepare_image(asset.image_bytes())))
            except Exception as exc:  # noqa: BLE001 - contract: errors become ledger rows
                yield self._reject(asset, RejectReason.ERROR, f"{type(exc).__name__}: {exc}")
        if not ready:
            return
        try:
            image_embs = self.embedder.embed_pixels([px for _, px in ready])
            captions = [c for asset, _ in ready for c in asset.captions]
            caption_embs = self.embedder.embed_texts(captions)
        except Exception as exc:  # noqa: BLE001
            log.warning("%s: batch of %d failed: %s", SCORE_STAGE, len(ready), exc)
            for asset, _ in ready:
                yield self._reject(asset, RejectReason.ERROR, f"{type(exc).__name__}: {exc}")
            return
        offset = 0
        for (asset, _), image_emb in zip(ready, image_embs):
            embs = caption_embs[offset:offset + len(asset.captions)]
            offset += len(asset.captions)
            score = reduce_scores(caption_scores(image_emb, embs), self.cfg.reduce) if len(embs) else None
            text_emb = text_embedding(embs) if len(embs) else None
            doc_emb = document_embedding(image_emb, text_emb)
            if score is not None:
                self.score_dist.update(int(round(score * 1000)))
            self.counters.kept.inc()
            yield asset.replace(clip_score=score)
            yield beam.pvalue.TaggedOutput(EMBEDDINGS, {
                "key": storage.asset_key(asset.asset_id),
                "asset_id": asset.asset_id,
                "cluster_id": asset.cluster_id,
                "clip_score": score,
                "captions": list(asset.captions),
                "image_emb": image_emb.astype(np.float16),
                "text_emb": None if text_emb is None else text_emb.astype(np.float16),
                "doc_emb": doc_emb.astype(np.float16),
            })


class Scored(NamedTuple):
    """What `ScoreAlignment` returns: the stage outputs plus the embedding rows."""

    kept: Any
    rejected: Any
    embeddings: Any


class ScoreAlignment(beam.PTransform):
    """Assets → `Scored`: `kept` (clip_score set), `rejected` (ERROR only: scoring never
    judges, `FilterAlignment` does) and `embeddings` (dict rows, float16)."""

    def __init__(self, cfg: AlignConfig, label: str | None = None):
        super().__init__(label)
        self.cfg = cfg

    def expand(self, assets: beam.PCollection):
        bs = self.cfg.clip.batch_size
        out = (
            assets
            | "Batch" >> beam.BatchElements(min_batch_size=bs, max_batch_size=bs)
            | "Embed" >> beam.ParDo(_ScoreBatch(self.cfg)).with_outputs(REJECTED, EMBEDDINGS, main="kept")
        )
        return Scored(out.kept, out[REJECTED], out[EMBEDDINGS])


class _FilterDoFn(StageDoFn):
    stage = FILTER_STAGE

    def __init__(self, cfg: AlignConfig):
        super().__init__()
        self.cfg = cfg
        self._cutoff: float | None = None

    def process(self, asset: Asset, cutoff: float | None = None) -> Iterable:
        self._cutoff = cutoff if self.cfg.mode == "top_fraction" else self.cfg.threshold
        yield from super().process(asset)

    def handle(self, asset: Asset) -> Asset:
        if self.cfg.mode == "off" or asset.clip_score is None or self._cutoff is None:
            return asset  # unscored (no caption) assets cannot be judged: kept, score null
        if asset.clip_score < self._cutoff:
            what = "threshold" if self.cfg.mode == "threshold" else f"run quantile (keep {self.cfg.keep_fraction:g})"
            raise Reject(RejectReason.LOW_ALIGNMENT,
                         f"clip_score {asset.clip_score:.4f} < {self._cutoff:.4f} {what}")
        return asset


def _cutoff_from_quantiles(quantiles: list[float], cfg: AlignConfig) -> float | None:
    if not quantiles:
        return None
    idx = int(round((1.0 - cfg.keep_fraction) * (len(quantiles) - 1)))
    return float(quantiles[idx])


class FilterAlignment(beam.PTransform):
    """Scored assets → `kept` and `rejected` (LOW_ALIGNMENT, detail holds score and cut).

    `top_fraction` computes the run's score quantile with a global combine and applies it
    as a side input, so the cut is the same on every worker."""

    def __init__(self, cfg: AlignConfig, label: str | None = None):
        super().__init__(label)
        self.cfg = cfg

    def expand(self, assets: beam.PCollection):
        dofn = _FilterDoFn(self.cfg)
        if self.cfg.mode != "top_fraction":
            out = assets | "Filter" >> beam.ParDo(dofn).with_outputs(REJECTED, main="kept")
            return StageOutputs(out.kept, out[REJECTED])
        cutoff = (
            assets
            | "Scores" >> beam.FlatMap(lambda a: [a.clip_score] if a.clip_score is not None else [])
            | "Quantiles" >> ApproximateQuantiles.Globally(self.cfg.quantile_resolution + 1)
            | "Cutoff" >> beam.Map(_cutoff_from_quantiles, self.cfg)
        )
        out = assets | "Filter" >> beam.ParDo(dofn, cutoff=beam.pvalue.AsSingleton(cutoff)).with_outputs(
            REJECTED, main="kept")
        return StageOutputs(out.kept, out[REJECTED])


# ------------------------------------------------------------------------- embeddings store


def _kept_rows(item: tuple[str, dict[str, list]]) -> Iterable[dict[str, Any]]:
    _, joined = item
    if not joined["kept"]:
        return
    cluster_id = joined["kept"][0]
    for row in joined["emb"]:
        yield dict(row, cluster_id=cluster_id)


class KeptEmbeddings(beam.PTransform):
    """The embedding rows of assets that survived every filter after scoring: the store
    and the retrieval index must only hold curated documents. `kept` is the final kept
    PCollection of Assets; their (possibly updated) cluster_id is carried over."""

    def __init__(self, kept: beam.PCollection, label: str | None = None):
        super().__init__(label)
        self.kept = kept

    def expand(self, embeddings: beam.PCollection):
        keyed = embeddings | "KeyRows" >> beam.Map(lambda r: (r["asset_id"], r))
        kept = self.kept | "KeyKept" >> beam.Map(lambda a: (a.asset_id, a.cluster_id))
        return ({"emb": keyed, "kept": kept} | "Join" >> beam.CoGroupByKey()
                | "Select" >> beam.FlatMap(_kept_rows))



def embeddings_table(rows: list[dict[str, Any]]):
    """Rows → the embeddings Parquet table (sorted by key, so a shard is byte-stable)."""
    import pyarrow as pa

    rows = sorted(rows, key=lambda r: r["key"])
    half = pa.list_(pa.float16())

    def vecs(name: str):
        return pa.array([None if r[name] is None else np.asarray(r[name], np.float16) for r in rows], half)

    return pa.table({
        "key": pa.array([r["key"] for r in rows], pa.string()),
        "asset_id": pa.array([r["asset_id"] for r in rows], pa.string()),
        "cluster_id": pa.array([r.get("cluster_id") for r in rows], pa.string()),
        "clip_score": pa.array([r.get("clip_score") for r in rows], pa.float32()),
        "captions": pa.array([list(r.get("captions") or []) for r in rows], pa.list_(pa.string())),
        "image_emb": vecs("image_emb"),
        "text_emb": vecs("text_emb"),
        "doc_emb": vecs("doc_emb"),
    })


def WriteEmbeddings(out_dir: str, num_shards: int = 4, prefix: str = "embeddings", label: str | None = None):
    """Embedding rows -> `out_dir/embeddings-NNNNNN.parquet` (stable shard per key, sorted)."""
    return WriteKeyedParquet(out_dir, prefix, embeddings_table, num_shards, label)
