"""Collation of token-shard samples into training batches (`Batch`): padding or first-fit
packing, position and document ids, the loss mask (no loss on CM3 sentinels, across documents,
on padding or before an SFT answer), and `document_attention_mask` for packed rows.
"""

from __future__ import annotations

from typing import Any, Sequence, TypedDict

import numpy as np
import torch

PAD_DOCUMENT = -1  # document id of padding positions


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
