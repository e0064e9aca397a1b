"""Reader of the token shards (`OUT/tokens/`) for training; the format is in docs/shards.md.

Three parts, so that the order of the data never depends on how it is fetched:

* `TokenShardDataset`, map-style: item `(epoch, index)` -> one sequence, CM3-masked as a pure
  function of (seed, epoch, key). `.bin` files are memory-mapped locally and read by byte range
  elsewhere (any fsspec URL), opened lazily in each process.
* `GlobalBatchSampler`, in the main process: a permutation of (seed, epoch) cut into global
  batches, of which each rank takes its contiguous slice (Megatron's data-parallel layout).
* `ShardLoader`: DataLoader + sampler + collation (padding or packing, position/document ids,
  loss mask) with a `state_dict()` that resumes mid-epoch exactly, also on another world size.
"""

from __future__ import annotations

import hashlib
import logging
import os
from typing import TYPE_CHECKING, Any, Iterator, Sequence, TypedDict

import fsspec
import numpy as np
import torch
from fsspec.implementations.local import LocalFileSystem
from torch.utils.data import DataLoader, Dataset, Sampler

from tokenizer.cm3 import MaskConfig, apply_mask, choose_spans, mask_rng
from tokenizer.shards import is_heldout
from tokenizer.token_shards import SEQUENCES_DIR, load_tokens_index, parse_index
from tokenizer.vocab import JointVocab

if TYPE_CHECKING:
    import pyarrow as pa

log = logging.getLogger(__name__)

STATE_FORMAT = "cm3curate-reader/1"
PAD_DOCUMENT = -1  # document id of padding positions
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


