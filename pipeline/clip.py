"""CLIP for alignment scores and retrieval embeddings: model configs, safe loading, training.

Everything here is plain PyTorch + open_clip (no Beam), so the Beam stage, the CLI and the
benchmarks share one loading path. Weights are only ever read with non-executing loaders
(safetensors, or ``torch.load(weights_only=True)``), from a local path or any fsspec URL,
and nothing is downloaded: a licensed-only lineage trains its own CLIP with `train_clip`.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import math
import random
import time
from typing import Any, Callable, Iterable, Iterator, Sequence

import fsspec
import numpy as np
import torch
import torch.nn.functional as F

from pipeline import storage
from pipeline.config import ClipConfig, ClipTrainConfig
from tokenizer.shards import decode_rgb

log = logging.getLogger(__name__)

# Model configs in open_clip's own JSON layout (embed_dim / vision_cfg / text_cfg), so a
# checkpoint written here is an ordinary open_clip CLIP. `cpu-tiny` (64 px, 4×4 patches of
# 16 px, 7.9 M parameters, 6.3 M of them the 49k-token embedding) trains in a minute or two
# on two CPU cores; `cpu-small` is a step up for a few thousand images.
BUILTIN_ARCHS: dict[str, dict[str, Any]] = {
    "cpu-tiny": {
        "embed_dim": 128,
        "vision_cfg": {"image_size": 64, "layers": 4, "width": 128, "head_width": 32, "patch_size": 16},
        "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 3},
    },
    "cpu-small": {
        "embed_dim": 256,
        "vision_cfg": {"image_size": 128, "layers": 6, "width": 256, "head_width": 64, "patch_size": 16},
        "text_cfg": {"context_length": 48, "vocab_size": 49408, "width": 256, "heads": 4, "layers": 6},
    },
}


# ---------------------------------------------------------------------------------- model


def resolve_device(device: str) -> torch.device:
    """`auto` picks CUDA when present so the same config runs on a laptop and a GPU worker."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def model_config(arch: str) -> dict[str, Any]:
    """The open_clip model config dict for `arch` (built-in, registry name or JSON URL)."""
    if arch in BUILTIN_ARCHS:
        return json.loads(json.dumps(BUILTIN_ARCHS[arch]))
    if arch.endswith(".json"):
        with fsspec.open(arch, "r") as f:
            cfg = json.load(f)
        return cfg["model_cfg"] if "model_cfg" in cfg else cfg
    import open_clip

    cfg = open_clip.get_model_config(arch)
    if cfg is None:
        raise ValueError(f"unknown CLIP arch {arch!r}: not built in ({sorted(BUILTIN_ARCHS)}), "
                         "not an open_clip model name, not a .json config")
    return cfg


def build_model(model_cfg: dict[str, Any]) -> torch.nn.Module:
    """Construct an open_clip `CLIP` from a config dict, without touching open_clip's registry."""
    import open_clip

    cfg = dict(model_cfg)
    if "custom_text" in cfg or (cfg.get("text_cfg") or {}).get("hf_model_name"):
        cfg.pop("custom_text", None)
        return open_clip.model.CustomTextCLIP(**cfg)
    return open_clip.model.CLIP(**cfg)


def build_tokenizer(arch: str, model_cfg: dict[str, Any]) -> Callable[..., torch.Tensor]:
    """The SimpleTokenizer (vocab ships inside open_clip, so it works offline) at the model's
    context length; registry names use open_clip's own tokenizer choice."""
    import open_clip

    context_length = int(model_cfg.get("text_cfg", {}).get("context_length", 77))
    if arch in BUILTIN_ARCHS or arch.endswith(".json"):
        return open_clip.tokenizer.SimpleTokenizer(context_length=context_length)
    return open_clip.get_tokenizer(arch)


def build_preprocess(model: torch.nn.Module, train: bool = False, min_crop_scale: float = 1.0):
    """Eval: resize + center crop + normalise, as open_clip does; train adds a random crop."""
    import open_clip
    from torchvision import transforms as T

    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else int(size)
    if not train or min_crop_scale >= 1.0:
        return open_clip.image_transform(size, is_train=False)
    return T.Compose([
        T.RandomResizedCrop(size, scale=(min_crop_scale, 1.0), interpolation=T.InterpolationMode.BICUBIC),
        T.Lambda(lambda im: im.convert("RGB")),
        T.ToTensor(),
        T.Normalize(open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD),
    ])


