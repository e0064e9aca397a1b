"""Train a VQ tokenizer on the curated store, streaming random crops from the tar shards.

Design: the crop stream is a pure function of (seed, step), the LR schedule a function of the
step (or of elapsed time when only a time budget is given), and all state (weights, quantizer
buffers, AdamW moments) is saved as safetensors, so a run killed at any checkpoint resumes where
it stopped. Run as `python -m tokenizer.vq.train --shards ... --out ...` or via `curate train-vq`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import time
from contextlib import nullcontext
from typing import Any, Iterator, Mapping, Sequence

import fsspec
import numpy as np
import torch
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes
from tqdm.auto import tqdm

from tokenizer.shards import HELDOUT_PERCENT, iter_samples, iter_shard, is_heldout, list_shards, write_bytes_atomic
from tokenizer.vq.config import TrainVQConfig, VQConfig, get_config
from tokenizer.vq.eval import evaluate, save_grid, write_eval
from tokenizer.vq.losses import build_discriminator, build_perceptual, hinge_d_loss, reconstruction_loss
from tokenizer.vq.model import VQModel, load_vq, read_vq_meta, save_vq

log = logging.getLogger(__name__)

WEIGHTS = "vq.safetensors"
OPTIM = "vq-optim.safetensors"
DISC = "vq-disc.safetensors"
DISC_OPTIM = "vq-disc-optim.safetensors"
STATE = "vq-train.json"
EVAL = "vq-eval.json"
GRID = "vq-recon.png"
LOG = "vq-log.jsonl"


def _random_crop(img: np.ndarray, size: int, rng: np.random.Generator, hflip: bool) -> np.ndarray:
    h, w = img.shape[:2]
    if h < size or w < size:
        from PIL import Image

        scale = size / min(h, w)
        img = np.asarray(Image.fromarray(img).resize((max(size, round(w * scale)), max(size, round(h * scale)))))
        h, w = img.shape[:2]
    top = int(rng.integers(0, h - size + 1))
    left = int(rng.integers(0, w - size + 1))
    crop = img[top : top + size, left : left + size]
    if hflip and rng.random() < 0.5:
        crop = crop[:, ::-1]
    return crop


def iter_crops(urls: Sequence[str], tcfg: TrainVQConfig) -> Iterator[np.ndarray]:
    """Endless, deterministic stream of training crops: shard order and crops depend only on the seed."""
    epoch = 0
    while True:
        rng = np.random.default_rng([tcfg.seed, epoch])
        buffer: list[np.ndarray] = []
        produced = 0
        for si in rng.permutation(len(urls)):
            for sample in iter_shard(urls[si]):
                if is_heldout(sample.key, tcfg.heldout_percent):
                    continue
                img = sample.array()
                for _ in range(tcfg.crops_per_image):
                    buffer.append(_random_crop(img, tcfg.crop_size, rng, tcfg.hflip))
                    if len(buffer) >= tcfg.shuffle_buffer:
                        j = int(rng.integers(len(buffer)))
                        buffer[j], buffer[-1] = buffer[-1], buffer[j]
                        yield buffer.pop()
                        produced += 1
        for j in rng.permutation(len(buffer)):
            yield buffer[j]
            produced += 1
        if produced == 0:
            raise ValueError("no training images in the shards (all held out, or empty)")
        epoch += 1


def iter_batches(urls: Sequence[str], tcfg: TrainVQConfig, start_step: int = 0) -> Iterator[np.ndarray]:
    """uint8 [B, crop, crop, 3] batches; skips the first `start_step` batches so a resume sees new data."""
    crops = iter_crops(urls, tcfg)
    step = 0
    while True:
        batch = np.stack([np.ascontiguousarray(next(crops)) for _ in range(tcfg.batch_size)])
        if step >= start_step:
            yield batch
        step += 1


def lr_at(tcfg: TrainVQConfig, step: int, elapsed_min: float) -> float:
    """Linear warmup, then cosine decay over the budget (steps, or minutes when no step budget)."""
    if step < tcfg.warmup_steps:
        return tcfg.lr * (step + 1) / tcfg.warmup_steps
    progress = 0.0
    if tcfg.max_steps:
        progress = max(progress, step / tcfg.max_steps)
    if tcfg.max_minutes and not tcfg.max_steps:
        progress = max(progress, elapsed_min / tcfg.max_minutes)
    progress = min(1.0, progress)
    floor = tcfg.min_lr_ratio
    return tcfg.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def _save_optimizer(opt: torch.optim.Optimizer, url: str) -> None:
    """AdamW state as safetensors (tensors) + param_groups in the metadata: no pickles on disk."""
    sd = opt.state_dict()
    tensors = {}
    for idx, st in sd["state"].items():
        for name, value in st.items():
            t = value if torch.is_tensor(value) else torch.tensor(value)
            tensors[f"{idx}.{name}"] = t.detach().cpu().contiguous()
    groups = json.dumps(sd["param_groups"])
    write_bytes_atomic(url, save_safetensors_bytes(tensors, metadata={"param_groups": groups}))


def _load_optimizer(opt: torch.optim.Optimizer, url: str) -> None:
    with fsspec.open(url, "rb") as f:
        data = f.read()
    tensors = load_safetensors_bytes(data)
    header_len = int.from_bytes(data[:8], "little")  # safetensors: u64 header size, then JSON header
    groups = json.loads(json.loads(data[8 : 8 + header_len])["__metadata__"]["param_groups"])
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, t in tensors.items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = t
    opt.load_state_dict({"state": state, "param_groups": groups})


def _exists(url: str) -> bool:
    fs, path = fsspec.core.url_to_fs(url)
    return fs.exists(path)


def _resolve_device(tcfg: TrainVQConfig) -> torch.device:
    if tcfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(tcfg.device)


def train_vq(cfg: VQConfig, train: TrainVQConfig | Mapping[str, Any] | None = None, shard_urls: Sequence[str] = (),
             out_dir: str = ".", **overrides: Any) -> dict[str, Any]:
    """Train (or resume) a VQ tokenizer; writes vq.safetensors, vq.json, vq-eval.json, vq-recon.png.

    `train` is a TrainVQConfig or a mapping of its fields; `overrides` are more fields. A run
    resumes from the checkpoint in `out_dir` when one is there (its VQConfig must match).
    """
    if train is None:
        train = TrainVQConfig(**overrides)
    elif isinstance(train, Mapping):
        train = TrainVQConfig(**{**train, **overrides})
    elif overrides:
        train = dataclasses.replace(train, **overrides)
    tcfg: TrainVQConfig = train
    urls = list(shard_urls)
    if not urls:
        raise ValueError("no shard URLs given")
    out = out_dir.rstrip("/")
    fs, root = fsspec.core.url_to_fs(out)
    fs.makedirs(root, exist_ok=True)
    if tcfg.num_threads:
        torch.set_num_threads(tcfg.num_threads)
    device = _resolve_device(tcfg)
    use_bf16 = tcfg.precision == "bf16" or (tcfg.precision == "auto" and device.type == "cuda")

    torch.manual_seed(tcfg.seed)
    model = VQModel(cfg).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=tcfg.lr, betas=tcfg.betas, weight_decay=tcfg.weight_decay)
    perceptual = build_perceptual(cfg)
    if perceptual is not None:
        perceptual = perceptual.to(device)
    disc = build_discriminator(cfg)
    disc_opt = None
    if disc is not None:
        disc = disc.to(device).train()
        disc_opt = torch.optim.AdamW(disc.parameters(), lr=tcfg.lr, betas=(0.5, 0.9), weight_decay=tcfg.weight_decay)

    step, elapsed = 0, 0.0
    if _exists(f"{out}/{STATE}") and _exists(f"{out}/{WEIGHTS}"):
        saved_cfg = VQConfig.from_dict(read_vq_meta(f"{out}/{WEIGHTS}")["config"])
        if saved_cfg != cfg:
            raise ValueError(f"{out} holds a checkpoint of a different VQConfig ({saved_cfg.name}); use a new out_dir")
        model.load_state_dict(load_vq(f"{out}/{WEIGHTS}").state_dict())
        _load_optimizer(opt, f"{out}/{OPTIM}")
        if disc is not None and _exists(f"{out}/{DISC}"):
            with fsspec.open(f"{out}/{DISC}", "rb") as f:
                disc.load_state_dict(load_safetensors_bytes(f.read()))
            _load_optimizer(disc_opt, f"{out}/{DISC_OPTIM}")  # type: ignore[arg-type]
        with fsspec.open(f"{out}/{STATE}", "r") as f:
            state = json.load(f)
        step, elapsed = int(state["step"]), float(state["elapsed_s"])
        log.info("resuming %s at step %d (%.1f min trained)", out, step, elapsed / 60)

    def checkpoint() -> None:
        save_vq(model, f"{out}/{WEIGHTS}", {"step": step, "train": tcfg.to_dict()})
        _save_optimizer(opt, f"{out}/{OPTIM}")
        if disc is not None:
            write_bytes_atomic(f"{out}/{DISC}", save_safetensors_bytes({k: v.detach().cpu().contiguous() for k, v in disc.state_dict().items()}))
            _save_optimizer(disc_opt, f"{out}/{DISC_OPTIM}")  # type: ignore[arg-type]
        write_bytes_atomic(f"{out}/{STATE}", json.dumps({"step": step, "elapsed_s": elapsed, "train": tcfg.to_dict()}, indent=2).encode())

    def budget_left() -> bool:
        if tcfg.max_steps is not None and step >= tcfg.max_steps:
            return False
        return not (tcfg.max_minutes is not None and elapsed >= tcfg.max_minutes * 60)

    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if use_bf16 else nullcontext
    history: list[dict[str, Any]] = []
    batches = iter_batches(urls, tcfg, start_step=step)
    bar = tqdm(total=tcfg.max_steps, initial=step, disable=not tcfg.progress, desc="train-vq", unit="step")
    restart_gen = torch.Generator(device=device)
    start_step = step
    while budget_left():
        t0 = time.perf_counter()
        lr = lr_at(tcfg, step, elapsed / 60)
        for group in opt.param_groups:
            group["lr"] = lr
        x = torch.from_numpy(next(batches)).to(device).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
        with autocast():
            recon, q = model(x)
            rec_loss = reconstruction_loss(recon, x, cfg.l1_weight, cfg.l2_weight)
            loss = rec_loss + q.loss
            if perceptual is not None:
                loss = loss + cfg.perceptual_weight * perceptual(recon, x)
            gan_on = disc is not None and step >= cfg.adversarial_start_step
            if gan_on:
                loss = loss - cfg.adversarial_weight * disc(recon).float().mean()  # type: ignore[misc]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if tcfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.grad_clip)
        opt.step()
        if gan_on:
            with autocast():
                d_loss = hinge_d_loss(disc(x).float(), disc(recon.detach()).float())  # type: ignore[misc]
            disc_opt.zero_grad(set_to_none=True)  # type: ignore[union-attr]
            d_loss.backward()
            disc_opt.step()  # type: ignore[union-attr]
        step += 1
        restarted = 0
        if cfg.restart_every and step % cfg.restart_every == 0:
            restart_gen.manual_seed(tcfg.seed * 1_000_003 + step)
            restarted = model.quantizer.restart_dead_codes(q.vectors, restart_gen)
        elapsed += time.perf_counter() - t0
        bar.update(1)
        if step % 10 == 0 or step == start_step + 1:
            bar.set_postfix(loss=f"{loss.item():.4f}", rec=f"{rec_loss.item():.4f}", ppl=f"{q.perplexity.item():.0f}", lr=f"{lr:.2e}")
        if restarted:
            log.debug("step %d: restarted %d dead codes", step, restarted)
        if tcfg.eval_every and step % tcfg.eval_every == 0:
            metrics, _ = evaluate(model, iter_samples(urls, "heldout", tcfg.heldout_percent), tcfg.eval_batch_size, tcfg.eval_images, 0)
            row = {"step": step, "elapsed_s": round(elapsed, 1), "loss": loss.item(), "rec_loss": rec_loss.item(), "lr": lr, **metrics}
            history.append(row)
            log.info("step %d: held-out PSNR %.2f dB, SSIM %.3f, usage %.1f%%", step, metrics["psnr_db"], metrics["ssim"], metrics["codebook_usage_pct"])
            with fs.open(f"{root}/{LOG}", "a") as f:
                f.write(json.dumps(row) + "\n")
        if tcfg.checkpoint_every and step % tcfg.checkpoint_every == 0:
            checkpoint()
    bar.close()
    checkpoint()
    result: dict[str, Any] = {"step": step, "train_minutes": elapsed / 60, "out_dir": out, "history": history,
                              "weights": f"{out}/{WEIGHTS}", "config": f"{out}/vq.json"}
    if tcfg.final_eval:
        result["eval"] = evaluate_checkpoint(model, urls, out, tcfg, step, elapsed)
    return result


def evaluate_checkpoint(model: VQModel, urls: Sequence[str], out: str, tcfg: TrainVQConfig, step: int, elapsed: float) -> dict[str, Any]:
    """Full held-out evaluation at native resolution; writes vq-eval.json and vq-recon.png."""
    metrics, pairs = evaluate(model, iter_samples(urls, "heldout", tcfg.heldout_percent), tcfg.eval_batch_size, None, tcfg.grid_images)
    if metrics["images"] == 0:
        log.warning("no held-out images in the shards: nothing evaluated")
    metrics.update({"config": model.cfg.name, "step": step, "train_minutes": round(elapsed / 60, 2),
                    "heldout_percent": tcfg.heldout_percent, "device": str(model.device)})
    write_eval(metrics, f"{out}/{EVAL}")
    save_grid(pairs, f"{out}/{GRID}")
    log.info("held-out eval: %s", {k: metrics[k] for k in ("images", "psnr_db", "ssim", "codebook_usage_pct", "perplexity")})
    return metrics


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m tokenizer.vq.train`: the same entry point `curate train-vq` wraps."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--shards", required=True, help="curated shards: a folder (fsspec URL) of images-NNNNNN.tar, "
                    "as `curate train-vq --shards`")
    ap.add_argument("--out", required=True)
    ap.add_argument("--config", default="cpu-small")
    ap.add_argument("--max-steps", type=int, default=None)
    ap.add_argument("--max-minutes", type=float, default=None)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--crop-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    tcfg = TrainVQConfig(batch_size=args.batch_size, crop_size=args.crop_size, lr=args.lr, max_steps=args.max_steps,
                         max_minutes=args.max_minutes, num_threads=args.threads, eval_every=args.eval_every, seed=args.seed,
                         checkpoint_every=args.eval_every)
    result = train_vq(get_config(args.config), tcfg, list_shards(args.shards), args.out)
    print(json.dumps(result.get("eval", {}), indent=2))  # CLI output, not library logging
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
