"""Phase C: CLIP image/text embeddings, the alignment score, and the alignment filter.

`ScoreAlignment` embeds batches of assets with a CLIP loaded once per worker process
(shared between the DoFn instances of a process) and sets `clip_score` (out of fold when
the run trained its own CLIP); `FilterAlignment` drops assets whose score is too low (the
calibrated cut, an absolute threshold, or the run's global quantile for `top_fraction`);
`WriteEmbeddings` stores the embeddings next to
the curated images as float16 Parquet (layout in docs/alignment.md).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Iterable, Iterator, NamedTuple

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics
from apache_beam.transforms.stats import ApproximateQuantiles
from apache_beam.utils import shared

from pipeline import storage
from pipeline.alignment_filter import Calibration, calibrate, fold_of, mismatch_pairs
from pipeline.config import AlignConfig, ClipConfig
from pipeline.clip import ClipEmbedder, caption_scores, document_embedding, reduce_scores, text_embedding
from pipeline.records import Asset, RejectReason
from pipeline.stages.base import REJECTED, Reject, Stage, StageCounters, StageDoFn, StageOutputs
from pipeline.stages.store import WriteKeyedParquet

log = logging.getLogger(__name__)

EMBEDDINGS = "embeddings"
MISMATCHED = "mismatched"  # tagged output: scores of images with captions drawn from other rows
SCORE_STAGE = Stage.CLIP
FILTER_STAGE = Stage.ALIGN


class _SharedEmbedder:
    """Weak-referenceable holder so `shared.Shared` can keep one model per process."""

    def __init__(self, cfg: ClipConfig):
        self.embedder = ClipEmbedder(cfg)


def read_batches(url: str, batch_size: int) -> Iterator[list[Asset]]:
    """A store shard's assets in batches of consecutive samples: the same batches on every
    run and runner, so the mismatched captions drawn inside a batch are the same too."""
    from pipeline.stages.store import read_shard

    batch: list[Asset] = []
    for asset in read_shard(url):
        batch.append(asset)
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def fold_key(asset: Asset) -> str:
    """What decides an asset's fold: its duplicate group (so a duplicate on standby is scored
    by a model that saw no member of its group), else its id. Training uses the same key."""
    return asset.cluster_id or asset.asset_id


class _ScoreBatch(beam.DoFn):
    """Embed a batch of assets; per-asset failures become ERROR rejections, not batch loss.

    Embeddings (for the store and retrieval) come from the run's CLIP. Scores come from the
    fold model that never saw the asset when `fold_weights` are given (out of fold), else from
    the same CLIP. With them, each image is scored against `mismatch_draws` captions of other
    rows of its batch and fold: the MISMATCHED output, from which the calibrated filter learns
    what a mismatched pair scores."""

    def __init__(self, cfg: AlignConfig, fold_weights: tuple[str, ...] = ()):
        super().__init__()
        self.cfg = cfg
        self.fold_weights = tuple(fold_weights)
        self._shared = shared.Shared()
        self.embedder: ClipEmbedder | None = None
        self.scorers: list[ClipEmbedder] = []
        self.counters: StageCounters | None = None

    def _load(self, clip: ClipConfig) -> ClipEmbedder:
        tag = f"clip:{clip.arch}:{clip.weights}:{clip.device}"
        holder = self._shared.acquire(lambda: _SharedEmbedder(clip), tag=tag)
        self._holders.append(holder)  # keeps it alive
        return holder.embedder

    def setup(self) -> None:
        self._holders: list[_SharedEmbedder] = []
        self.embedder = self._load(self.cfg.clip)
        self.scorers = [self._load(dataclasses.replace(self.cfg.clip, weights=w)) for w in self.fold_weights]
        self.counters = StageCounters(SCORE_STAGE)
        self.score_dist = Metrics.distribution(SCORE_STAGE, "score_x1000")
        self.batch_sizes = Metrics.distribution(SCORE_STAGE, "batch_size")

    def _reject(self, asset: Asset, reason: RejectReason, detail: str):
        self.counters.rejected(reason)
        return beam.pvalue.TaggedOutput(REJECTED, asset.reject(SCORE_STAGE, reason, detail[:2000]))

    @staticmethod
    def _embed(embedder: ClipEmbedder, group: list[tuple[Asset, Any]]) -> tuple[np.ndarray, list[np.ndarray]]:
        """Image embeddings of a group and, per asset, its captions' embeddings."""
        image_embs = embedder.embed_pixels([px for _, px in group])
        flat = embedder.embed_texts([c for asset, _ in group for c in asset.captions])
        caption_embs, offset = [], 0
        for asset, _ in group:
            caption_embs.append(flat[offset:offset + len(asset.captions)])
            offset += len(asset.captions)
        return image_embs, caption_embs

    def _scores(self, image_embs: np.ndarray, caption_embs: list[np.ndarray], group: list[tuple[Asset, Any]]
                ) -> tuple[list[float | None], list[float]]:
        """Matched scores of a group (one fold) and its mismatched scores (captions of other rows)."""
        reduce = self.cfg.reduce
        matched = [reduce_scores(caption_scores(img, embs), reduce) if len(embs) else None
                   for img, embs in zip(image_embs, caption_embs)]
        mismatched = []
        if self.cfg.mode == "calibrated":
            seed = storage.stable_bucket(group[0][0].asset_id, 2 ** 31)
            for i, j in mismatch_pairs(len(group), self.cfg.mismatch_draws, seed):
                if len(caption_embs[j]):
                    mismatched.append(reduce_scores(caption_scores(image_embs[i], caption_embs[j]), reduce))
        return matched, mismatched

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
            image_embs, caption_embs = self._embed(self.embedder, ready)
            scores: dict[str, float | None] = {}
            mismatched: list[float] = []
            if self.scorers:  # out of fold: each fold's rows by the model that never saw them
                folds: dict[int, list[tuple[Asset, Any]]] = {}
                for item in ready:
                    folds.setdefault(fold_of(fold_key(item[0]), len(self.scorers)), []).append(item)
                for k, group in sorted(folds.items()):
                    matched, mis = self._scores(*self._embed(self.scorers[k], group), group)
                    scores.update((asset.asset_id, s) for (asset, _), s in zip(group, matched))
                    mismatched += mis
            else:
                matched, mismatched = self._scores(image_embs, caption_embs, ready)
                scores = {asset.asset_id: s for (asset, _), s in zip(ready, matched)}
        except Exception as exc:  # noqa: BLE001
            log.warning("%s: batch of %d failed: %s", SCORE_STAGE, len(ready), exc)
            for asset, _ in ready:
                yield self._reject(asset, RejectReason.ERROR, f"{type(exc).__name__}: {exc}")
            return
        for (asset, _), image_emb, embs in zip(ready, image_embs, caption_embs):
            score = scores[asset.asset_id]
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
        for value in mismatched:
            yield beam.pvalue.TaggedOutput(MISMATCHED, value)


