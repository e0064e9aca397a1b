"""The map-style dataset over the token shards (`OUT/tokens/`; the format is in docs/shards.md):
`TokenShardDataset` (item `(epoch, index)` -> one sequence, CM3-masked as a pure function of
(seed, epoch, key)), the checks of each shard's `.idx` and provenance part against `index.json`,
and `provenance` (batch keys -> their `sequences.parquet` rows). `.bin` files are memory-mapped
locally and read by byte range elsewhere (any fsspec URL), opened lazily in each process.
The order (`GlobalBatchSampler`) and the loader are in `trainer.data`, collation in
`trainer.collate`.
"""

from __future__ import annotations

import hashlib
import logging
import os
from typing import TYPE_CHECKING, Any, Sequence

import fsspec
import numpy as np
from fsspec.implementations.local import LocalFileSystem
from torch.utils.data import Dataset

from tokenizer.cm3 import MaskConfig, apply_mask, choose_spans, mask_rng
from tokenizer.shards import is_heldout
from tokenizer.token_shards import SEQUENCES_DIR, load_tokens_index, parse_index
from tokenizer.vocab import JointVocab

if TYPE_CHECKING:
    import pyarrow as pa

log = logging.getLogger(__name__)


def document_key(key: str) -> str:
    """The curated document a sequence key belongs to: the key itself in `tokens/`, the part
    before the first `-` for SFT examples (`{key}-{task}-{copy}`); curated keys are hex, without
    `-`. The held-out split is taken on it, so every copy and task of a document falls on the
    same side."""
    return key.split("-", 1)[0]


SPLITS = (None, "train", "heldout")  # heldout: tokenizer.shards.is_heldout(key), the split every tool uses


def mask_overhead(vocab: JointVocab, mask: MaskConfig | None) -> int:
    """Tokens CM3 masking may add to a sequence: 2 per span (`<mask:i>` in place and at the end)."""
    return 0 if mask is None else 2 * min(mask.max_spans, len(vocab.mask_ids))


