"""Dedup steps under Beam: the perceptual hash of each asset (a per-row step of the prepare
step, `HashImage`) and semantic dedup over CLIP embeddings (a composite of the align step).

The decisions themselves (which asset of a group is kept, and why the others are not) are
Beam-free, in pipeline/dedup_rules.py; exact and near dedup are applied to the whole
delivery by the prepare step's `Decide` (pipeline/stages/decide.py).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Iterable

import apache_beam as beam
from apache_beam.metrics import Metrics

from pipeline import dedup_hash, dedup_rules
from pipeline.config import DedupConfig
from pipeline.records import Asset, Rejected, RejectReason
from pipeline.stages.base import REJECTED, Stage, StageCounters, StageDoFn, StageOutputs

log = logging.getLogger(__name__)


class HashImage(StageDoFn):
    """Perceptual hash per asset (a step of the prepare step's chunks, before the near rule);
    an image that cannot be hashed is a ledger ERROR row at stage `dedup_near`.

    With hash_input="auto" a pHash already on the asset is trusted: decode can hash the
    full frame before it drops the source bytes, which keeps aspect-changing resizes
    within the radius (the 256 px centre crop does not). With `mirror` on, the hash of the
    mirrored frame comes with it (`Asset.phash_mirror`), from the same input. Only rejections are counted here:
    `dedup_near/in` and `kept` are counted where the near rule decides (decide.Decide)."""

    stage = Stage.DEDUP_NEAR
    counts_rows = False

    def __init__(self, config: DedupConfig):
        super().__init__()
        self.config = config

    def handle(self, asset: Asset) -> Asset:
        cfg = self.config
        if cfg.hash_input == "auto" and cfg.hash_kind == "phash" and asset.phash:
            return asset  # computed upstream from the full frame (the best input; see docs/dedup.md)
        value, mirrored = dedup_hash.image_hashes_from_bytes(_hash_input(asset, cfg.hash_input), cfg.hash_kind)
        return asset.replace(phash=dedup_hash.hash_to_hex(value),
                             phash_mirror=dedup_hash.hash_to_hex(mirrored) if cfg.mirror else None)


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


class _Regroup(beam.DoFn):
    """One group (by cluster_id) of alignment outcomes -> the group's final ledger outcome."""

    REPLACED = "replaced"  # asset ids whose prepare-step ledger row is replaced by this step's

    def __init__(self, standby: dict[str, tuple[str, str, str]], prefs: tuple[str, ...]):
        super().__init__()
        self.standby = standby  # asset_id -> (stage, reason, detail) of its prepare-step duplicate row
        self.prefs = prefs

    def setup(self) -> None:
        self.promoted = Metrics.counter(Stage.ALIGN, "groups_kept_by_another_member")
        self.lost = Metrics.counter(Stage.ALIGN, "groups_lost_every_member_failed")

    def process(self, element) -> Iterable:
        group, joined = element
        passed: list[Asset] = list(joined["passed"])
        failed: list[Rejected] = list(joined["failed"])
        if not any(m.asset_id in self.standby for m in [*passed, *failed]):
            yield from passed
            yield from (beam.pvalue.TaggedOutput(REJECTED, r) for r in failed)
            return
        members = [dedup_rules.GroupMember(a.asset_id, True, dedup_rules.representative_rank(a, self.prefs),
                                           a.asset_id in self.standby) for a in passed]
        members += [dedup_rules.GroupMember(r.asset_id, False, None, r.asset_id in self.standby) for r in failed]
        winner = dedup_rules.regroup(members)
        rep = next((m.asset_id for m in members if not m.standby), None)
        if rep is None:  # the representative was taken down: its duplicates keep their prepare-step rows
            return
        for asset in passed:
            if asset.asset_id == winner:
                yield asset if asset.cluster_id else asset.replace(cluster_id=group)
            else:  # a duplicate of the kept member (its score now in its row)
                yield beam.pvalue.TaggedOutput(REJECTED, self._duplicate(asset, winner, rep, group))
        for rejected in failed:
            if rejected.asset_id in self.standby and winner is not None:
                rejected = self._duplicate(rejected, winner, rep, group)
            yield beam.pvalue.TaggedOutput(REJECTED, rejected)  # else: failed on its own (the whole group did)
        if winner != rep:
            (self.lost if winner is None else self.promoted).inc()
        for m in members:
            if m.standby:  # its prepare-step row is replaced by the one above
                yield beam.pvalue.TaggedOutput(self.REPLACED, m.asset_id)

    def _duplicate(self, item: Asset | Rejected, winner: str, rep: str, group: str) -> Rejected:
        """The member's prepare-step duplicate row, pointing at the member the group kept, with
        the member's own score."""
        stage, reason, detail = self.standby[item.asset_id]
        note = f"; kept instead: {winner}, since the representative {rep} failed alignment" if winner != rep else ""
        fields = dict(stage=stage, reason=RejectReason(reason), detail=(detail + note)[:2000], dup_of=winner,
                      cluster_id=group)
        return dataclasses.replace(item, **fields) if isinstance(item, Rejected) else item.reject(**fields)


class RegroupAfterAlignment(beam.PTransform):
    """Dedup and alignment agree: every duplicate group is re-decided once alignment has judged
    each member on its own (dedup_rules.regroup). `passed` and `failed` are the alignment
    filter's outputs over the representatives and the duplicates on standby; `standby` maps a
    standby duplicate's asset_id to its prepare-step ledger row (stage, reason, detail).
    Returns (kept, rejected, replaced): `replaced` lists the duplicates whose prepare-step
    ledger row this step replaces."""

    def __init__(self, standby: dict[str, tuple[str, str, str]], prefs: tuple[str, ...] = ()):
        super().__init__()
        self.standby = standby
        self.prefs = prefs

    def expand(self, outcomes: tuple[beam.PCollection, beam.PCollection]):
        passed, failed = outcomes
        out = (
            {"passed": passed | "KeyPassed" >> beam.Map(lambda a: (a.cluster_id or a.asset_id, a)),
             "failed": failed | "KeyFailed" >> beam.Map(lambda r: (r.cluster_id or r.asset_id, r))}
            | "ByGroup" >> beam.CoGroupByKey()
            | "Decide" >> beam.ParDo(_Regroup(self.standby, self.prefs)).with_outputs(
                REJECTED, _Regroup.REPLACED, main="kept")
        )
        return out.kept, out[REJECTED], out[_Regroup.REPLACED]
