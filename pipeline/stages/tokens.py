"""Phase F: CM3 training sequences, written as token shards with per-sequence provenance.

For every curated document that has VQ codes, the `tokens` step builds one sequence
`[bos] n1 <break> ... nk <break> main [eos]` (layout: tokenizer/cm3.py; files:
tokenizer/token_shards.py, docs/shards.md). The graph is one join and one group, so no worker
holds more than one shard's documents: curated metadata, codes and the neighbour requests are
joined by document key; each document is routed to its own sequence's shard and to the shard of
every sequence that retrieved it; each shard assembles and writes its sequences. Codes cross the
shuffles as numpy arrays, and assembled sequences never do.
A sequence over `tokens.max_tokens` drops its least relevant neighbours first; a document that
does not fit alone is rejected (`SEQUENCE_TOO_LONG`) and the step records it in the ledger.
Shards are assigned by a stable hash of the key and sorted inside, so reruns are byte-identical.

The `sft` step (pipeline/stages/sft.py) reuses these pieces for a second shard set.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Mapping, Sequence

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics

from pipeline import ledger, storage
from pipeline.progress import Progress, counted
from pipeline.config import TokensConfig
from pipeline.records import RejectReason
from pipeline.stages.base import Stage
from tokenizer import token_shards
from tokenizer.cm3 import CM3Format, build_document, build_sequence

log = logging.getLogger(__name__)

STAGE = Stage.TOKENS
TOO_LONG = "too_long"  # tagged output: (key, asset_id, detail)


@dataclass(frozen=True)
class Document:
    """One curated document, ready to lay out: caption ids and raw VQ codes (no offset yet)."""

    key: str
    asset_id: str
    license_id: str | None
    licensor: str | None
    text: np.ndarray  # caption ids, vocab dtype
    codes: np.ndarray  # raw VQ codes, flat

    @property
    def num_tokens(self) -> int:
        return len(self.text) + len(self.codes) + 2  # + <img> and </img>


def unit_draw(seed: int, purpose: str, key: str) -> float:
    """A uniform number in [0, 1) that is a pure function of (seed, purpose, key)."""
    digest = hashlib.sha256(f"{purpose}:{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def caption_index(seed: int, key: str, n: int) -> int:
    """Which of a document's captions it uses (seeded, so every caption of a corpus is used)."""
    return min(n - 1, int(unit_draw(seed, "caption", key) * n)) if n > 1 else 0


def sequence_order(cfg: TokensConfig, seed: int, key: str) -> str:
    """`text_first` or `image_first` for the sequence whose main document is `key`."""
    if cfg.order != "mixed":
        return cfg.order
    return "image_first" if unit_draw(seed, "order", key) < cfg.image_first_fraction else "text_first"


def make_document(vocab, meta: dict[str, Any], codes: np.ndarray, seed: int) -> Document:
    """Curated metadata row + codes -> Document (the caption is encoded as plain text)."""
    captions = [c for c in (meta.get("captions") or []) if isinstance(c, str)]
    caption = captions[caption_index(seed, meta["key"], len(captions))] if captions else ""
    return Document(key=meta["key"], asset_id=meta["asset_id"], license_id=meta.get("license_id"),
                    licensor=meta.get("licensor"), text=vocab.text_to_ids(caption),
                    codes=np.asarray(codes).reshape(-1))


def sequence_length(main: Document, neighbours: Sequence[Document]) -> int:
    return 2 + main.num_tokens + sum(n.num_tokens + 1 for n in neighbours)  # bos, eos, a <break> each


def fit_neighbours(main: Document, ranked: Sequence[Document], k: int, max_tokens: int) -> list[Document] | None:
    """The first `k` neighbours minus the least relevant ones until the sequence fits; None
    when the main document alone does not fit."""
    chosen = list(ranked[:k])
    while chosen and sequence_length(main, chosen) > max_tokens:
        chosen.pop()
    if sequence_length(main, chosen) > max_tokens:
        return None
    return chosen