class TokenShardDataset(Dataset):
    """Map-style dataset over a `tokens/` folder: item `(epoch, index)` (or a bare `index`, epoch 0)
    -> `{"index", "epoch", "key", "tokens", "answer_start", "source"}`.

    `split` keeps all sequences (None), or those whose key `tokenizer.shards.is_heldout` puts in
    "heldout" (10 %) or not ("train"): a pure function of the key, so every tool agrees; `index`
    then counts inside the split. Only numpy arrays and one path per shard live on the object,
    never a Python object per sequence, so forked DataLoader workers keep sharing its pages
    (copy-on-write does not grow).
    """

    def __init__(self, tokens_dir: str, *, seed: int = 0, mask: MaskConfig | None = MaskConfig(),
                 split: str | None = None):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        self.tokens_dir = tokens_dir.rstrip("/")
        self.seed = int(seed)
        self.mask = mask
        self.split = split
        index, self.index_sha256 = load_tokens_index(self.tokens_dir)
        self.vocab = JointVocab.load(f"{self.tokens_dir}/vocab.json", with_text=False)
        fs, root = fsspec.core.url_to_fs(self.tokens_dir)
        self._local = isinstance(fs, LocalFileSystem)
        shards = sorted(index["shards"], key=lambda s: s["shard"])
        self._bin_paths = tuple(f"{root}/{s['name']}.bin" for s in shards)
        self.shard_numbers = np.array([s["shard"] for s in shards], dtype=np.int64)
        lengths, offsets, keys, answers = [], [], [], []
        for entry in shards:
            shard = _read_shard_index(fs, root, entry, self.vocab.dtype)
            lengths.append(shard.lengths.astype(np.int64))
            offsets.append(shard.pointers // self.vocab.dtype.itemsize)
            shard_keys, shard_answers = _read_keys(fs, root, entry["shard"], shard.lengths)
            keys.append(shard_keys)
            answers.append(shard_answers)
        counts = np.array([len(x) for x in lengths], dtype=np.int64)
        self.lengths = np.concatenate(lengths) if lengths else np.zeros(0, np.int64)
        self.offsets = np.concatenate(offsets) if offsets else np.zeros(0, np.int64)  # in tokens, into the shard's .bin
        self.shard_of = np.repeat(np.arange(len(shards), dtype=np.int32), counts)  # position in self._bin_paths
        self.keys = np.concatenate(keys) if keys else np.zeros(0, "S1")  # fixed-width bytes, not a list of str
        # SFT shard sets: the offset where each sequence's answer begins (no loss before it); None when absent
        self.answer_starts = None
        if any(a is not None for a in answers):
            self.answer_starts = np.concatenate([np.zeros(len(k), np.int32) if a is None else a
                                                 for k, a in zip(keys, answers)])
        if len(self.lengths) != index["sequences"]:
            raise ValueError(f"{self.tokens_dir}: index.json counts {index['sequences']} sequences, "
                             f"the .idx files {len(self.lengths)}")
        if split is not None:
            keep = np.fromiter((is_heldout(document_key(k.decode())) for k in self.keys), dtype=bool, count=len(self.keys))
            keep = keep if split == "heldout" else ~keep
            self.lengths, self.offsets, self.shard_of, self.keys = (a[keep] for a in (self.lengths, self.offsets,
                                                                                      self.shard_of, self.keys))
            self.answer_starts = None if self.answer_starts is None else self.answer_starts[keep]
            counts = np.bincount(self.shard_of, minlength=len(shards)).astype(np.int64)
        self.first_index = (np.cumsum(counts) - counts).astype(np.int64)  # index of each shard's first sequence
        self._pid: int | None = None
        self._fs: fsspec.AbstractFileSystem | None = None
        self._bins: list[np.ndarray | None] = []
        log.info("token shards %s%s: %d shards, %d sequences, %d tokens, index sha256 %s", self.tokens_dir,
                 f" ({split})" if split else "", len(shards), len(self.lengths), int(self.lengths.sum()),
                 self.index_sha256[:12])

    def __len__(self) -> int:
        return len(self.lengths)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.update(_pid=None, _fs=None, _bins=[])  # open handles never travel to another process
        return state

    # reading -------------------------------------------------------------------------------
    def _reopen_if_forked(self) -> None:
        """Memmaps and filesystem clients belong to one process: reopen them in each worker."""
        if self._pid != os.getpid():
            self._fs = fsspec.core.url_to_fs(self.tokens_dir)[0]
            self._bins = [None] * len(self._bin_paths)
            self._pid = os.getpid()

    def _memmap(self, shard: int) -> np.ndarray:
        mm = self._bins[shard]
        if mm is None:
            path = self._bin_paths[shard]
            # a plain read-only ndarray over the map: slicing it skips np.memmap's per-slice bookkeeping
            mm = np.memmap(path, dtype=self.vocab.dtype, mode="r").view(np.ndarray) if os.path.getsize(path) \
                else np.zeros(0, self.vocab.dtype)
            self._bins[shard] = mm
        return mm

    def raw_tokens(self, indices: Sequence[int]) -> list[np.ndarray]:
        """The stored (unmasked) tokens of `indices`, read-only, in the vocab dtype: views of the
        memory map locally (no copy), one batched `cat_ranges` request per call on object stores."""
        self._reopen_if_forked()
        idx = np.asarray(indices, dtype=np.int64)
        shards, starts, lengths = self.shard_of[idx], self.offsets[idx], self.lengths[idx]
        if self._local:
            return [self._memmap(s)[a : a + n] for s, a, n in zip(shards.tolist(), starts.tolist(), lengths.tolist())]
        size = self.vocab.dtype.itemsize
        blobs = self._fs.cat_ranges([self._bin_paths[s] for s in shards.tolist()], (starts * size).tolist(),
                                    ((starts + lengths) * size).tolist())
        out = []
        for blob, n in zip(blobs, lengths.tolist()):
            if isinstance(blob, Exception):
                raise blob
            if len(blob) != n * size:
                raise OSError(f"{self.tokens_dir}: short read ({len(blob)} of {n * size} bytes)")
            out.append(np.frombuffer(blob, dtype=self.vocab.dtype))
        return out

    def key(self, index: int) -> str:
        return self.keys[index].decode()

    def __getitems__(self, items: Sequence[tuple[int, int] | int]) -> list[dict[str, Any]]:
        """A whole batch at once (the DataLoader calls this with a batch sampler)."""
        pairs = [(int(i[0]), int(i[1])) if isinstance(i, (tuple, list)) else (0, int(i)) for i in items]
        raws = self.raw_tokens([i for _, i in pairs])
        out = []
        for (epoch, index), tokens in zip(pairs, raws):
            key = self.key(index)
            answer_start = 0 if self.answer_starts is None else int(self.answer_starts[index])
            source = None  # stored position of each returned token (-1: sentinel), only when needed
            if self.mask is not None:
                spans = choose_spans(tokens, self.vocab, mask_rng(self.seed, epoch, key), self.mask)  # = cm3_mask
                if answer_start:
                    source = masked_source_positions(len(tokens), spans, len(tokens) > 0 and
                                                     int(tokens[-1]) == self.vocab.eos_id)
                tokens = apply_mask(tokens, spans, self.vocab)
            out.append({"index": index, "epoch": epoch, "key": key, "tokens": tokens, "answer_start": answer_start,
                        "source": source})
        return out

    def __getitem__(self, item: tuple[int, int] | int) -> dict[str, Any]:
        return self.__getitems__([item])[0]


def _read_shard_index(fs: fsspec.AbstractFileSystem, root: str, entry: dict[str, Any], dtype: np.dtype):
    """Parse one `.idx` and check it against its `index.json` entry (sha256, counts, dtype)."""
    data = fs.cat_file(f"{root}/{entry['name']}.idx")
    if hashlib.sha256(data).hexdigest() != entry["idx_sha256"]:
        raise ValueError(f"{entry['name']}.idx does not match the sha256 in index.json")
    shard = parse_index(data)
    if shard.dtype != dtype:
        raise ValueError(f"{entry['name']}.idx holds {shard.dtype}, vocab.json says {dtype}")
    if len(shard) != entry["sequences"] or int(shard.lengths.sum()) != entry["tokens"]:
        raise ValueError(f"{entry['name']}.idx disagrees with index.json on sequence or token counts")
    return shard


def masked_source_positions(n: int, spans: Sequence[tuple[int, int]], has_eos: bool) -> np.ndarray:
    """For each token of `tokenizer.cm3.apply_mask(ids, spans)` (ids of length n), the position in
    `ids` it came from, -1 for a `<mask:i>` sentinel: maps stored offsets such as `answer_start`
    into the masked sequence."""
    body = n - 1 if has_eos else n
    head: list[np.ndarray] = []
    tail: list[np.ndarray] = []
    pos = 0
    for start, end in spans:
        head += [np.arange(pos, start), np.array([-1])]
        tail += [np.array([-1]), np.arange(start, end)]
        pos = end
    pieces = head + [np.arange(pos, body)] + tail + ([np.array([n - 1])] if has_eos else [])
    return np.concatenate(pieces).astype(np.int64)


def _read_keys(fs: fsspec.AbstractFileSystem, root: str, shard: int,
               lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """The keys of one shard in `.bin` order, from its provenance part, as fixed-width bytes, and
    its optional `answer_start` column (int32; None when the part has none)."""
    import pyarrow.parquet as pq

    path = f"{root}/{SEQUENCES_DIR}/part-{shard:06d}.parquet"
    with fs.open(path, "rb") as handle:
        parquet = pq.ParquetFile(handle)
        optional = ["answer_start"] if "answer_start" in parquet.schema_arrow.names else []
        columns = ["key", "index", "num_tokens", *optional]
        table = parquet.read(columns=columns)
    order = np.argsort(table.column("index").to_numpy())
    position = table.column("index").to_numpy()[order]
    if not np.array_equal(position, np.arange(len(lengths))):
        raise ValueError(f"{path}: rows do not cover sequence positions 0..{len(lengths) - 1} once each")
    if not np.array_equal(table.column("num_tokens").to_numpy()[order], lengths):
        raise ValueError(f"{path}: num_tokens disagree with the .idx lengths")
    keys = table.column("key").to_numpy(zero_copy_only=False)[order]
    answers = None
    if "answer_start" in table.column_names:
        answers = table.column("answer_start").fill_null(0).to_numpy().astype(np.int32)[order]
        if np.any(answers < 0) or np.any(answers > lengths):
            raise ValueError(f"{path}: answer_start outside 0..num_tokens")
    return (np.array([k.encode() for k in keys], dtype="S") if len(keys) else np.zeros(0, "S1")), answers


# provenance --------------------------------------------------------------------------------
def provenance(tokens_dir: str, keys: Sequence[str]) -> "pa.Table":
    """The `sequences.parquet` rows (a pyarrow Table) of `keys`, in that order: batch -> assets,
    roles and licenses. A key that is not in the shard set is an error, not a missing row."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    fs, root = fsspec.core.url_to_fs(tokens_dir.rstrip("/"))
    wanted = pa.array(list(keys), type=pa.string())
    tables = []
    for part in sorted(fs.glob(f"{root}/{SEQUENCES_DIR}/part-*.parquet")):
        with fs.open(part, "rb") as handle:
            tables.append(pq.read_table(handle, filters=pc.field("key").isin(wanted)))
    if not tables:
        raise FileNotFoundError(f"no {SEQUENCES_DIR}/part-*.parquet under {tokens_dir}")
    table = pa.concat_tables(tables)
    rows = pc.index_in(wanted, value_set=table.column("key"))
    if rows.null_count:
        missing = [k for k, r in zip(keys, rows.to_pylist()) if r is None]
        raise KeyError(f"keys not in {tokens_dir}/{SEQUENCES_DIR}: {missing[:5]}")
    return table.take(rows)
