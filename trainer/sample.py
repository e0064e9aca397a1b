"""Sampling from the reference LM, CM3leon style: caption -> image and image -> caption.

Decoding is constrained so that every sample is well formed whatever the model has learned:

* caption -> image: prompt `[bos] (n1 <break> n2 <break>) caption <img>`, then exactly
  grid x grid tokens drawn from the image-code ids only (every other id is excluded), then
  `</img>` is forced. Classifier-free guidance mixes in the unconditional prompt
  `[bos] <mask:0> <img>` (the caption replaced by a CM3 mask sentinel, no neighbours):
  logits = uncond + scale x (cond - uncond), on the allowed ids only.
* image -> caption: prompt `[bos] <img> codes </img>`, then BPE text ids that are not
  specials, until `<eos>` (the only special allowed) or `max_caption_tokens`.

A token is drawn from the allowed ids themselves (never "mask and hope"), with temperature and
nucleus (top-p) sampling from a seeded `torch.Generator`: same model, prompt and settings, same
sample. Decoding runs on a key/value cache (`trainer.kv_cache`), one token's work per step.
`write_samples` does it all from a run's output folder (its models loaded by
`trainer.run_models`) and writes `OUT/samples/` (docs/training.md#sampling).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import time
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from trainer.config import SampleConfig  # noqa: F401  (re-exported: the sampling API)
from tokenizer.cm3 import CM3Format, build_document, build_sequence, sequence_documents
from tokenizer.text import mask_token
from tokenizer.vocab import SPECIAL_NAMES, JointVocab
from tokenizer.shards import write_bytes_atomic
from trainer.kv_cache import CachedLM
from trainer.model import CM3LM
from trainer.run_models import curated_pixels, load_run_models, url_sha256

log = logging.getLogger(__name__)

FORMAT = "cm3curate-sample/1"
PROMPT_FORMAT = CM3Format(image_first=False, add_bos=True, add_eos=False)  # a prompt is an open sequence


@dataclass(frozen=True)
class Neighbour:
    """A retrieved document for the prompt: its key and joint ids (caption and `<img> codes
    </img>`, either order, no bos/eos/`<break>`)."""

    key: str
    tokens: np.ndarray
    score: float | None = None


# prompts ---------------------------------------------------------------------------------------
def image_prompt(vocab: JointVocab, caption: str, neighbours: Sequence[np.ndarray] = ()) -> np.ndarray:
    """`[bos] n1 <break> ... nk <break> caption <img>`: the caption is encoded as plain text, so a
    caption spelling `<img>` cannot open the image early."""
    main = np.concatenate([vocab.text_to_ids(caption).astype(np.int64), [vocab.img_begin_id]])
    return build_sequence(vocab, list(neighbours), main, PROMPT_FORMAT)


def unconditional_image_prompt(vocab: JointVocab) -> np.ndarray:
    """CM3leon's unconditional prompt for guidance: `[bos] <mask:0> <img>`, the caption masked out."""
    if not vocab.mask_ids:
        raise ValueError("the vocabulary has no <mask:i> sentinel for the unconditional prompt")
    return np.array([vocab.bos_id, vocab.mask_ids[0], vocab.img_begin_id], dtype=vocab.dtype)


def caption_prompt(vocab: JointVocab, codes: np.ndarray) -> np.ndarray:
    """`[bos] <img> codes </img>` (an image-first document whose caption is to come)."""
    return build_sequence(vocab, [], build_document(vocab, None, codes), PROMPT_FORMAT)


def image_candidates(vocab: JointVocab) -> torch.Tensor:
    """The ids an image position may take: every VQ code, nothing else."""
    return torch.arange(vocab.image_offset, vocab.size)


def caption_candidates(vocab: JointVocab) -> torch.Tensor:
    """The ids a caption position may take: BPE ids that are not specials, and `<eos>` to stop.
    Reserved text ids beyond the BPE (`text_size > bpe_size`) are never produced."""
    specials = set(vocab.specials.values()) | set(vocab.mask_ids)
    return torch.tensor([i for i in range(vocab.bpe_size) if i not in specials] + [vocab.eos_id])


