"""Train the reference CM3 LM on token shards (`OUT/tokens/`): one process, or N under torchrun.

One loop, nanoGPT style. The reader (`trainer.data.ShardLoader`, the "train" split) hands each
rank its share of one global batch per step; the loss is next-token cross-entropy weighted by
the reader's `loss_mask` and divided by the weight of the whole global batch, so one process and
N DDP processes compute the same gradient. AdamW, linear warmup + cosine decay, gradient
clipping, bf16 autocast on CUDA (fp32 on CPU). A checkpoint is one safetensors file (weights,
AdamW moments, RNG states, reader state), written atomically, so a killed run resumes to
bit-identical weights on CPU. Held-out loss comes from the "heldout" split (a function of the key).

    python -m trainer.train --tokens OUT/tokens --out OUT/models/lm [--model cpu-tiny] [--max-steps N]
    torchrun --nproc_per_node 8 -m trainer.train --tokens ... --out ... --model cm3leon-350m ...
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import time
from contextlib import nullcontext
from typing import Any, Iterator, Sequence

import fsspec
import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm.auto import tqdm

from tokenizer.cm3 import MaskConfig
from tokenizer.shards import write_bytes_atomic
from trainer.checkpoint import (CHECKPOINT, check_resumable, gather_rng, read_checkpoint, restore_optimizer,
                                restore_rng, save_checkpoint, url_exists)
from trainer.collate import Batch
from trainer.config import TrainLMConfig, add_train_lm_flags, get_lm_config, train_lm_overrides
from trainer.data import ShardLoader
from trainer.model import CM3LM, save_lm
from trainer.ranks import Ranks, init_ranks, resolve_device

log = logging.getLogger(__name__)

LOG = "train-log.jsonl"


# schedule and loss -----------------------------------------------------------------------------
def lr_at(cfg: TrainLMConfig, step: int, elapsed_min: float) -> float:
    """Linear warmup, then cosine decay to lr * min_lr_ratio over `schedule_steps` (or over
    max_minutes of wall-clock when there is no step budget: then a resume is not bit-exact)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    horizon = cfg.schedule_steps
    if horizon:
        progress = (step - cfg.warmup_steps) / max(1, horizon - cfg.warmup_steps)
    else:
        progress = elapsed_min / cfg.max_minutes  # type: ignore[operator]
    progress = min(1.0, progress)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def build_optimizer(model: CM3LM, cfg: TrainLMConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices and embeddings, none on norm gains."""
    matrices = [p for p in model.parameters() if p.dim() >= 2]
    gains = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": matrices, "weight_decay": cfg.weight_decay}, {"params": gains, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas)


def weighted_nll(model: torch.nn.Module, rows: dict[str, torch.Tensor], packed: bool) -> torch.Tensor:
    """Sum over positions of loss_mask[t] * -log p(tokens[t] | tokens[<t]) (float32 scalar):
    inputs tokens[:, :-1], labels tokens[:, 1:], weights loss_mask[:, 1:]."""
    tokens = rows["tokens"]
    documents = rows["document_ids"][:, :-1] if packed else None  # padded rows: plain causal is exact
    logits = model(tokens[:, :-1], rows["position_ids"][:, :-1], documents)
    nll = F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten(), reduction="none")
    return (nll * rows["loss_mask"][:, 1:].flatten()).sum()


def micro_batches(batch: Batch, rows_per_micro: int | None, device: torch.device) -> list[dict[str, torch.Tensor]]:
    """The rank's batch cut into row chunks on `device`. An empty batch (a rank's share of a small
    last global batch) becomes one all-padding row of zero weight, so the rank still runs
    forward/backward and joins DDP's gradient all-reduce."""
    fields = ("tokens", "position_ids", "document_ids", "loss_mask")
    num_rows = batch["tokens"].shape[0]
    if num_rows == 0 or batch["tokens"].shape[1] < 2:
        empty = {"tokens": torch.zeros(1, 2, dtype=torch.int64), "position_ids": torch.zeros(1, 2, dtype=torch.int64),
                 "document_ids": torch.zeros(1, 2, dtype=torch.int64), "loss_mask": torch.zeros(1, 2)}
        return [{k: v.to(device) for k, v in empty.items()}]
    size = rows_per_micro or num_rows
    return [{k: batch[k][start : start + size].to(device, non_blocking=True)  # type: ignore[literal-required]
             for k in fields} for start in range(0, num_rows, size)]


