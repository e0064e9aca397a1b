"""Phase C: CLIP image/text embeddings, the alignment score, and the alignment filter.

`ScoreAlignment` embeds batches of assets with a CLIP loaded once per worker process
(shared between the DoFn instances of a process) and sets `clip_score`;
`FilterAlignment` drops assets whose score is too low (absolute threshold, or below the
run's global quantile for `top_fraction`); `WriteEmbeddings` stores the embeddings next to
the curated images as float16 Parquet (layout in docs/alignment.md).
"""

from __future__ import annotations

import hashlib
import io
import logging
from dataclasses import dataclass, field
from typing import Any, Iterable

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics
from apache_beam.transforms.stats import ApproximateQuantiles
from apache_beam.utils import shared

from pipeline.clip import ClipConfig, ClipEmbedder, caption_scores, document_embedding, reduce_scores, text_embedding
from pipeline.records import Asset, RejectReason
from pipeline.stages.base import REJECTED, Reject, StageCounters, StageDoFn

log = logging.getLogger(__name__)

EMBEDDINGS = "embeddings"
SCORE_STAGE = "clip"
FILTER_STAGE = "align"
MODES = ("threshold", "top_fraction", "off")


@dataclass(frozen=True)
class AlignConfig:
    """CLIP scoring and filtering. score = cosine(image, caption) reduced over the asset's
    captions by `reduce` (`max`: some caption describes the image; `mean`: all do)."""

    clip: ClipConfig = field(default_factory=ClipConfig)
    reduce: str = "max"
    mode: str = "top_fraction"  # threshold | top_fraction | off
    threshold: float = 0.25  # mode=threshold: keep score >= threshold (model-specific!)
    keep_fraction: float = 0.9  # mode=top_fraction: keep the best-scoring fraction of the run
    quantile_resolution: int = 1000  # top_fraction cut is exact to 1/resolution of the run

    def __post_init__(self) -> None:
        if self.reduce not in ("max", "mean"):
            raise ValueError(f"AlignConfig.reduce must be max or mean, got {self.reduce!r}")
        if self.mode not in MODES:
            raise ValueError(f"AlignConfig.mode must be one of {MODES}, got {self.mode!r}")
        if not 0.0 < self.keep_fraction <= 1.0:
            raise ValueError("AlignConfig.keep_fraction must be in (0, 1]")
        if self.quantile_resolution < 2:
            raise ValueError("AlignConfig.quantile_resolution must be >= 2")


def curated_key(asset_id: str) -> str:
    """The 16-hex key of an asset in the curated store (stable across re-partitioning)."""
    return hashlib.sha256(asset_id.encode("utf-8")).hexdigest()[:16]


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
        self.embedder = self._shared.acquire(lambda: _SharedEmbedder(self.cfg.clip), tag=tag).embedder
        self.counters = StageCounters(SCORE_STAGE)
        self.score_dist = Metrics.distribution(SCORE_STAGE, "score_x1000")

    def _reject(self, asset: Asset, reason: RejectReason, detail: str):
        self.counters.rejected(reason)
        return beam.pvalue.TaggedOutput(REJECTED, asset.reject(SCORE_STAGE, reason, detail[:2000]))

    def process(self, batch: list[Asset]) -> Iterable:
        ready: list[tuple[Asset, Any]] = []
        for asset in batch:
            self.counters.seen.inc()
            try:
                if not asset.image:
                    raise ValueError("asset has no normalised image")
                ready.append((asset, self.embedder.prepare_image(asset.image)))
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
                "key": curated_key(asset.asset_id),
                "asset_id": asset.asset_id,
                "cluster_id": asset.cluster_id,
                "clip_score": score,
                "captions": list(asset.captions),
                "image_emb": image_emb.astype(np.float16),
                "text_emb": None if text_emb is None else text_emb.astype(np.float16),
                "doc_emb": doc_emb.astype(np.float16),
            })


class ScoreAlignment(beam.PTransform):
    """Assets → `kept` (clip_score set), `embeddings` (dict rows, float16) and `rejected`
    (ERROR only: scoring never judges, `FilterAlignment` does)."""

    def __init__(self, cfg: AlignConfig, label: str | None = None):
        super().__init__(label)
        self.cfg = cfg

    def expand(self, assets: beam.PCollection):
        bs = self.cfg.clip.batch_size
        return (
            assets
            | "Batch" >> beam.BatchElements(min_batch_size=bs, max_batch_size=bs)
            | "Embed" >> beam.ParDo(_ScoreBatch(self.cfg)).with_outputs(REJECTED, EMBEDDINGS, main="kept")
        )


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
            return assets | "Filter" >> beam.ParDo(dofn).with_outputs(REJECTED, main="kept")
        cutoff = (
            assets
            | "Scores" >> beam.FlatMap(lambda a: [a.clip_score] if a.clip_score is not None else [])
            | "Quantiles" >> ApproximateQuantiles.Globally(self.cfg.quantile_resolution + 1)
            | "Cutoff" >> beam.Map(_cutoff_from_quantiles, self.cfg)
        )
        return assets | "Filter" >> beam.ParDo(dofn, cutoff=beam.pvalue.AsSingleton(cutoff)).with_outputs(
            REJECTED, main="kept")


# ------------------------------------------------------------------------- embeddings store


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


class _WriteShard(beam.DoFn):
    def __init__(self, out_dir: str, prefix: str):
        super().__init__()
        self.out_dir = out_dir.rstrip("/")
        self.prefix = prefix

    def process(self, item: tuple[int, Iterable[dict[str, Any]]]) -> Iterable[str]:
        import pyarrow.parquet as pq

        from pipeline.retrieval import atomic_write_bytes

        shard, rows = item
        buf = io.BytesIO()
        pq.write_table(embeddings_table(list(rows)), buf)
        url = f"{self.out_dir}/{self.prefix}-{shard:06d}.parquet"
        atomic_write_bytes(url, buf.getvalue())
        yield url


def shard_of(key: str, num_shards: int) -> int:
    """Shard of a key: a stable hash, never arrival order."""
    return int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) % num_shards


class WriteEmbeddings(beam.PTransform):
    """Write embedding rows to `out_dir/embeddings-NNNNNN.parquet` (shard = stable hash of
    key, rows sorted by key, atomic rename); yields the written URLs."""

    def __init__(self, out_dir: str, num_shards: int = 4, prefix: str = "embeddings", label: str | None = None):
        super().__init__(label)
        if num_shards < 1:
            raise ValueError("num_shards must be >= 1")
        self.out_dir, self.num_shards, self.prefix = out_dir, num_shards, prefix

    def expand(self, rows: beam.PCollection):
        n = self.num_shards
        return (
            rows
            | "Shard" >> beam.Map(lambda r: (shard_of(r["key"], n), r))
            | "Group" >> beam.GroupByKey()
            | "Write" >> beam.ParDo(_WriteShard(self.out_dir, self.prefix))
        )