def read_state_dict(url: str) -> dict[str, torch.Tensor]:
    """Read weights from a path or fsspec URL without executing pickled code.

    Accepts safetensors, or a torch checkpoint holding a state dict directly or under
    `state_dict` / `model` (open_clip training checkpoints); strips DDP's `module.` prefix."""
    with fsspec.open(url, "rb") as f:
        data = f.read()
    if url.endswith(".safetensors") or data[8:9] == b"{":
        from safetensors.torch import load as load_safetensors

        try:
            state = load_safetensors(data)
        except Exception:  # noqa: BLE001 - not a safetensors blob after all; try torch below
            if url.endswith(".safetensors"):
                raise
            state = None
        if state is not None:
            return state
    obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict):
        raise ValueError(f"{url}: checkpoint does not hold a state dict")
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def load_clip(arch: str, weights_url: str | None = None, device: str = "auto"):
    """Build `arch`, load `weights_url` (strictly), put it in eval mode on `device`.

    Returns `(model, preprocess, tokenizer)` like open_clip's factory does."""
    model_cfg = model_config(arch)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # without weights, at least every worker gets the same model
        model = build_model(model_cfg)
    if weights_url:
        state = read_state_dict(weights_url)
        model.load_state_dict(state, strict=True)
        log.info("loaded CLIP %s weights from %s", arch, weights_url)
    else:
        log.warning("CLIP %s has no weights: random init (only useful for tests)", arch)
    model = model.to(resolve_device(device)).eval()
    return model, build_preprocess(model), build_tokenizer(arch, model_cfg)


# ------------------------------------------------------------------------------ inference


def normalise(x: np.ndarray) -> np.ndarray:
    """Unit-length rows (zero rows stay zero) so inner product is cosine."""
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return (x / np.maximum(norms, 1e-12)).astype(np.float32)


class ClipEmbedder:
    """A loaded CLIP that embeds batches of JPEG bytes and captions; built once per worker."""

    def __init__(self, cfg: ClipConfig):
        self.cfg = cfg
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        self.device = resolve_device(cfg.device)
        self.model, self.preprocess, self.tokenizer = load_clip(cfg.arch, cfg.weights, str(self.device))

    def prepare_image(self, data: bytes) -> torch.Tensor:
        """Decode + preprocess one image; separate so a caller can isolate a bad file."""
        return self.preprocess(decode_rgb(data))

    @torch.inference_mode()
    def embed_pixels(self, pixels: Sequence[torch.Tensor]) -> np.ndarray:
        """Normalised embeddings of preprocessed images, float32 [n, d], in batches."""
        out = []
        for start in range(0, len(pixels), self.cfg.batch_size):
            chunk = torch.stack(list(pixels[start:start + self.cfg.batch_size])).to(self.device)
            out.append(self.model.encode_image(chunk).float().cpu().numpy())
        return normalise(np.concatenate(out)) if out else np.zeros((0, self.dim), np.float32)

    def embed_images(self, images: Sequence[bytes]) -> np.ndarray:
        """Normalised image embeddings of JPEG bytes, float32 [n, d]."""
        return self.embed_pixels([self.prepare_image(b) for b in images])

    @torch.inference_mode()
    def embed_tokens(self, tokens: torch.Tensor) -> np.ndarray:
        """Normalised text embeddings for already-tokenised text (used by query dropout)."""
        out = []
        for start in range(0, len(tokens), self.cfg.batch_size):
            chunk = tokens[start:start + self.cfg.batch_size].to(self.device)
            out.append(self.model.encode_text(chunk).float().cpu().numpy())
        return normalise(np.concatenate(out)) if out else np.zeros((0, self.dim), np.float32)

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Normalised text embeddings, float32 [n, d]."""
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        return self.embed_tokens(self.tokenizer(list(texts)))

    @property
    def dim(self) -> int:
        return int(self.model.text_projection.shape[1]) if hasattr(self.model, "text_projection") else 0


def caption_scores(image_emb: np.ndarray, caption_embs: np.ndarray) -> np.ndarray:
    """Cosine of one image with each of its captions (inputs are normalised)."""
    return caption_embs @ image_emb


def reduce_scores(scores: np.ndarray, reduce: str) -> float:
    """`max`: an image is aligned if any caption describes it (robust to one bad caption);
    `mean`: every caption must describe it (stricter)."""
    if reduce == "max":
        return float(scores.max())
    if reduce == "mean":
        return float(scores.mean())
    raise ValueError(f"unknown score reduction {reduce!r}")


def text_embedding(caption_embs: np.ndarray) -> np.ndarray:
    """A document's text embedding: the renormalised mean of its captions' embeddings."""
    return normalise(caption_embs.mean(axis=0, keepdims=True))[0]


def document_embedding(image_emb: np.ndarray | None, text_emb: np.ndarray | None) -> np.ndarray:
    """CM3leon's retriever embedding: mean of the normalised image and text embeddings,
    renormalised; a one-modality document is just that modality."""
    parts = [normalise(e[None])[0] for e in (image_emb, text_emb) if e is not None]
    if not parts:
        raise ValueError("a document needs an image or a text embedding")
    return normalise(np.mean(parts, axis=0, keepdims=True))[0]


# ---------------------------------------------------------------------------- training data


def iter_curated_samples(shard_urls: Iterable[str]) -> Iterator[dict[str, Any]]:
    """Stream `{key, jpg, meta}` samples from curated tar shards (never the whole corpus)."""
    from tokenizer.shards import iter_shard

    for url in shard_urls:
        for sample in iter_shard(url):
            yield {"key": sample.key, "jpg": sample.jpeg, "meta": sample.meta}


def _training_pairs(shard_urls: Sequence[str], buffer: int, rng: random.Random) -> Iterator[tuple[bytes, str]]:
    """Endless (jpg, caption) pairs: epochs over the shards in a seeded order, a shuffle
    buffer like webdataset's, a random caption per draw (every caption gets used)."""
    pool: list[dict[str, Any]] = []
    while True:
        urls = list(shard_urls)
        rng.shuffle(urls)
        seen = 0
        for sample in iter_curated_samples(urls):
            captions = [c for c in sample["meta"].get("captions") or [] if c]
            if not captions:
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


