"""The `sft` step's shard set, `sft/`: CM3leon-style task examples `[bos] prompt <break>
answer [eos]` (tokenizer/sft.py) over the curated documents, resampled per task, with two more
provenance columns (`task`, `answer_start`). It reuses the `tokens` step's pieces
(pipeline/stages/tokens.py): the same documents (`make_document`), shard files
(`write_token_shard`) and index.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Iterable

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics

from manifests.schema import RowError, parse_objects
from pipeline import storage
from pipeline.config import SftConfig
from pipeline.stages.decode import curated_box
from pipeline.stages.tokens import (Document, SharedVocab, make_document, provenance_row, unit_draw,
                                    write_token_shard, write_tokens_index)
from tokenizer import sft as sft_format

log = logging.getLogger(__name__)

CANDIDATES = "candidates"  # tagged output: one task name per (document, task) candidate
SFT_TOO_LONG = "too_long"  # tagged output: one task name per candidate over sft.max_tokens
SFT_HISTOGRAMS = {"task_counts": "sequences_per_task"}


def document_objects(meta: dict[str, Any], resolution: int, max_objects: int) -> tuple[tuple, int]:
    """(boxes, dropped): a curated row's manifest boxes (`extra_json.objects`, source pixels of
    the displayed frame `source_width` x `source_height`) as (label, box) in the curated frame,
    in manifest order, at most `max_objects`; `dropped` counts those (nearly) outside the crop
    (`decode.curated_box`). A store written before `objects` was validated may hold a bad
    list: then no boxes."""
    raw = json.loads(meta.get("extra_json") or "{}").get("objects")
    width, height = meta.get("source_width"), meta.get("source_height")
    if not raw or not width or not height:
        return (), 0
    try:
        boxes = parse_objects(raw)
    except RowError:
        return (), 0
    placed = [(b.label, curated_box(b.bbox, width, height, resolution)) for b in boxes]
    kept = tuple((label, box) for label, box in placed if box is not None)
    return kept[:max_objects], len(placed) - len(kept)


def sft_key(key: str, task: str, copy: int) -> str:
    """The sequence key of copy `copy` of a document's `task` example (no dots or slashes)."""
    return f"{key}-{task}-{copy}"


class _RouteSftCandidates(beam.DoFn):
    """(key, {meta, codes, kept}) -> (shard, (key, doc, objects)) for a document the ledger
    keeps and that has codes, plus one CANDIDATES output per task it can serve (grounded
    generation needs a box that survives the crop)."""

    def __init__(self, vocab_url: str, cfg: SftConfig, seed: int, num_shards: int, resolution: int):
        super().__init__()
        self._vocab = SharedVocab(vocab_url)
        self.cfg, self.seed, self.num_shards, self.resolution = cfg, seed, num_shards, resolution

    def setup(self) -> None:
        self.vocab = self._vocab.load()
        self.documents = Metrics.counter("sft", "documents")
        self.not_kept = Metrics.counter("sft", "documents_not_kept")
        self.with_boxes = Metrics.counter("sft", "documents_with_boxes")
        self.dropped = Metrics.counter("sft", "boxes_outside_crop")

    def process(self, item: tuple[str, dict[str, list]]):
        key, groups = item
        if not (groups["meta"] and groups["codes"]):
            return  # no curated row, or rejected by the encode step (no codes)
        if not groups["kept"]:
            self.not_kept.inc()  # rejected after curation (e.g. tokens: SEQUENCE_TOO_LONG)
            return
        meta = groups["meta"][0]
        doc = make_document(self.vocab, meta, groups["codes"][0], self.seed)
        objects, dropped = document_objects(meta, self.resolution, self.cfg.max_objects)
        self.dropped.inc(dropped)
        self.documents.inc()
        self.with_boxes.inc(1 if objects else 0)
        for task in self.cfg.tasks:
            if task != sft_format.GROUNDED or objects:
                yield beam.pvalue.TaggedOutput(CANDIDATES, task)
        yield storage.stable_bucket(key, self.num_shards), (key, doc, objects)


