"""Reference trainer tokens/s through the shard reader vs the same model on random tokens already
in memory: does the data path ever starve the model?

One process, one torch thread, `num_workers=0` (the reader works in the training thread, so
every millisecond it takes shows up in the step time: the worst case), CM3 masking on. A
synthetic demo-sized shard set is written to a temp dir (2 neighbours + main document per
sequence, each a ~20-token caption and a 32x32 image: ~3,140 tokens; 2,048 text ids + 1,024 image
codes, the demo's vocabulary), then:

* trainer: `trainer.train.train_lm` (cpu-tiny, global batch --batch, every batch padded to one
  `seq_len`), step times from its train-log.jsonl (fetch + collate + forward + backward + step);
* bare loop: the same model, optimiser, loss and clipping on random [batch, seq_len] tokens
  prepared in memory before timing.

Same batch shape on both paths; the first step of each run is a warm-up and is not counted, a
run's time is its median step; the paths run --repeats times, interleaved, and the best counts.

    python benchmarks/train.py [--sequences 64] [--batch 2] [--steps 8] [--repeats 3]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from tokenizer.vocab import JointVocab
from trainer.config import TrainLMConfig
from trainer.dataset import TokenShardDataset, mask_overhead
from trainer.model import CM3LM, get_lm_config
from trainer.train import LOG, build_optimizer, train_lm, weighted_nll



def write_demo_sized_shards(out: str, sequences: int, shards: int = 2, seed: int = 0) -> JointVocab:
    """`sequences` CM3 sequences of ~3,140 tokens with the demo's 3,072-id vocabulary."""
    from reader import write_shards  # benchmarks/reader.py: this script runs from the same folder

    return write_shards(out, sequences, shards, seed, num_codes=1024, text_vocab_size=2048)


def trainer_seconds_per_step(tokens_dir: str, cfg: TrainLMConfig) -> float:
    """Median of the trainer's own step times (data included), first step excluded."""
    with tempfile.TemporaryDirectory() as out:
        train_lm(tokens_dir, out, cfg)
        rows = [json.loads(line) for line in Path(out, LOG).read_text().splitlines()]
    return float(np.median([r["tokens"] / r["tokens_per_s"] for r in rows[1:]]))


def bare_seconds_per_step(vocab_size: int, cfg: TrainLMConfig, seq_len: int) -> float:
    """Median step time of the same model, optimiser, loss and clipping on random tokens already in memory."""
    torch.manual_seed(cfg.seed)
    model = CM3LM(get_lm_config(cfg.model, vocab_size)).train()
    opt = build_optimizer(model, cfg)
    g = torch.Generator().manual_seed(1)
    shape = (cfg.global_batch_size, seq_len)
    batches = [{"tokens": torch.randint(0, vocab_size, shape, generator=g), "loss_mask": torch.ones(shape),
                "position_ids": torch.arange(seq_len).expand(shape), "document_ids": torch.zeros(shape, dtype=torch.int64)}
               for _ in range(cfg.max_steps)]
    times = []
    for rows in batches:
        started = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        nll = weighted_nll(model, rows, packed=False)
        (nll / rows["loss_mask"][:, 1:].sum()).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        float(nll.detach())
        times.append(time.perf_counter() - started)
    return float(np.median(times[1:]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sequences", type=int, default=64)
    parser.add_argument("--batch", type=int, default=2, help="global batch size (one rank)")
    parser.add_argument("--steps", type=int, default=8, help="steps per run (the first is a warm-up)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory() as tokens:
        vocab = write_demo_sized_shards(tokens, args.sequences)
        dataset = TokenShardDataset(tokens)
        seq_len = int(dataset.lengths.max()) + mask_overhead(vocab, dataset.mask)  # every batch [batch, seq_len]
        cfg = TrainLMConfig(model="cpu-tiny", global_batch_size=args.batch, max_steps=args.steps, seq_len=seq_len,
                            eval_every=0, eval_batches=1, checkpoint_every=0, progress=False, num_threads=1)
        best = {"trainer": float("inf"), "bare": float("inf")}
        for _ in range(args.repeats):
            best["trainer"] = min(best["trainer"], trainer_seconds_per_step(tokens, cfg))
            best["bare"] = min(best["bare"], bare_seconds_per_step(vocab.size, dataclasses.replace(cfg), seq_len))

    positions = args.batch * seq_len
    mean_tokens = float(dataset.lengths.mean())
    print(f"model: cpu-tiny ({get_lm_config('cpu-tiny', vocab.size).num_parameters() / 1e6:.2f}M parameters)   "
          f"vocab: {vocab.size}   sequences: {args.sequences} x ~{mean_tokens:,.0f} tokens   batch: {args.batch} x "
          f"{seq_len}   torch threads: 1   num_workers: 0   CM3 masking: on   cpu cores: {os.cpu_count()}")
    for name, label in (("bare", "bare loop, random tokens in memory"), ("trainer", "trainer through ShardLoader")):
        print(f"{label:36s}: {best[name]:6.2f} s/step   {positions / best[name]:8,.0f} positions/s")
    print(f"ratio trainer / bare loop: {best['bare'] / best['trainer']:.3f}   (target >= 0.9)")


if __name__ == "__main__":
    main()