# -------------------------------------------------------------------------------- training


def _lr_at(step: int, cfg: ClipTrainConfig, time_used: float = 0.0) -> float:
    """Warm-up, then cosine decay towards whichever budget (steps or minutes) ends first, so
    a time-budgeted run still ends at a low learning rate."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    progress = max(progress, time_used)
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def train_clip(cfg: ClipConfig, train_cfg: ClipTrainConfig, shard_urls: Sequence[str], out_dir: str) -> dict[str, Any]:
    """Train a CLIP of `cfg.arch` contrastively on curated shards; write `clip.safetensors`
    and `clip.json` (model config + training summary) to `out_dir`.

    Resumable: `out_dir/checkpoint.pt` (model + optimiser + step, read with weights_only) is
    written every `checkpoint_every` steps; a rerun continues from it. Stops at `max_steps`
    or after `max_minutes` (the LR schedule then follows the clock, so a time-budgeted run
    is not step-deterministic). Returns the summary that goes into `clip.json`."""
    from safetensors.torch import save as save_safetensors
    from tqdm import tqdm

    if train_cfg.num_threads:
        torch.set_num_threads(train_cfg.num_threads)
    torch.manual_seed(train_cfg.seed)
    device = resolve_device(cfg.device)
    model_cfg = model_config(cfg.arch)
    model = build_model(model_cfg).to(device)
    if cfg.weights:
        model.load_state_dict(read_state_dict(cfg.weights), strict=True)
    tokenizer = build_tokenizer(cfg.arch, model_cfg)
    preprocess = build_preprocess(model, train=True, min_crop_scale=train_cfg.min_crop_scale)

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
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        step, losses = int(ckpt["step"]), list(ckpt.get("losses", []))
        log.info("resuming CLIP training from %s at step %d", ckpt_url, step)

    def save_checkpoint() -> None:
        buf = io.BytesIO()
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step,
                    "losses": losses}, buf)
        storage.write_bytes(ckpt_url, buf.getvalue())

    # The data stream is re-seeded from the step so a resumed run does not replay epoch 1.
    pairs = _training_pairs(list(shard_urls), train_cfg.shuffle_buffer, random.Random(train_cfg.seed * 1_000_003 + step))
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
        logits = model.logit_scale.exp().clamp(max=100) * img @ txt.T
        target = torch.arange(len(batch), device=device)
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
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
    storage.write_bytes(f"{out_dir}/clip.json", json.dumps(summary, indent=2).encode())
    log.info("CLIP trained: %d steps, loss %.3f -> %.3f", step, summary["first_loss"] or 0, summary["final_loss"] or 0)
    return summary