class _WriteSftShard(beam.DoFn):
    """(shard, [(key, doc, objects)]) -> the shard's examples, sorted by sequence key, written.
    Each (document, task) is written `copies(factor, unit)` times, the factor coming from the
    candidate counts of the whole run (side input); an example over `sft.max_tokens` is skipped
    (SFT_TOO_LONG output), not rejected: the asset stays in the pretraining set."""

    def __init__(self, vocab_url: str, cfg: SftConfig, seed: int, sft_dir: str, dtype: str):
        super().__init__()
        self._vocab = SharedVocab(vocab_url)
        self.cfg, self.seed, self.sft_dir, self.dtype = cfg, seed, sft_dir, dtype

    def setup(self) -> None:
        self.vocab = self._vocab.load()
        self.sequences = Metrics.counter("sft", "sequences")
        self.too_long = Metrics.counter("sft", "skipped_too_long")

    def process(self, item: tuple[int, Iterable[tuple[str, Document, tuple]]], candidates: dict[str, int]):
        shard, docs = item
        cfg = self.cfg
        factors = sft_factors(cfg, candidates)
        examples: list[tuple[str, np.ndarray, dict[str, Any]]] = []
        for key, doc, objects in sorted(docs, key=lambda d: d[0]):
            for task in cfg.tasks:
                if task == sft_format.GROUNDED and not objects:
                    continue
                example = sft_format.build_example(self.vocab, task, doc.text, doc.codes, objects, cfg.templates)
                if len(example.tokens) > cfg.max_tokens:
                    self.too_long.inc()
                    yield beam.pvalue.TaggedOutput(SFT_TOO_LONG, task)
                    continue
                order = "image_first" if sft_format.image_first(task, cfg.templates) else "text_first"
                row = {**provenance_row(doc, [], [], order), "task": task, "answer_start": example.answer_start}
                for copy in range(sft_format.copies(factors[task], unit_draw(self.seed, f"sft:{task}", key))):
                    examples.append((sft_key(key, task, copy), example.tokens, {**row, "key": sft_key(key, task, copy)}))
        if not examples:
            return
        examples.sort(key=lambda e: e[0])
        entry = write_token_shard(self.sft_dir, shard, [e[1] for e in examples], [e[2] for e in examples], self.dtype,
                                  webdataset=False)
        entry.pop("neighbour_counts")  # always 0: an SFT example is one document
        counts = {task: 0 for task in cfg.tasks}  # every task appears in the index, 0 included
        for _, _, row in examples:
            counts[row["task"]] += 1
        entry["task_counts"] = counts
        self.sequences.inc(len(examples))
        yield entry


def sft_factors(cfg: SftConfig, candidates: dict[str, int]) -> dict[str, float]:
    """Each configured task's sampling factor, from the run's candidate counts."""
    return sft_format.task_factors({t: int(candidates.get(t, 0)) for t in cfg.tasks}, cfg.task_weights,
                                   cfg.max_upsample, cfg.min_downsample)


def write_sft_index(sft_dir: str, entries: list[dict[str, Any]], dtype: str, extra: dict[str, Any], cfg: SftConfig,
                    candidates: dict[str, int], too_long: dict[str, int]) -> dict[str, Any]:
    """`sft/index.json`: the tokens index format plus per-task candidates, factors, written
    sequences and examples skipped for the budget."""
    extra = {**extra,
             "task_candidates": {t: int(candidates.get(t, 0)) for t in cfg.tasks},
             "task_factors": {t: round(f, 6) for t, f in sft_factors(cfg, candidates).items()},
             "skipped_too_long": {t: int(too_long.get(t, 0)) for t in cfg.tasks}}
    return write_tokens_index(sft_dir, entries, dtype, extra, SFT_HISTOGRAMS)


class WriteSftShards(beam.PTransform):
    """Curated metadata rows, (key, codes) pairs and ledger rows -> `sft/` (shards, provenance
    with `task` and `answer_start`, index.json). Only documents the ledger keeps take part."""

    def __init__(self, cfg: SftConfig, vocab_url: str, sft_dir: str, seed: int, num_shards: int, dtype: str,
                 resolution: int, index_extra: dict[str, Any]):
        super().__init__()
        self.cfg, self.vocab_url, self.sft_dir, self.seed = cfg, vocab_url, sft_dir, seed
        self.num_shards, self.dtype, self.resolution, self.index_extra = num_shards, dtype, resolution, index_extra

    def expand(self, inputs: dict[str, beam.PCollection]):
        cfg, sft_dir, dtype, extra = self.cfg, self.sft_dir, self.dtype, self.index_extra
        meta = inputs["meta"] | "KeyMeta" >> beam.Map(lambda r: (r["key"], r))
        kept = (inputs["ledger"] | "KeptRows" >> beam.Filter(lambda r: r["status"] == "kept" and r["key"])
                | "KeptKeys" >> beam.Map(lambda r: (r["key"], True)))
        routed = (
            {"meta": meta, "codes": inputs["codes"], "kept": kept}
            | "JoinByDocument" >> beam.CoGroupByKey()
            | "RouteCandidates" >> beam.ParDo(
                _RouteSftCandidates(self.vocab_url, cfg, self.seed, self.num_shards, self.resolution))
            .with_outputs(CANDIDATES, main="documents")
        )
        candidates = beam.pvalue.AsSingleton(
            routed[CANDIDATES] | "CountCandidates" >> beam.combiners.Count.PerElement()
            | "CandidateTable" >> beam.combiners.ToDict())
        written = (
            routed.documents
            | "GroupByShard" >> beam.GroupByKey()
            | "WriteShards" >> beam.ParDo(_WriteSftShard(self.vocab_url, cfg, self.seed, sft_dir, dtype), candidates)
            .with_outputs(SFT_TOO_LONG, main="entries")
        )
        too_long = beam.pvalue.AsSingleton(
            written[SFT_TOO_LONG] | "CountTooLong" >> beam.combiners.Count.PerElement()
            | "TooLongTable" >> beam.combiners.ToDict())
        return (
            written.entries
            | "CollectIndex" >> beam.combiners.ToList()
            | "WriteIndex" >> beam.Map(lambda entries, c, t: write_sft_index(sft_dir, entries, dtype, extra, cfg, c, t),
                                       candidates, too_long)
        )