# order -------------------------------------------------------------------------------------
class GlobalBatchSampler(Sampler[list[tuple[int, int]]]):
    """This rank's slice of every global batch, as lists of `(epoch, index)`.

    The epoch's order is `np.random.default_rng([seed, epoch]).permutation(n)`: it depends on
    nothing else, so any world size and any worker count see the same global batches. Global
    batch b is order[b*G : (b+1)*G]; rank r of W takes its contiguous share of it; the last,
    partial global batch is split as evenly as possible (a rank may get an empty batch, so every
    rank still takes the same number of steps) or dropped with `drop_last`.
    Iteration starts at `epoch` / `consumed_samples` and ends with the epoch.
    """

    def __init__(self, num_samples: int, global_batch_size: int, *, rank: int = 0, world_size: int = 1,
                 seed: int = 0, drop_last: bool = False):
        if global_batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need global_batch_size >= 1 and 0 <= rank < world_size "
                             f"(got {global_batch_size}, {rank}, {world_size})")
        if global_batch_size % world_size:
            raise ValueError(f"global batch {global_batch_size} does not split evenly over world size {world_size}")
        if drop_last and num_samples < global_batch_size:
            raise ValueError(f"drop_last with {num_samples} sequences < global batch {global_batch_size} leaves nothing")
        self.num_samples, self.global_batch_size = int(num_samples), int(global_batch_size)
        self.rank, self.world_size, self.seed, self.drop_last = rank, world_size, int(seed), drop_last
        self.epoch, self.consumed_samples = 0, 0
        self._cached: tuple[int, np.ndarray] | None = None

    @property
    def samples_per_epoch(self) -> int:
        return self.num_samples - (self.num_samples % self.global_batch_size if self.drop_last else 0)

    def order(self, epoch: int) -> np.ndarray:
        """The epoch's global order (int64 [n]); a pure function of (seed, epoch)."""
        if self._cached is None or self._cached[0] != epoch:
            self._cached = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.num_samples))
        return self._cached[1]

    def rank_slice(self, size: int) -> tuple[int, int]:
        """[lo, hi) of this rank inside a global batch of `size` sequences."""
        base, extra = divmod(size, self.world_size)
        lo = self.rank * base + min(self.rank, extra)
        return lo, lo + base + (self.rank < extra)

    def global_batches(self) -> Iterator[tuple[int, int, int]]:
        """(epoch, start, stop) of each global batch still to come in the current epoch."""
        epoch, first, end = self.epoch, self.consumed_samples, self.samples_per_epoch  # fixed at the first step
        for start in range(first, end, self.global_batch_size):
            yield epoch, start, min(start + self.global_batch_size, end)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for epoch, start, stop in self.global_batches():
            lo, hi = self.rank_slice(stop - start)
            yield [(epoch, i) for i in self.order(epoch)[start + lo : start + hi].tolist()]

    def __len__(self) -> int:
        return -(-(self.samples_per_epoch - self.consumed_samples) // self.global_batch_size)


# batches -----------------------------------------------------------------------------------
class Batch(TypedDict):
    """What the loader hands to the training loop (tensors are on CPU)."""

    tokens: torch.Tensor  # int64 [rows, L]
    position_ids: torch.Tensor  # int64 [rows, L], 0 at each document's first token
    document_ids: torch.Tensor  # int64 [rows, L], 0, 1, ... per row; PAD_DOCUMENT (-1) on padding
    loss_mask: torch.Tensor  # float32 [rows, L]: weight of predicting token t from tokens < t
    keys: list[str]  # per sequence, in sampler order
    indices: torch.Tensor  # int64 [sequences]: global index (shard order) of each sequence
    rows: torch.Tensor  # int64 [sequences]: the row holding each sequence
    starts: torch.Tensor  # int64 [sequences]: its first column in that row
    lengths: torch.Tensor  # int64 [sequences]: its length (after masking)
    epoch: int  # -1 for an empty batch (a rank's share of a small last global batch)


class Collate:
    """Samples -> `Batch`: padded to the longest sequence (or `seq_len`), or packed first-fit in
    sampler order into rows of `seq_len`, whole sequences only. Runs in the worker that fetched
    the batch, so the result never depends on the number of workers. A sample with an
    `answer_start` (SFT shard sets) gets no loss on the tokens that came from before it."""

    def __init__(self, pad_id: int, mask_ids: Sequence[int], seq_len: int | None = None, pack: bool = False):
        if pack and not seq_len:
            raise ValueError("packing needs seq_len")
        self.pad_id, self.seq_len, self.pack = int(pad_id), seq_len, pack
        ids = np.asarray(sorted(mask_ids), dtype=np.int64)
        # sentinel ids are contiguous in our vocabularies: one range check instead of a set lookup
        self._mask_range = (int(ids[0]), int(ids[-1])) if len(ids) and ids[-1] - ids[0] == len(ids) - 1 else None
        self.mask_ids = ids

    def _place(self, lengths: list[int]) -> tuple[list[int], list[int], int, int]:
        """(row, start) per sequence, number of rows and row width."""
        if not self.pack:
            width = self.seq_len or max(lengths, default=0)
            if lengths and max(lengths) > width:
                raise ValueError(f"a sequence of {max(lengths)} tokens does not fit seq_len {width}")
            return list(range(len(lengths))), [0] * len(lengths), len(lengths), width
        rows_used: list[int] = []
        rows, starts = [], []
        for n in lengths:
            if n > self.seq_len:
                raise ValueError(f"a sequence of {n} tokens does not fit seq_len {self.seq_len}")
            row = next((r for r, used in enumerate(rows_used) if used + n <= self.seq_len), len(rows_used))
            if row == len(rows_used):
                rows_used.append(0)
            rows.append(row)
            starts.append(rows_used[row])
            rows_used[row] += n
        return rows, starts, len(rows_used), self.seq_len

    def __call__(self, samples: list[dict[str, Any]]) -> Batch:
        lengths = [len(s["tokens"]) for s in samples]
        rows, starts, num_rows, width = self._place(lengths)
        members: list[list[int]] = [[] for _ in range(num_rows)]
        for i, row in enumerate(rows):
            members[row].append(i)  # left to right: first fit appends to a row
        # the [rows, width] grid in row-major order is, per row, its sequences back to back and
        # then padding: build each field as one concatenation of pieces (one pass, no fill first)
        dtype = samples[0]["tokens"].dtype if samples else np.dtype(np.int64)
        pad = np.full(width, self.pad_id, dtype=dtype)
        arange, zeros = np.arange(width, dtype=np.int64), np.zeros(width, dtype=np.int64)
        token_pieces, position_pieces, document_values, counts = [], [], [], []
        firsts, pads = [], []  # grid offsets of each document's first token; (start, stop) of each row's padding
        prompts = []  # (grid offset, sample) of sequences with an answer_start (SFT): no loss before the answer
        for r, row in enumerate(members):
            used = 0
            for document, i in enumerate(row):
                n = lengths[i]
                token_pieces.append(samples[i]["tokens"])
                position_pieces.append(arange[:n])
                document_values.append(document)
                counts.append(n)
                if n:
                    firsts.append(r * width + used)
                if samples[i].get("answer_start"):
                    prompts.append((r * width + used, samples[i]))
                used += n
            if used < width:
                token_pieces.append(pad[: width - used])
                position_pieces.append(zeros[: width - used])
                document_values.append(PAD_DOCUMENT)
                counts.append(width - used)
                pads.append((r * width + used, (r + 1) * width))
        if not counts:
            token_pieces, position_pieces, document_values, counts = [pad[:0]], [zeros[:0]], [PAD_DOCUMENT], [0]
        grid = np.concatenate(token_pieces)
        tokens = grid.astype(np.int64).reshape(num_rows, width)
        positions = np.concatenate(position_pieces).reshape(num_rows, width)
        documents = np.repeat(np.asarray(document_values, dtype=np.int64), counts).reshape(num_rows, width)
        if self._mask_range is not None and grid.dtype.kind == "u":  # one wrapping comparison in the stored dtype
            lo, hi = self._mask_range
            weight = (grid - grid.dtype.type(lo)) > hi - lo
        else:
            weight = ~np.isin(grid, self.mask_ids)
        weight[np.asarray(firsts, dtype=np.int64)] = False  # not predictable from the previous document
        for start, stop in pads:
            weight[start:stop] = False
        for start, sample in prompts:
            source = sample.get("source")
            if source is None:  # unmasked: the prompt is the first answer_start tokens
                weight[start : start + sample["answer_start"]] = False
            else:  # CM3-masked: the tokens that came from the prompt, wherever masking moved them
                weight[start : start + len(source)] &= source >= sample["answer_start"]
        loss_mask = weight.astype(np.float32).reshape(num_rows, width)
        epochs = {s["epoch"] for s in samples}
        if len(epochs) > 1:
            raise ValueError(f"a batch mixes epochs {sorted(epochs)}")
        return {
            "tokens": torch.from_numpy(tokens),
            "position_ids": torch.from_numpy(positions),
            "document_ids": torch.from_numpy(documents),
            "loss_mask": torch.from_numpy(loss_mask),
            "keys": [s["key"] for s in samples],
            "indices": torch.tensor([s["index"] for s in samples], dtype=torch.int64),
            "rows": torch.tensor(rows, dtype=torch.int64),
            "starts": torch.tensor(starts, dtype=torch.int64),
            "lengths": torch.tensor(lengths, dtype=torch.int64),
            "epoch": epochs.pop() if epochs else -1,
        }


def document_attention_mask(document_ids: torch.Tensor) -> torch.Tensor:
    """bool [B, 1, L, L] for `torch.nn.functional.scaled_dot_product_attention(attn_mask=...)`:
    query i attends key j iff j <= i and both are in the same document, so packed documents
    never see each other. Padding (id -1) attends to earlier padding only, which keeps every row
    non-empty (an all-False row would give NaN)."""
    length = document_ids.shape[-1]
    causal = torch.ones(length, length, dtype=torch.bool, device=document_ids.device).tril()
    same = document_ids[:, :, None] == document_ids[:, None, :]
    return (same & causal)[:, None]


# the loader --------------------------------------------------------------------------------
class ShardLoader:
    """Batches for one data-parallel rank, resumable mid-epoch.

    One batch is this rank's share of one global batch (one optimiser step; split it into
    micro-batches yourself). Iterating yields the rest of the current epoch, then the state
    moves to the next epoch: `while loader.epoch < epochs: for batch in loader: ...`.
    `consumed_samples` counts sequences of the current epoch handed to the training loop over
    all ranks, updated when a batch is yielded, not when a worker prefetches it.
    """

    def __init__(self, tokens_dir: str, global_batch_size: int, *, rank: int = 0, world_size: int = 1, seed: int = 0,
                 drop_last: bool = False, mask: MaskConfig | None = MaskConfig(), pack: bool = False,
                 seq_len: int | None = None, num_workers: int = 0, prefetch_factor: int | None = None,
                 pin_memory: bool = False, persistent_workers: bool = False, multiprocessing_context: str | None = None,
                 split: str | None = None):
        self.dataset = TokenShardDataset(tokens_dir, seed=seed, mask=mask, split=split)
        vocab = self.dataset.vocab
        if seq_len is not None and len(self.dataset):
            longest = int(np.argmax(self.dataset.lengths))
            need = int(self.dataset.lengths[longest]) + mask_overhead(vocab, mask)
            if need > seq_len:
                raise ValueError(f"seq_len {seq_len} is too short: sequence {self.dataset.key(longest)!r} has "
                                 f"{int(self.dataset.lengths[longest])} tokens + up to {mask_overhead(vocab, mask)} "
                                 f"from CM3 masking = {need}; sequences are never cut")
        self.sampler = GlobalBatchSampler(len(self.dataset), global_batch_size, rank=rank, world_size=world_size,
                                          seed=seed, drop_last=drop_last)
        self.collate = Collate(vocab.pad_id, vocab.mask_ids, seq_len=seq_len, pack=pack)
        self.seed, self.mask, self.world_size = int(seed), mask, world_size
        self.dataloader = DataLoader(
            self.dataset, batch_sampler=self.sampler, collate_fn=self.collate, num_workers=num_workers,
            prefetch_factor=prefetch_factor if num_workers else None, pin_memory=pin_memory,
            persistent_workers=persistent_workers and num_workers > 0,
            multiprocessing_context=multiprocessing_context if num_workers else None,
        )

    @property
    def epoch(self) -> int:
        return self.sampler.epoch

    @property
    def consumed_samples(self) -> int:
        return self.sampler.consumed_samples

    def __len__(self) -> int:
        """Batches left in the current epoch."""
        return len(self.sampler)

    def __iter__(self) -> Iterator[Batch]:
        plan = self.sampler.global_batches()  # what the DataLoader is about to fetch, in order
        for (epoch, start, stop), batch in zip(plan, self.dataloader):
            lo, hi = self.sampler.rank_slice(stop - start)
            if not np.array_equal(batch["indices"].numpy(), self.sampler.order(epoch)[start + lo : start + hi]):
                raise RuntimeError("the DataLoader returned batches out of order")
            if stop >= self.sampler.samples_per_epoch:
                self.sampler.epoch, self.sampler.consumed_samples = epoch + 1, 0
            else:
                self.sampler.consumed_samples = stop
            yield batch

    # resume ------------------------------------------------------------------------------
    def _stream(self) -> dict[str, Any]:
        """What fixes the data stream: a resumed loader must agree on all of it."""
        mask = None if self.mask is None else {"poisson_lambda": self.mask.poisson_lambda, "max_spans": self.mask.max_spans}
        return {"index_sha256": self.dataset.index_sha256, "seed": self.seed,
                "global_batch_size": self.sampler.global_batch_size, "drop_last": self.sampler.drop_last, "mask": mask,
                "split": self.dataset.split}

    def state_dict(self) -> dict[str, Any]:
        """Plain JSON-able state; `world_size` is informational (resuming on another one is fine)."""
        return {"format": STATE_FORMAT, **self._stream(), "epoch": self.epoch,
                "consumed_samples": self.consumed_samples, "world_size": self.world_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue where `state` stopped; refuse, with the reason, anything that would not
        reproduce the same stream of sequences."""
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"not a {STATE_FORMAT} state (format {state.get('format')!r})")
        mine = self._stream()
        wrong = [f"{k}: checkpoint {state.get(k)!r} vs loader {v!r}" for k, v in mine.items() if state.get(k) != v]
        if wrong:
            raise ValueError("cannot resume on a different data stream: " + "; ".join(wrong))
        epoch, consumed = int(state["epoch"]), int(state["consumed_samples"])
        per_epoch, batch = self.sampler.samples_per_epoch, self.sampler.global_batch_size
        if epoch < 0 or not 0 <= consumed <= per_epoch:
            raise ValueError(f"consumed_samples {consumed} outside 0..{per_epoch} (epoch {epoch})")
        if consumed % batch and consumed != per_epoch:
            raise ValueError(f"consumed_samples {consumed} is not on a global batch boundary (global batch {batch})")
        if consumed == per_epoch:
            epoch, consumed = epoch + 1, 0
        self.sampler.epoch, self.sampler.consumed_samples = epoch, consumed
        if state.get("world_size") != self.world_size:
            log.info("resuming on world size %d (checkpoint: %s) at epoch %d, sample %d", self.world_size,
                     state.get("world_size"), epoch, consumed)


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
