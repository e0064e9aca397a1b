"""CLIP training: contrastive training of a CLIP on the curated shards (`curate run`'s
`clip` step and `curate train-clip`), resumable, with open_clip's `ClipLoss`.

The model comes from `pipeline.clip.model` (open_clip's factory); the data is streamed from
the curated tar shards, never loaded whole.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import math
import random
import time
from typing import Any, Iterable, Iterator, Sequence

import fsspec
import numpy as np
import torch
import torch.nn.functional as F

from pipeline import storage
from pipeline.alignment_filter import fold_of
from pipeline.clip.model import build_model, build_preprocess, build_tokenizer, model_config, read_state_dict, registry_name, resolve_device
from pipeline.config import ClipConfig, ClipTrainConfig
from tokenizer.shards import decode_rgb

log = logging.getLogger(__name__)


def iter_curated_samples(shard_urls: Iterable[str]) -> Iterator[dict[str, Any]]:
    """Stream `{key, jpg, meta}` samples from curated tar shards (never the whole corpus)."""
    from tokenizer.shards import iter_shard

    for url in shard_urls:
        for sample in iter_shard(url):
            yield {"key": sample.key, "jpg": sample.jpeg, "meta": sample.meta}


def _training_pairs(shard_urls: Sequence[str], buffer: int, rng: random.Random,
                    holdout: tuple[int, int] | None = None) -> Iterator[tuple[bytes, str]]:
    """Endless (jpg, caption) pairs: epochs over the shards in a seeded order, a shuffle
    buffer like webdataset's, a random caption per draw (every caption gets used).
    `holdout=(k, K)` skips the assets of fold k of K (`alignment_filter.fold_of` of the asset's
    duplicate group, else its id: the align step scores with the same key, so no model scores
    a member of a group it trained on)."""
    pool: list[dict[str, Any]] = []
    while True:
        urls = list(shard_urls)
        rng.shuffle(urls)
        seen = 0
        for sample in iter_curated_samples(urls):
            captions = [c for c in sample["meta"].get("captions") or [] if c]
            if not captions:
                continue
            fold_key = sample["meta"].get("cluster_id") or sample["meta"].get("asset_id") or sample["key"]
            if holdout is not None and fold_of(str(fold_key), holdout[1]) == holdout[0]:
                continue
            seen += 1
            pool.append({"jpg": sample["jpg"], "captions": captions})
            if len(pool) >= buffer:
                item = pool.pop(rng.randrange(len(pool)))
                yield item["jpg"], rng.choice(item["captions"])
        if not seen and not pool:
            raise ValueError("no curated samples with captions in the given shards")
        while len(pool) > buffer // 2:
            item = pool.pop(rng.randrange(len(pool)))
            yield item["jpg"], rng.choice(item["captions"])


def _distinct_batch(pairs: Iterator[tuple[bytes, str]], size: int) -> list[tuple[bytes, str]]:
    """A batch without the same image twice: a repeat would be a false negative in the
    contrastive loss (common on a small corpus with multi-epoch buffering)."""
    batch: list[tuple[bytes, str]] = []
    seen: set[int] = set()
    deferred = 0
    while len(batch) < size:
        jpg, caption = next(pairs)
        h = hash(jpg)
        if h in seen and deferred < 4 * size:
            deferred += 1
            continue
        seen.add(h)
        batch.append((jpg, caption))
    return batch


def _lr_at(step: int, cfg: ClipTrainConfig, time_used: float = 0.0) -> float:
    """Warm-up, then cosine decay towards whichever budget (steps or minutes) ends first, so
    a time-budgeted run still ends at a low learning rate."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    progress = max(progress, time_used)
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def contrastive_loss() -> torch.nn.Module:
    """open_clip's `ClipLoss` (symmetric InfoNCE over the batch), taking the text-side logits as
    the transpose of the image-side ones, as open_clip does itself when it gathers features
    across ranks. Its single-process default recomputes them as text @ image.T, which rounds
    differently: the trained weights would change in their last bits, and with them every
    alignment score and index built on them (measured: a 12-step run's weights and embeddings
    differ). With the transpose they are bit-identical to the loss this project had before."""
    import open_clip

    class TransposedClipLoss(open_clip.ClipLoss):
        def get_logits(self, image_features, text_features, logit_scale, logit_bias=None):
            if self.world_size > 1 or logit_bias is not None:
                return super().get_logits(image_features, text_features, logit_scale, logit_bias)
            logits_per_image = logit_scale * image_features @ text_features.T
            return logits_per_image, logits_per_image.T

    return TransposedClipLoss()