class Scored(NamedTuple):
    """What `ScoreAlignment` returns: the stage outputs, the embedding rows, and the scores of
    mismatched pairs (for the calibrated filter)."""

    kept: Any
    rejected: Any
    embeddings: Any
    mismatched: Any


class ScoreAlignment(beam.PTransform):
    """Batches of assets (lists; `read_batches` makes deterministic ones) → `Scored`: `kept`
    (clip_score set), `rejected` (ERROR only: scoring never judges, `FilterAlignment` does),
    `embeddings` (dict rows, float16) and `mismatched` (floats)."""

    def __init__(self, cfg: AlignConfig, fold_weights: tuple[str, ...] = (), label: str | None = None):
        super().__init__(label)
        self.cfg = cfg
        self.fold_weights = tuple(fold_weights)

    def expand(self, batches: beam.PCollection):
        out = batches | "Embed" >> beam.ParDo(_ScoreBatch(self.cfg, self.fold_weights)).with_outputs(
            REJECTED, EMBEDDINGS, MISMATCHED, main="kept")
        return Scored(out.kept, out[REJECTED], out[EMBEDDINGS], out[MISMATCHED])


class _FilterDoFn(StageDoFn):
    stage = FILTER_STAGE

    def __init__(self, cfg: AlignConfig):
        super().__init__()
        self.cfg = cfg
        self._cutoff: float | None = None
        self._why = ""

    def process(self, asset: Asset, cutoff: Any = None) -> Iterable:
        if self.cfg.mode == "calibrated":
            self._cutoff = cutoff.threshold
            self._why = (f"calibrated cut (out-of-fold AUC {cutoff.auc:.3f}, expected false rejects "
                         f"{cutoff.expected_false_reject:.1%})") if cutoff.threshold is not None else ""
        elif self.cfg.mode == "top_fraction":
            self._cutoff, self._why = cutoff, f"run quantile (keep {self.cfg.keep_fraction:g})"
        else:
            self._cutoff, self._why = self.cfg.threshold, "threshold"
        yield from super().process(asset)

    def handle(self, asset: Asset) -> Asset:
        if self.cfg.mode == "off" or asset.clip_score is None or self._cutoff is None:
            return asset  # unscored (no caption) assets cannot be judged: kept, score null
        if asset.clip_score < self._cutoff:
            raise Reject(RejectReason.LOW_ALIGNMENT, f"clip_score {asset.clip_score:.4f} < {self._cutoff:.4f} {self._why}")
        return asset