def assemble(vocab, main: Document, neighbours: Sequence[Document], order: str) -> np.ndarray:
    fmt = CM3Format(image_first=order == "image_first")
    docs = [build_document(vocab, d.text, d.codes, fmt) for d in neighbours]
    return build_sequence(vocab, docs, build_document(vocab, main.text, main.codes, fmt), fmt)


def provenance_row(main: Document, neighbours: Sequence[Document], scores: Sequence[float], order: str) -> dict[str, Any]:
    docs = [main, *neighbours]
    return {
        "key": main.key,
        "main_asset_id": main.asset_id,
        "asset_ids": [d.asset_id for d in docs],
        "roles": ["main"] + ["neighbour"] * len(neighbours),
        "license_ids": [d.license_id for d in docs],
        "licensors": [d.licensor for d in docs],
        "neighbour_scores": [float(s) for s in scores],
        "order": order,
    }


# ----------------------------------------------------------------------------- Beam


class SharedVocab:
    """Loads the joint vocabulary (with its BPE) once per DoFn instance, in `setup`."""

    def __init__(self, vocab_url: str):
        self.vocab_url = vocab_url
        self.vocab = None

    def load(self):
        from tokenizer.vocab import JointVocab

        if self.vocab is None:
            self.vocab = JointVocab.load(self.vocab_url, with_text=True)
        return self.vocab


def read_codes(url: str) -> Iterator[tuple[str, np.ndarray]]:
    """(key, flat codes) from one `codes-NNNNNN.parquet`, as numpy arrays: Beam's Parquet source
    would hand out a Python list of ints per image, which costs more to shuffle than the rest
    of the step together (measured in benchmarks/tokens.py)."""
    import fsspec
    import pyarrow.parquet as pq

    with fsspec.open(url, "rb") as handle:
        table = pq.read_table(handle, columns=["key", "codes"])
    keys = table.column("key").to_pylist()
    codes = table.column("codes").combine_chunks()
    values = codes.values.to_numpy()
    offsets = codes.offsets.to_numpy()
    for i, key in enumerate(keys):
        yield key, values[offsets[i] : offsets[i + 1]].copy()


def _requests(row: dict[str, Any], k: int) -> Iterator[tuple[str, tuple[str, int, float]]]:
    """Neighbour table row -> (neighbour key, (main key, rank, score)) for the first k."""
    for rank, (nkey, score) in enumerate(zip(row["neighbour_keys"] or [], row["scores"] or [])):
        if rank >= k:
            break
        yield nkey, (row["key"], rank, float(score))


class _RouteDocuments(beam.DoFn):
    """(key, {meta, codes, req}) -> the document to its own sequence's shard and, once per
    request, to the shard of each sequence that retrieved it: (shard, (main key, rank, score,
    doc)), rank -1 marking the main document. A key without codes was rejected by the encode
    step already and is only counted; so are requests for it."""

    def __init__(self, vocab_url: str, seed: int, num_shards: int):
        super().__init__()
        self._vocab = SharedVocab(vocab_url)
        self.seed, self.num_shards = seed, num_shards

    def setup(self) -> None:
        self.vocab = self._vocab.load()
        self.documents = Metrics.counter(STAGE, "documents")
        self.no_codes = Metrics.counter(STAGE, "documents_without_codes")
        self.missing = Metrics.counter(STAGE, "neighbours_without_document")

    def process(self, item: tuple[str, dict[str, list]]) -> Iterator[tuple[int, tuple[str, int, float, Document]]]:
        key, groups = item
        doc = None
        if groups["meta"] and groups["codes"]:
            doc = make_document(self.vocab, groups["meta"][0], groups["codes"][0], self.seed)
            self.documents.inc()
            yield storage.stable_bucket(key, self.num_shards), (key, -1, 0.0, doc)
        elif groups["meta"]:
            self.no_codes.inc()
        for main_key, rank, score in groups["req"]:
            if doc is None:  # its image was rejected after the index was built (e.g. encode)
                self.missing.inc()
                continue
            yield storage.stable_bucket(main_key, self.num_shards), (main_key, rank, score, doc)