def train_clip(cfg: ClipConfig, train_cfg: ClipTrainConfig, shard_urls: Sequence[str], out_dir: str,
               holdout: tuple[int, int] | None = None) -> dict[str, Any]:
    """Train a CLIP of `cfg.arch` contrastively on curated shards; write `clip.safetensors`
    and `clip.json` (model config + training summary) to `out_dir`.

    Resumable: `out_dir/checkpoint.pt` (model + optimiser + step, read with weights_only) is
    written every `checkpoint_every` steps; a rerun continues from it. Stops at `max_steps`
    or after `max_minutes` (the LR schedule then follows the clock, so a time-budgeted run
    is not step-deterministic). Returns the summary that goes into `clip.json`.

    `holdout=(k, K)` trains without the assets of fold k of K, for out-of-fold scoring (each
    row scored by a model that never saw it); None (the default) trains on every asset."""
    from safetensors.torch import save as save_safetensors
    from tqdm import tqdm

    if holdout is not None and not (holdout[1] >= 2 and 0 <= holdout[0] < holdout[1]):
        raise ValueError(f"holdout must be (k, K) with K >= 2 and 0 <= k < K, got {holdout}")
    if train_cfg.num_threads:
        torch.set_num_threads(train_cfg.num_threads)
    torch.manual_seed(train_cfg.seed)
    device = resolve_device(cfg.device)
    model_cfg = model_config(cfg.arch)
    model = build_model(model_cfg, registry_name(cfg.arch)).to(device)
    if cfg.weights:
        model.load_state_dict(read_state_dict(cfg.weights), strict=True)
    tokenizer = build_tokenizer(cfg.arch, model_cfg)
    preprocess = build_preprocess(model, train=True, min_crop_scale=train_cfg.min_crop_scale)
    clip_loss = contrastive_loss()

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW([
        {"params": decay, "weight_decay": train_cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ], lr=train_cfg.lr, betas=(0.9, 0.98), eps=1e-6)

    out_dir = out_dir.rstrip("/")
    ckpt_url = f"{out_dir}/checkpoint.pt"
    step, losses = 0, []
    if storage.exists(ckpt_url):
        with fsspec.open(ckpt_url, "rb") as f:
            ckpt = torch.load(io.BytesIO(f.read()), map_location=device, weights_only=True)
        if ckpt.get("holdout") != (list(holdout) if holdout is not None else None):
            raise ValueError(f"{ckpt_url} was written with holdout {ckpt.get('holdout')}, not {holdout}: "
                             "use another out_dir per fold")
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        step, losses = int(ckpt["step"]), list(ckpt.get("losses", []))
        log.info("resuming CLIP training from %s at step %d", ckpt_url, step)

    def save_checkpoint() -> None:
        buf = io.BytesIO()
        state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step, "losses": losses}
        if holdout is not None:
            state["holdout"] = list(holdout)
        torch.save(state, buf)
        storage.write_bytes(ckpt_url, buf.getvalue())

    # The data stream is re-seeded from the step so a resumed run does not replay epoch 1.
    pairs = _training_pairs(list(shard_urls), train_cfg.shuffle_buffer, random.Random(train_cfg.seed * 1_000_003 + step), holdout)
    start, stopped_by = time.monotonic(), "max_steps"
    model.train()
    bar = tqdm(total=train_cfg.max_steps, initial=step, desc="train-clip", disable=not train_cfg.progress)
    while step < train_cfg.max_steps:
        if train_cfg.max_minutes and time.monotonic() - start > 60 * train_cfg.max_minutes:
            stopped_by = "max_minutes"
            break
        batch = _distinct_batch(pairs, train_cfg.batch_size)
        pixels = torch.stack([preprocess(decode_rgb(jpg)) for jpg, _ in batch]).to(device)
        tokens = tokenizer([c for _, c in batch]).to(device)
        time_used = (time.monotonic() - start) / (60 * train_cfg.max_minutes) if train_cfg.max_minutes else 0.0
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, train_cfg, time_used)
        img = F.normalize(model.encode_image(pixels), dim=-1)
        txt = F.normalize(model.encode_text(tokens), dim=-1)
        loss = clip_loss(img, txt, model.logit_scale.exp().clamp(max=100))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        step += 1
        losses.append(loss.item())
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
        if step % train_cfg.checkpoint_every == 0:
            save_checkpoint()
    bar.close()
    save_checkpoint()

    model.eval()
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    storage.write_bytes(f"{out_dir}/clip.safetensors", save_safetensors(state))
    summary = {
        "arch": cfg.arch,
        "model_cfg": model_cfg,
        "train": dataclasses.asdict(train_cfg),
        "steps": step,
        "stopped_by": stopped_by,
        "final_loss": float(np.mean(losses[-20:])) if losses else None,
        "first_loss": float(np.mean(losses[:20])) if losses else None,
        "seconds": round(time.monotonic() - start, 1),
        "shards": list(shard_urls),
    }
    if holdout is not None:  # absent by default, so a run without folds writes the same clip.json
        summary["holdout"] = {"fold": holdout[0], "folds": holdout[1]}
    storage.write_bytes(f"{out_dir}/clip.json", json.dumps(summary, indent=2).encode())
    log.info("CLIP trained: %d steps, loss %.3f -> %.3f", step, summary["first_loss"] or 0, summary["final_loss"] or 0)
    return summary