# the loop --------------------------------------------------------------------------------------
def _endless(loader: ShardLoader) -> Iterator[Batch]:
    while True:
        yield from loader  # the rest of the current epoch; the loader then moves to the next one


def evaluate(model: CM3LM, loader: ShardLoader, cfg: TrainLMConfig, ranks: Ranks, device: torch.device,
             autocast: Any) -> float | None:
    """Weighted mean next-token loss over the first `eval_batches` (0: all) global batches of the
    held-out split (epoch 0: the same sequences and masking every time); None when it is empty."""
    loader.load_state_dict({**loader.state_dict(), "epoch": 0, "consumed_samples": 0})
    totals = torch.zeros(2, dtype=torch.float64, device=device)
    model.eval()
    with torch.no_grad():
        for i, batch in enumerate(loader):
            for rows in micro_batches(batch, cfg.micro_batch_size, device):
                with autocast():
                    totals[0] += weighted_nll(model, rows, cfg.pack).double()
                totals[1] += rows["loss_mask"][:, 1:].sum().double()
            if cfg.eval_batches and i + 1 == cfg.eval_batches:
                break  # every rank stops at the same global batch
    model.train()
    nll, weight = ranks.sum(totals).tolist()
    return nll / weight if weight > 0 else None


def _read_log(url: str, upto_step: int) -> list[dict[str, Any]]:
    if not url_exists(url):
        return []
    with fsspec.open(url, "rt") as handle:
        rows = [json.loads(line) for line in handle if line.strip()]
    return [r for r in rows if r["step"] <= upto_step]


def train_lm(tokens_dir: str, out_dir: str, cfg: TrainLMConfig = TrainLMConfig()) -> dict[str, Any]:
    """Train (or resume) the reference LM on `tokens_dir`; writes `out_dir/lm.safetensors` + `lm.json`
    (load with `trainer.model.load_lm`), the resumable `lm-train.safetensors` and `train-log.jsonl`.

    Under torchrun every rank calls this with the same arguments; rank 0 writes. Returns numbers
    (steps, losses, eval loss, tokens/s, checkpoint path), the same on every rank.
    """
    out = out_dir.rstrip("/")
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    device = resolve_device(cfg)
    ranks = init_ranks(device.type)
    device = resolve_device(cfg, ranks.local_rank)
    ranks = dataclasses.replace(ranks, device=device)
    try:
        return _train(tokens_dir, out, cfg, ranks, device)
    finally:
        if ranks.owns_group:
            dist.destroy_process_group()