def _cutoff_from_quantiles(quantiles: list[float], cfg: AlignConfig) -> float | None:
    if not quantiles:
        return None
    idx = int(round((1.0 - cfg.keep_fraction) * (len(quantiles) - 1)))
    return float(quantiles[idx])


def _calibrate(scores: list[tuple[bool, float]], cfg: AlignConfig, record_url: str | None) -> Calibration:
    matched = np.array([s for m, s in scores if m], dtype=np.float64)
    mismatched = np.array([s for m, s in scores if not m], dtype=np.float64)
    result = calibrate(matched, mismatched, cfg.false_reject_budget, cfg.min_auc, cfg.min_catch)
    if record_url:
        storage.write_json(record_url, result.to_json())
    return result


class FilterAlignment(beam.PTransform):
    """Scored assets → `kept` and `rejected` (LOW_ALIGNMENT, detail holds score and cut).

    `calibrated` learns the cut from the run's matched and mismatched scores
    (alignment_filter.calibrate, written to `record_url` for run.json); `top_fraction`
    computes the run's score quantile. Both are a global combine applied as a side input, so
    the cut is the same on every worker."""

    def __init__(self, cfg: AlignConfig, mismatched: beam.PCollection | None = None, record_url: str | None = None,
                 label: str | None = None):
        super().__init__(label)
        self.cfg = cfg
        self.mismatched = mismatched
        self.record_url = record_url

    def expand(self, assets: beam.PCollection):
        dofn = _FilterDoFn(self.cfg)
        scores = assets | "Scores" >> beam.FlatMap(lambda a: [a.clip_score] if a.clip_score is not None else [])
        if self.cfg.mode == "calibrated":
            if self.mismatched is None:
                raise ValueError("the calibrated filter needs the mismatched scores (ScoreAlignment's `mismatched`)")
            both = ((scores | "Matched" >> beam.Map(lambda s: (True, s)),
                     self.mismatched | "Mismatched" >> beam.Map(lambda s: (False, s)))
                    | "AllScores" >> beam.Flatten())
            cutoff = (both | "Collect" >> beam.combiners.ToList()
                      | "Calibrate" >> beam.Map(_calibrate, self.cfg, self.record_url))
        elif self.cfg.mode == "top_fraction":
            cutoff = (scores
                      | "Quantiles" >> ApproximateQuantiles.Globally(self.cfg.quantile_resolution + 1)
                      | "Cutoff" >> beam.Map(_cutoff_from_quantiles, self.cfg))
        else:
            out = assets | "Filter" >> beam.ParDo(dofn).with_outputs(REJECTED, main="kept")
            return StageOutputs(out.kept, out[REJECTED])
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