def render_ids(vocab: JointVocab, ids: Sequence[int] | np.ndarray) -> str:
    """A readable, unambiguous prompt: specials by name, text quoted (so a caption spelling
    `<img>` shows as text), image runs as a count."""
    names = {vocab.specials[n]: token for n, token in SPECIAL_NAMES.items()}
    names.update({i: mask_token(j) for j, i in enumerate(vocab.mask_ids)})
    parts: list[str] = []
    text: list[int] = []
    images = 0
    for i in np.asarray(ids).tolist() + [None]:
        if text and (i is None or i in names or i >= vocab.bpe_size):
            parts.append(json.dumps(vocab.ids_to_text(text), ensure_ascii=False))
            text = []
        if images and (i is None or i < vocab.image_offset):
            parts.append(f"[{images} image codes]")
            images = 0
        if i is None:
            break
        if i in names:
            parts.append(names[i])
        elif i >= vocab.image_offset:
            images += 1
        else:
            text.append(i)
    return " ".join(parts)


# sampling --------------------------------------------------------------------------------------
def draw(scores: torch.Tensor, cfg: SampleConfig, generator: torch.Generator) -> int:
    """Index into `scores` (the allowed ids' logits) by temperature + nucleus sampling."""
    scores = scores.detach().float().cpu()
    if cfg.temperature == 0:
        return int(scores.argmax())
    probs = torch.softmax(scores / cfg.temperature, dim=-1)
    if cfg.top_p >= 1.0:
        return int(torch.multinomial(probs, 1, generator=generator))
    sorted_probs, order = probs.sort(descending=True)
    keep = sorted_probs.cumsum(0) - sorted_probs < cfg.top_p  # the smallest prefix reaching top_p (>= 1 id)
    return int(order[torch.multinomial(sorted_probs * keep, 1, generator=generator)])