def _train(tokens_dir: str, out: str, cfg: TrainLMConfig, ranks: Ranks, device: torch.device) -> dict[str, Any]:
    writer = ranks.rank == 0
    mask = MaskConfig() if cfg.mask else None
    stream = dict(rank=ranks.rank, world_size=ranks.world_size, seed=cfg.seed, mask=mask, pack=cfg.pack,
                  seq_len=cfg.seq_len)
    loader = ShardLoader(tokens_dir, cfg.global_batch_size, split="train", num_workers=cfg.num_workers,
                         pin_memory=device.type == "cuda", persistent_workers=cfg.num_workers > 0, **stream)
    if len(loader.dataset) == 0:
        raise ValueError(f"{tokens_dir}: no sequences in the train split")
    heldout = ShardLoader(tokens_dir, cfg.global_batch_size, split="heldout", **stream)
    lm_cfg = get_lm_config(cfg.model, loader.dataset.vocab.size)
    use_bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if use_bf16 else nullcontext

    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    model = CM3LM(lm_cfg).to(device).train()
    torch.manual_seed(cfg.seed * 1_000_003 + ranks.rank)  # dropout (if any) differs per rank
    opt = build_optimizer(model, cfg)

    checkpoint_url, log_url = f"{out}/{CHECKPOINT}", f"{out}/{LOG}"
    step, elapsed_before, history = 0, 0.0, []
    if url_exists(checkpoint_url):
        if not cfg.resume:
            raise ValueError(f"{out} holds a checkpoint and resume is off: use a new output folder")
        tensors, meta = read_checkpoint(checkpoint_url)
        check_resumable(meta, cfg, lm_cfg, checkpoint_url)
        model.load_state_dict({k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")})
        restore_optimizer(opt, tensors, meta["param_groups"])
        restore_rng(tensors, meta, ranks, device)
        loader.load_state_dict(meta["reader"])
        step, elapsed_before = int(meta["step"]), float(meta["elapsed_s"])
        history = _read_log(log_url, step)  # rows logged after the checkpoint belong to the lost steps
        log.info("resuming %s at step %d (epoch %d, %.1f min trained)", out, step, loader.epoch, elapsed_before / 60)
    start_step = saved_at = step
    net: torch.nn.Module = model
    if ranks.world_size > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if writer:
        fs, root = fsspec.core.url_to_fs(out)
        fs.makedirs(root, exist_ok=True)
        write_bytes_atomic(log_url, "".join(json.dumps(r) + "\n" for r in history).encode())
        log.info("training %s (%.2fM parameters) on %s, %d rank(s), global batch %d, %s", lm_cfg.name,
                 lm_cfg.num_parameters() / 1e6, device, ranks.world_size, cfg.global_batch_size,
                 "bf16 autocast" if use_bf16 else "fp32")

    def checkpoint() -> None:
        nonlocal saved_at
        saved_at = step
        rng = gather_rng(ranks, device)  # every rank takes part
        if writer:
            np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
            meta = {"step": step, "elapsed_s": elapsed, "seed": cfg.seed, "world_size": ranks.world_size,
                    "train": cfg.to_dict(), "lm": lm_cfg.to_dict(), "reader": loader.state_dict(),
                    "numpy_rng": [np_kind, np_keys.tolist(), np_pos, np_has_gauss, np_gauss]}
            save_checkpoint(checkpoint_url, model, opt, meta, rng)
            save_lm(model, out, {"step": step, "train": cfg.to_dict(), "tokens_dir": tokens_dir})

    def out_of_budget() -> bool:
        done = cfg.max_steps is not None and step >= cfg.max_steps
        if cfg.max_minutes is not None:
            flag = torch.tensor([float(done or elapsed >= cfg.max_minutes * 60)])
            done = bool(ranks.sum(flag).item() > 0)  # every rank stops at the same step
        return done

    t_start = time.perf_counter()
    elapsed = elapsed_before
    step_seconds, step_tokens = 0.0, 0
    eval_loss, evaluated_at = None, None
    batches = _endless(loader)
    bar = tqdm(total=cfg.max_steps, initial=step, disable=not (cfg.progress and writer), desc="train-lm", unit="step")
    while not out_of_budget():
        t0 = time.perf_counter()
        lr = lr_at(cfg, step, elapsed / 60)
        for group in opt.param_groups:
            group["lr"] = lr
        batch = next(batches)
        rows = micro_batches(batch, cfg.micro_batch_size, device)
        local = torch.tensor([float(batch["loss_mask"][:, 1:].sum()), float(batch["lengths"].sum())], dtype=torch.float64)
        weight, tokens = ranks.sum(local).tolist()  # over the global batch
        scale = ranks.world_size / max(weight, 1.0)  # DDP averages gradients over ranks: undo that, divide by the weight
        opt.zero_grad(set_to_none=True)
        nll = torch.zeros((), dtype=torch.float64, device=device)  # summed on the device: no sync per micro batch
        for i, micro in enumerate(rows):
            sync = nullcontext() if ranks.world_size == 1 or i == len(rows) - 1 else net.no_sync()
            with sync:
                with autocast():
                    part = weighted_nll(net, micro, cfg.pack)
                (part * scale).backward()
            nll += part.detach().double()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)) if cfg.grad_clip else None
        opt.step()
        step += 1
        loss = float(ranks.sum(nll)) / max(weight, 1.0)
        seconds = time.perf_counter() - t0
        step_seconds, step_tokens = step_seconds + seconds, step_tokens + int(tokens)
        elapsed = elapsed_before + time.perf_counter() - t_start
        row: dict[str, Any] = {"step": step, "loss": loss, "lr": lr, "tokens": int(tokens),
                               "tokens_per_s": tokens / seconds, "grad_norm": grad_norm, "epoch": batch["epoch"],
                               "elapsed_s": round(elapsed, 3)}
        if cfg.eval_every and step % cfg.eval_every == 0:
            eval_loss = row["eval_loss"] = evaluate(model, heldout, cfg, ranks, device, autocast)
            evaluated_at = step
        history.append(row)
        if writer and (step % cfg.log_every == 0 or "eval_loss" in row):
            with fsspec.open(log_url, "at") as handle:
                handle.write(json.dumps(row) + "\n")
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.1e}", tok_s=f"{tokens / seconds:,.0f}")
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
            checkpoint()
        _injected_kill(step)
    bar.close()
    if evaluated_at != step:
        eval_loss = evaluate(model, heldout, cfg, ranks, device, autocast)
    if saved_at != step or step == 0:
        checkpoint()
    if eval_loss is not None:
        log.info("step %d: held-out loss %.4f", step, eval_loss)
    return summarise(history, step, start_step, eval_loss, step_tokens, step_seconds, elapsed, out)


