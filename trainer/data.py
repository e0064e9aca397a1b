"""Reader of the token shards (`OUT/tokens/`) for training; the format is in docs/shards.md.

Three parts, so that the order of the data never depends on how it is fetched:

* `TokenShardDataset` (`trainer.dataset`), map-style: item `(epoch, index)` -> one sequence,
  CM3-masked as a pure function of (seed, epoch, key). `.bin` files are memory-mapped locally
  and read by byte range elsewhere (any fsspec URL), opened lazily in each process.
* `GlobalBatchSampler`, in the main process: a permutation of (seed, epoch) cut into global
  batches, of which each rank takes its contiguous slice (Megatron's data-parallel layout).
* `ShardLoader`: DataLoader + sampler + collation (`trainer.collate`: padding or packing,
  position/document ids, loss mask) with a `state_dict()` that resumes mid-epoch exactly, also
  on another world size.
"""

from __future__ import annotations

import logging
from typing import Any, Iterator

import numpy as np
from torch.utils.data import DataLoader, Sampler

from tokenizer.cm3 import MaskConfig
# the reader's documented API (docs/shards.md) is importable from here
from trainer.collate import Batch, Collate, document_attention_mask  # noqa: F401
from trainer.dataset import TokenShardDataset, mask_overhead, provenance  # noqa: F401

log = logging.getLogger(__name__)

STATE_FORMAT = "cm3curate-reader/1"


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
