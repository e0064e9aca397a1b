"""Dedup steps under Beam: the perceptual hash of each asset (a per-row step of the prepare
step, `HashImage`) and semantic dedup over CLIP embeddings (a composite of the align step).

The decisions themselves (which asset of a group is kept, and why the others are not) are
Beam-free, in pipeline/dedup_rules.py; exact and near dedup are applied to the whole
delivery by the prepare step's `Decide` (pipeline/stages/prepare.py).
"""

from __future__ import annotations

import logging
from typing import Iterable

import apache_beam as beam

from pipeline import dedup_hash, dedup_rules
from pipeline.config import DedupConfig
from pipeline.records import Asset, RejectReason
from pipeline.stages.base import REJECTED, Stage, StageCounters, StageDoFn, StageOutputs

log = logging.getLogger(__name__)


class HashImage(StageDoFn):
    """Perceptual hash per asset (a step of the prepare step's chunks, before the near rule);
    an image that cannot be hashed is a ledger ERROR row at stage `dedup_near`.

    With hash_input="auto" a pHash already on the asset is trusted: decode can hash the
    full frame before it drops the source bytes, which keeps aspect-changing resizes
    within the radius (the 256 px centre crop does not). Only rejections are counted here:
    `dedup_near/in` and `kept` are counted where the near rule decides (prepare.Decide)."""

    stage = Stage.DEDUP_NEAR
    counts_rows = False

    def __init__(self, config: DedupConfig):
        super().__init__()
        self.config = config

    def handle(self, asset: Asset) -> Asset:
        cfg = self.config
        if cfg.hash_input == "auto" and cfg.hash_kind == "phash" and asset.phash:
            return asset  # computed upstream from the full frame (the best input; see docs/dedup.md)
        value = dedup_hash.image_hash_from_bytes(_hash_input(asset, cfg.hash_input), cfg.hash_kind)
        return asset.replace(phash=dedup_hash.hash_to_hex(value))


def _hash_input(asset: Asset, which: str) -> bytes:
    """Source bytes hash the full frame (robust to aspect changes: see docs/dedup.md); the
    normalised image is used when ingest dropped the source or when asked to."""
    if which == "source" or (which == "auto" and asset.source_bytes):
        if not asset.source_bytes:
            raise ValueError("no source bytes to hash (hash_input='source')")
        return asset.source_bytes
    if asset.image:
        return asset.image
    if asset.source_bytes:
        return asset.source_bytes
    raise ValueError("asset has neither a normalised image nor source bytes to hash")


class _ApplySemantic(beam.DoFn):
    """Join point: representatives (and singletons) continue, the rest become ledger rows."""

    def __init__(self, stage: Stage):
        super().__init__()
        self.stage = stage
        self._counters: StageCounters | None = None

    def setup(self) -> None:
        self._counters = StageCounters(self.stage)

    def process(self, element) -> Iterable:
        _, joined = element
        decisions = list(joined["decision"])
        for asset in joined["asset"]:
            self._counters.seen.inc()
            d = decisions[0] if decisions else None
            if d is None or d.dup_of is None:
                self._counters.kept.inc()
                yield asset if d is None or asset.cluster_id else asset.replace(cluster_id=d.cluster_id)
                continue
            self._counters.rejected(RejectReason.SEMANTIC_DUPLICATE)
            yield beam.pvalue.TaggedOutput(REJECTED, asset.reject(
                self.stage, RejectReason.SEMANTIC_DUPLICATE, d.detail, dup_of=d.dup_of, cluster_id=d.cluster_id))


class DedupSemantic(beam.PTransform):
    """SemDeDup-style: cosine similarity of image embeddings >= threshold (dedup_rules).

    `embeddings` is a PCollection of (asset_id, np.float32 vector) from the CLIP stage; assets
    without an embedding pass through. Exact blocked all-pairs (fine for a delivery of up to
    ~100k; k-means partitioning as in SemDeDup is the next step for more). Returns
    `(kept, rejected)`.
    """

    def __init__(self, config: DedupConfig, embeddings: beam.PCollection, stage: Stage = Stage.DEDUP_SEMANTIC):
        super().__init__()
        if not isinstance(config, DedupConfig):
            raise TypeError("DedupSemantic needs a DedupConfig")
        self.config = config
        self.embeddings = embeddings
        self.stage = stage

    def expand(self, assets: beam.PCollection):
        cfg = self.config
        prefs = cfg.license_preference
        keyed = assets | "KeyForRows" >> beam.Map(lambda a: (a.asset_id, a))
        rows = (
            {"asset": keyed, "emb": self.embeddings}
            | "WithEmbedding" >> beam.CoGroupByKey()
            | "Rows" >> beam.FlatMap(
                lambda kv: [
                    dedup_rules.Row(a.asset_id, e, dedup_rules.representative_rank(a, prefs))
                    for a in list(kv[1]["asset"])[:1]
                    for e in list(kv[1]["emb"])[:1]
                ]
            )
        )
        gathered = rows | "Gather" >> beam.CombineGlobally(beam.combiners.ToListCombineFn())
        decisions = (gathered | "Cluster" >> beam.FlatMap(dedup_rules.semantic_decisions, cfg.semantic_threshold)
                     | "KeyDecisions" >> beam.Map(lambda d: (d.asset_id, d)))
        joined = {"asset": keyed, "decision": decisions} | "Join" >> beam.CoGroupByKey()
        out = joined | "Apply" >> beam.ParDo(_ApplySemantic(self.stage)).with_outputs(REJECTED, main="kept")
        return StageOutputs(out.kept, out[REJECTED])