class _WriteTokenShard(beam.DoFn):
    """(shard, [(main key, rank, score, doc)]) -> the shard's sequences, sorted by key, written;
    emits the index entry, and documents too long to fit on the TOO_LONG output."""

    def __init__(self, vocab_url: str, cfg: TokensConfig, seed: int, tokens_dir: str, dtype: str):
        super().__init__()
        self._vocab = SharedVocab(vocab_url)
        self.cfg, self.seed, self.tokens_dir, self.dtype = cfg, seed, tokens_dir, dtype

    def setup(self) -> None:
        self.vocab = self._vocab.load()
        self.seen = Metrics.counter(STAGE, "in")
        self.kept = Metrics.counter(STAGE, "kept")
        self.too_long = Metrics.counter(STAGE, "rejected/SEQUENCE_TOO_LONG")
        self.dropped = Metrics.counter(STAGE, "neighbours_dropped_for_budget")

    def process(self, item: tuple[int, Iterable[tuple[str, int, float, Document]]]):
        shard, parts = item
        mains: dict[str, Document] = {}
        ranked: dict[str, list[tuple[int, float, Document]]] = {}
        for key, rank, score, doc in parts:
            if rank < 0:
                mains[key] = doc
            else:
                ranked.setdefault(key, []).append((rank, score, doc))
        built = build_sequences(self.vocab, self.cfg, self.seed, mains, ranked)
        self.seen.inc(len(mains))
        self.kept.inc(len(built.sequences))
        self.dropped.inc(built.dropped)
        for key, asset_id, detail in built.too_long:
            self.too_long.inc()
            yield beam.pvalue.TaggedOutput(TOO_LONG, (key, asset_id, detail))
        if built.sequences:
            yield write_token_shard(self.tokens_dir, shard, built.sequences, built.rows, self.dtype, self.cfg.webdataset)


@dataclass
class BuiltShard:
    sequences: list[np.ndarray]
    rows: list[dict[str, Any]]
    too_long: list[tuple[str, str, str]]  # (key, asset_id, detail)
    dropped: int  # neighbours left out to fit tokens.max_tokens


def build_sequences(vocab, cfg: TokensConfig, seed: int, mains: Mapping[str, Document],
                    ranked: Mapping[str, Sequence[tuple[int, float, Document]]]) -> BuiltShard:
    """One shard's sequences, sorted by key: each main document with the first `cfg.k` of its
    ranked (rank, score, document) candidates that fit the budget. The tokens step and a
    takedown (pipeline/takedown.py) build shards with this one function."""
    built = BuiltShard([], [], [], 0)
    for key in sorted(mains):
        main = mains[key]
        candidates = sorted(ranked.get(key, []), key=lambda n: n[0])
        chosen = fit_neighbours(main, [d for _, _, d in candidates], cfg.k, cfg.max_tokens)
        if chosen is None:
            built.too_long.append((key, main.asset_id, f"document alone is {sequence_length(main, [])} tokens "
                                   f"(caption {len(main.text)}, image {len(main.codes)}), tokens.max_tokens is "
                                   f"{cfg.max_tokens}"))
            continue
        built.dropped += min(len(candidates), cfg.k) - len(chosen)
        order = sequence_order(cfg, seed, key)
        built.sequences.append(assemble(vocab, main, chosen, order))
        built.rows.append(provenance_row(main, chosen, [s for _, s, _ in candidates[: len(chosen)]], order))
    return built


def write_token_shard(tokens_dir: str, shard: int, sequences: Sequence[np.ndarray], rows: Sequence[dict[str, Any]],
                      dtype: str, webdataset: bool) -> dict[str, Any]:
    """Encode shard `shard` and write each of its files atomically; returns its index entry
    plus `neighbour_counts` (sequences with 0, 1, ... neighbours), popped by the index writer."""
    files, entry = token_shards.encode_shard(shard, sequences, rows, np.dtype(dtype), webdataset)
    for name, data in files.items():
        storage.write_bytes(storage.join(tokens_dir, name), data)
    counts: dict[str, int] = {}
    for row in rows:
        n = str(len(row["asset_ids"]) - 1)
        counts[n] = counts.get(n, 0) + 1
    return {**entry, "neighbour_counts": counts}


