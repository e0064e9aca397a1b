"""Shard reader throughput (tokens/s) vs a raw np.memmap read of the same tokens in the same order.

One core (torch.set_num_threads(1), num_workers=0), one process, one run. A synthetic shard set
is written to a temp dir with `encode_shard` (CM3leon-sized: 2,000 sequences of 2 neighbours +
main document, each a ~20-token caption and a 32x32 image, ~3,200 uint16 tokens per sequence,
64,512-id vocabulary), then every path reads one whole epoch in the loader's order (the same
global batches); each path runs --repeats times, interleaved, and the best time counts.

    python benchmarks/reader.py [--sequences 2000] [--batch 32] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from pipeline.storage import write_bytes
from tokenizer.cm3 import CM3Format, build_document, build_sequence
from tokenizer.text import train_bpe
from tokenizer.token_shards import encode_shard, parse_index, tokens_index
from tokenizer.vocab import JointVocab
from trainer.data import ShardLoader

ROOT = Path(__file__).resolve().parents[1]
COCO = ROOT / "manifests" / "demo" / "coco.jsonl"


def write_shards(out: str, sequences: int, shards: int = 4, seed: int = 0, num_codes: int = 8192,
                 text_vocab_size: int = 56_320) -> JointVocab:
    """`sequences` CM3 sequences (2 neighbours + main, ~20-token captions, 32 x 32 images) in
    `shards` shards + vocab.json + index.json under `out`; also used by benchmarks/train.py."""
    captions = [c for line in COCO.read_text().splitlines() if line.strip() for c in json.loads(line)["captions"]]
    train_bpe(captions, vocab_size=1000, out_path=f"{out}/text-bpe.json")
    vocab = JointVocab.from_components(f"{out}/text-bpe.json", num_image_codes=num_codes, text_vocab_size=text_vocab_size)
    vocab.save(f"{out}/vocab.json")
    rng = np.random.default_rng(seed)
    first_text = 6 + len(vocab.mask_ids)
    entries = []
    for shard in range(shards):
        seqs, rows = [], []
        for i in range(shard, sequences, shards):
            docs = [build_document(vocab, rng.integers(first_text, vocab.bpe_size, int(rng.integers(10, 30))),
                                   rng.integers(0, num_codes, (32, 32)), CM3Format()) for _ in range(3)]
            seqs.append(build_sequence(vocab, docs[:2], docs[2]))
            rows.append({"key": f"{i:016x}", "main_asset_id": f"bench-{i}", "asset_ids": [f"bench-{i}"]})
        files, entry = encode_shard(shard, seqs, rows, vocab.dtype)
        for name, data in files.items():
            write_bytes(f"{out}/{name}", data)
        entries.append(entry)
    write_bytes(f"{out}/index.json", tokens_index(entries, dtype=vocab.dtype.name))
    return vocab


def raw_read(out: str, loader: ShardLoader, pad_id: int, batched: bool) -> Callable[[], int]:
    """The floor: np.memmap slices in the loader's order, copied out (`batched`: into an int64
    [B, longest] padded tensor per batch, what nanoGPT's get_batch does)."""
    index = json.loads(Path(out, "index.json").read_text())
    maps, starts, lengths, shard_of = [], [], [], []
    for k, entry in enumerate(index["shards"]):
        idx = parse_index(Path(out, f"{entry['name']}.idx").read_bytes())
        maps.append(np.memmap(Path(out, f"{entry['name']}.bin"), dtype=idx.dtype, mode="r"))
        starts.append(idx.pointers // idx.dtype.itemsize)
        lengths.append(idx.lengths)
        shard_of.append(np.full(len(idx), k))
    starts, lengths, shard_of = np.concatenate(starts), np.concatenate(lengths), np.concatenate(shard_of)
    sampler = loader.sampler
    batches = [sampler.order(epoch)[start:stop] for epoch, start, stop in sampler.global_batches()]

    def run() -> int:
        total = 0
        for batch in batches:
            if batched:
                out_batch = np.full((len(batch), int(lengths[batch].max())), pad_id, dtype=np.int64)
            for j, i in enumerate(batch.tolist()):
                a, n = int(starts[i]), int(lengths[i])
                if batched:
                    out_batch[j, :n] = maps[shard_of[i]][a : a + n]
                else:
                    np.array(maps[shard_of[i]][a : a + n])
                total += n
            if batched:
                torch.from_numpy(out_batch)
        return total

    return run


def through_loader(loader: ShardLoader) -> Callable[[], int]:
    def run() -> int:
        loader.load_state_dict({**loader.state_dict(), "epoch": 0, "consumed_samples": 0})
        return sum(int(batch["lengths"].sum()) for batch in loader)

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sequences", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=32, help="global batch size (one rank)")
    parser.add_argument("--seq-len", type=int, default=8192, help="row length when packing")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory() as out:
        vocab = write_shards(out, args.sequences)
        loaders = {
            "reader, no masking, padded": ShardLoader(out, args.batch, seed=1, mask=None),
            "reader, CM3 masking, padded": ShardLoader(out, args.batch, seed=1),
            "reader, no masking, packed": ShardLoader(out, args.batch, seed=1, mask=None, pack=True, seq_len=args.seq_len),
            "reader, CM3 masking, packed": ShardLoader(out, args.batch, seed=1, pack=True, seq_len=args.seq_len),
        }
        reference = next(iter(loaders.values()))
        paths = {"raw np.memmap read": raw_read(out, reference, vocab.pad_id, batched=False),
                 "raw read into padded int64 batches": raw_read(out, reference, vocab.pad_id, batched=True),
                 **{name: through_loader(loader) for name, loader in loaders.items()}}
        best: dict[str, float] = {}
        tokens = {name: run() for name, run in paths.items()}  # warm-up: page cache, first memmaps
        assert len(set(tokens.values())) == 2, tokens  # masked paths read 2 more tokens per span
        for _ in range(args.repeats):
            for name, run in paths.items():
                started = time.perf_counter()
                run()
                best[name] = min(best.get(name, float("inf")), time.perf_counter() - started)

    rate = {name: tokens[name] / best[name] for name in paths}
    raw, floor = rate["raw np.memmap read"], rate["raw read into padded int64 batches"]
    print(f"sequences: {args.sequences}   tokens: {tokens['raw np.memmap read']:,}   global batch: {args.batch}   "
          f"torch threads: 1   num_workers: 0   cpu cores: {os.cpu_count()}")
    for name in paths:
        print(f"{name:36s}: {rate[name] / 1e6:8.1f} M tokens/s   ratio vs raw read {rate[name] / raw:5.2f}   "
              f"vs padded int64 floor {rate[name] / floor:5.2f}")
    print(f"ratio reader (no masking, padded) / raw read: {rate['reader, no masking, padded'] / raw:.2f}   (target >= 0.5)")


if __name__ == "__main__":
    main()