def guide(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance on logits: uncond + scale * (cond - uncond)."""
    return uncond + scale * (cond - uncond)


def _ids(prompt: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.as_tensor(np.asarray(prompt, dtype=np.int64), device=device)[None]


def _check_length(model: CM3LM, length: int) -> None:
    if length > model.cfg.max_seq_len:
        log.warning("sampling %d tokens, beyond the %d the model %s was built for", length,
                    model.cfg.max_seq_len, model.cfg.name)


@torch.inference_mode()
def sample_image_codes(model: CM3LM, vocab: JointVocab, prompt: np.ndarray, grid: int, cfg: SampleConfig,
                       unconditional: np.ndarray | None = None) -> np.ndarray:
    """grid x grid VQ codes after `prompt` (which ends with `<img>`); with `unconditional`,
    guided by it at `cfg.cfg_scale`. Returns int64 codes [grid, grid]."""
    if grid < 1:
        raise ValueError("grid must be >= 1")
    n = grid * grid
    device = model.device
    streams = [(CachedLM(model, len(p) + n), p) for p in (prompt, unconditional) if p is not None]
    _check_length(model, max(len(p) for _, p in streams) + n)
    candidates = image_candidates(vocab).to(device)
    logits = [cache.feed(_ids(p, device))[0] for cache, p in streams]
    generator = torch.Generator().manual_seed(cfg.seed)
    out = np.empty(n, dtype=np.int64)
    for step in range(n):
        scores = logits[0][candidates]
        if len(streams) > 1:
            scores = guide(scores, logits[1][candidates], cfg.cfg_scale)
        j = draw(scores, cfg, generator)
        out[step] = j  # candidates are the image range in code order: index == code
        if step + 1 < n:
            token = candidates[j].view(1, 1)
            logits = [cache.feed(token)[0] for cache, _ in streams]
    return out.reshape(grid, grid)


@torch.inference_mode()
def sample_caption_ids(model: CM3LM, vocab: JointVocab, prompt: np.ndarray, cfg: SampleConfig) -> np.ndarray:
    """Text ids after `prompt`, up to `<eos>` (not included) or `cfg.max_caption_tokens`."""
    device = model.device
    _check_length(model, len(prompt) + cfg.max_caption_tokens)
    cache = CachedLM(model, len(prompt) + cfg.max_caption_tokens)
    candidates = caption_candidates(vocab).to(device)
    logits = cache.feed(_ids(prompt, device))[0]
    generator = torch.Generator().manual_seed(cfg.seed)
    out: list[int] = []
    while len(out) < cfg.max_caption_tokens:
        token = int(candidates[draw(logits[candidates], cfg, generator)])
        if token == vocab.eos_id:
            break
        out.append(token)
        if len(out) < cfg.max_caption_tokens:
            logits = cache.feed(torch.tensor([[token]], device=device))[0]
    return np.asarray(out, dtype=np.int64)


def caption_to_image(model: CM3LM, vocab: JointVocab, caption: str, grid: int, cfg: SampleConfig = SampleConfig(),
                     neighbours: Sequence[Neighbour] = ()) -> np.ndarray:
    """VQ codes [grid, grid] for `caption`, after the retrieved `neighbours`' documents, guided
    by `unconditional_image_prompt` unless `cfg.cfg_scale` is 1."""
    prompt = image_prompt(vocab, caption, [n.tokens for n in neighbours])
    unconditional = unconditional_image_prompt(vocab) if cfg.cfg_scale != 1.0 else None
    return sample_image_codes(model, vocab, prompt, grid, cfg, unconditional)


def image_to_caption(model: CM3LM, vocab: JointVocab, codes: np.ndarray, cfg: SampleConfig = SampleConfig()) -> str:
    """A caption for the image whose VQ codes are `codes` [grid, grid]."""
    return vocab.ids_to_text(sample_caption_ids(model, vocab, caption_prompt(vocab, codes), cfg))


def neighbour_documents(tokens_dir: str, keys: Sequence[str], scores: Sequence[float] | None = None) -> list[Neighbour]:
    """The documents of `keys` as stored in a run's token shards: a document's own sequence
    (keyed by it) ends with it as the main document. A key without a sequence (rejected as
    too long, say) is skipped with a warning."""
    from trainer.dataset import TokenShardDataset

    dataset = TokenShardDataset(tokens_dir, mask=None)
    out = []
    for rank, key in enumerate(keys):
        found = np.flatnonzero(dataset.keys == key.encode())
        if not len(found):
            log.warning("neighbour %s has no sequence in %s; skipped", key, tokens_dir)
            continue
        main = sequence_documents(dataset.vocab, dataset.raw_tokens([int(found[0])])[0])[-1]
        out.append(Neighbour(key, np.array(main), None if scores is None else float(scores[rank])))
    return out


# writing samples -------------------------------------------------------------------------------
def _png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


def _stem(kind: str, payload: dict[str, Any]) -> str:
    """Same inputs and settings, same file name: a rerun overwrites its own sample."""
    return f"{kind}-{hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]}"


def _write_json(url: str, record: dict[str, Any]) -> None:
    write_bytes_atomic(url, (json.dumps(record, indent=2, ensure_ascii=False) + "\n").encode())


@contextlib.contextmanager
def torch_threads(num_threads: int | None) -> Iterator[None]:
    """Torch intra-op threads for a block, restored after it (None: leave them alone)."""
    before = torch.get_num_threads()
    if num_threads:
        torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def write_samples(run_out: str, caption: str | None, image_path: str | None, cfg: SampleConfig = SampleConfig(),
                  out_dir: str | None = None, *, lm: str | None = None, neighbours: Sequence[Neighbour] = (),
                  device: str = "cpu", num_threads: int | None = 1) -> dict[str, Any]:
    """Sample from a run's LM and write `out_dir` (default `OUT/samples/`): for `caption`, a PNG
    and its JSON record; for `image_path`, a `.txt` caption and its JSON record. Records hold
    the input, the prompt (ids and rendered), the settings, the grid and the LM's sha256.
    `neighbours` (pipeline side: `curate sample --retrieve K`) go before the caption prompt.
    `num_threads` 1 by default: a decode step's matrices are too small to split, and a second
    thread mostly waits (a demo image: 4.5 s on one thread, 15-100 s on two of a shared 2-core
    box). Returns what was written and sampled."""
    if caption is None and image_path is None:
        raise ValueError("give a caption, an image, or both")
    with torch_threads(num_threads):
        return _write_samples(run_out, caption, image_path, cfg, out_dir, lm, neighbours, device)


def _write_samples(run_out: str, caption: str | None, image_path: str | None, cfg: SampleConfig, out_dir: str | None,
                   lm: str | None, neighbours: Sequence[Neighbour], device: str) -> dict[str, Any]:
    models = load_run_models(run_out, lm, device)
    vocab = models.vocab
    out_dir = (out_dir or f"{run_out.rstrip('/')}/samples").rstrip("/")
    common = {"format": FORMAT, "settings": cfg.to_dict(), "grid": models.grid, "resolution": models.resolution,
              "lm": {"path": models.lm_url, "sha256": models.lm_sha256, "config": models.lm.cfg.name},
              "vq": {"path": models.vq_url, "sha256": models.vq_sha256}, "vocab_text_sha256": vocab.text_tokenizer_sha256}
    result: dict[str, Any] = {"out_dir": out_dir, "lm_sha256": models.lm_sha256, "grid": models.grid}

    if caption is not None:
        started = time.monotonic()
        prompt = image_prompt(vocab, caption, [n.tokens for n in neighbours])
        uncond = unconditional_image_prompt(vocab) if cfg.cfg_scale != 1.0 else None
        codes = sample_image_codes(models.lm, vocab, prompt, models.grid, cfg, uncond)
        pixels = models.vq.decode_codes(codes[None])[0]
        seconds = time.monotonic() - started
        stem = _stem("caption-to-image", {"caption": caption, "settings": cfg.to_dict(), "lm": models.lm_sha256,
                                          "neighbours": [n.key for n in neighbours]})
        write_bytes_atomic(f"{out_dir}/{stem}.png", _png(pixels))
        record = {**common, "kind": "caption_to_image", "caption": caption,
                  "prompt": {"ids": prompt.tolist(), "text": render_ids(vocab, prompt)},
                  "unconditional_prompt": None if uncond is None else {"ids": uncond.tolist(), "text": render_ids(vocab, uncond)},
                  "neighbours": [{"key": n.key, "score": n.score, "tokens": len(n.tokens)} for n in neighbours],
                  "codes": codes.tolist(), "png": f"{stem}.png", "seconds": round(seconds, 2)}
        _write_json(f"{out_dir}/{stem}.json", record)
        log.info("caption -> image: %d x %d codes in %.1f s -> %s/%s.png", models.grid, models.grid, seconds, out_dir, stem)
        result["image"] = {"png": f"{out_dir}/{stem}.png", "json": f"{out_dir}/{stem}.json", "codes": codes,
                           "seconds": seconds}

    if image_path is not None:
        started = time.monotonic()
        pixels = curated_pixels(image_path, models.resolution, models.jpeg_quality)
        codes = np.asarray(models.vq.encode_codes(pixels[None])[0])
        prompt = caption_prompt(vocab, codes)
        ids = sample_caption_ids(models.lm, vocab, prompt, cfg)
        text = vocab.ids_to_text(ids)
        seconds = time.monotonic() - started
        image_sha = url_sha256(image_path)
        stem = _stem("image-to-caption", {"image_sha256": image_sha, "settings": cfg.to_dict(), "lm": models.lm_sha256})
        write_bytes_atomic(f"{out_dir}/{stem}.txt", (text + "\n").encode())
        record = {**common, "kind": "image_to_caption", "image": image_path, "image_sha256": image_sha,
                  "prompt": {"ids": prompt.tolist(), "text": render_ids(vocab, prompt)},
                  "caption": text, "caption_ids": ids.tolist(), "stopped_by": "eos" if len(ids) < cfg.max_caption_tokens
                  else "max_caption_tokens", "txt": f"{stem}.txt", "seconds": round(seconds, 2)}
        _write_json(f"{out_dir}/{stem}.json", record)
        log.info("image -> caption in %.1f s: %r -> %s/%s.txt", seconds, text, out_dir, stem)
        result["caption"] = {"text": text, "txt": f"{out_dir}/{stem}.txt", "json": f"{out_dir}/{stem}.json",
                             "seconds": seconds}
    return result