NEIGHBOUR_HISTOGRAM = {"neighbour_counts": "sequences_with_neighbours"}


def write_tokens_index(tokens_dir: str, entries: list[dict[str, Any]], dtype: str, extra: dict[str, Any],
                       histograms: Mapping[str, str] = NEIGHBOUR_HISTOGRAM) -> dict[str, Any]:
    """`index.json` with every written shard, the totals and histograms summed over the shards
    (`histograms` maps a count field of the entries, popped, to its field in the index). A shard
    number that got no sequence (possible when there are few) has no files: Megatron cannot
    memory-map an empty `.bin`, so none is written."""
    totals: dict[str, dict[str, int]] = {target: {} for target in histograms.values()}
    for e in entries:
        for source, target in histograms.items():
            for n, c in e.pop(source).items():
                totals[target][n] = totals[target].get(n, 0) + c
    data = token_shards.tokens_index(entries, dtype=dtype, **{t: dict(sorted(h.items())) for t, h in totals.items()},
                                     **extra)
    storage.write_bytes(storage.join(tokens_dir, token_shards.INDEX_FILE), data)
    return json.loads(data)


class WriteTokenShards(beam.PTransform):
    """Curated metadata rows, (key, codes) pairs and neighbour rows -> `tokens/` (shards, provenance,
    index.json) and a JSONL of documents too long to fit (`too_long_url`), for the ledger."""

    def __init__(self, cfg: TokensConfig, vocab_url: str, tokens_dir: str, too_long_url: str, seed: int,
                 num_shards: int, dtype: str, index_extra: dict[str, Any], progress: Progress | None = None):
        super().__init__()
        self.cfg, self.vocab_url, self.tokens_dir, self.too_long_url = cfg, vocab_url, tokens_dir, too_long_url
        self.seed, self.num_shards, self.dtype, self.index_extra = seed, num_shards, dtype, index_extra
        self.progress = progress  # ticks per document: as each shard is written, its sequences (+ the too long)

    def expand(self, inputs: dict[str, beam.PCollection]):
        cfg, k = self.cfg, self.cfg.k
        meta = inputs["meta"] | "KeyMeta" >> beam.Map(lambda r: (r["key"], r))
        codes = inputs["codes"]  # (key, flat codes ndarray), see read_codes
        requests = inputs["neighbours"] | "Requests" >> beam.FlatMap(_requests, k)
        tokens_dir, n, dtype, extra = self.tokens_dir, self.num_shards, self.dtype, self.index_extra
        written = (
            {"meta": meta, "codes": codes, "req": requests}
            | "JoinByDocument" >> beam.CoGroupByKey()
            | "RouteDocuments" >> beam.ParDo(_RouteDocuments(self.vocab_url, self.seed, n))
            | "GroupByShard" >> beam.GroupByKey()
            | "WriteShards" >> beam.ParDo(_WriteTokenShard(self.vocab_url, cfg, self.seed, tokens_dir, dtype))
            .with_outputs(TOO_LONG, main="entries")
        )
        _ = (
            counted(written.entries, self.progress, weight=lambda entry: entry["sequences"])
            | "CollectIndex" >> beam.combiners.ToList()
            | "WriteIndex" >> beam.Map(lambda entries: write_tokens_index(tokens_dir, entries, dtype, extra))
        )
        too_long_url = self.too_long_url
        return (
            counted(written[TOO_LONG], self.progress, "ProgressTooLong")
            | "TooLongRows" >> beam.Map(lambda t: {"key": t[0], "reason": RejectReason.SEQUENCE_TOO_LONG.value,
                                                   "detail": t[2]})
            | "WriteTooLong" >> ledger.WriteChanges(too_long_url)
        )