KILL_AFTER_STEP_ENV = "CM3CURATE_KILL_AFTER_STEP"  # N: the process dies right after step N (tests, drills)


def _injected_kill(step: int) -> None:
    """Fault injection for tests and drills: with CM3CURATE_KILL_AFTER_STEP=N the process dies
    with SIGKILL, as on a lost machine, once step N is logged (and checkpointed, if one was due).
    Unset: nothing happens."""
    after = os.environ.get(KILL_AFTER_STEP_ENV)
    if after and step == int(after):
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def summarise(history: list[dict[str, Any]], step: int, start_step: int, eval_loss: float | None, tokens: int,
              seconds: float, elapsed: float, out: str) -> dict[str, Any]:
    """The numbers `train_lm` returns: losses over the whole run (also before a resume)."""
    losses = [r["loss"] for r in history]
    tenth = max(1, len(losses) // 10)
    mean = (lambda xs: float(np.mean(xs)) if xs else None)
    return {"steps": step, "steps_this_run": step - start_step, "resumed_from": start_step or None,
            "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
            "first_10pct_loss": mean(losses[:tenth]), "last_10pct_loss": mean(losses[-tenth:]),
            "eval_loss": eval_loss, "tokens_per_s": tokens / seconds if seconds else None,
            "train_minutes": elapsed / 60, "checkpoint": f"{out}/lm.safetensors", "out_dir": out}


# command line ----------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    """`python -m trainer.train`: what `curate train-lm` runs, without importing the pipeline."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", required=True, help="token shard folder (any fsspec URL)")
    parser.add_argument("--out", required=True, help="checkpoint folder, e.g. OUT/models/lm")
    add_train_lm_flags(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    result = train_lm(args.tokens, args.out, dataclasses.replace(TrainLMConfig(), **train_lm_overrides(args)))
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(result, indent=2))  # CLI output, not library logging
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
