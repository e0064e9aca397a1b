"""CLIP inference: image and caption embeddings, alignment scores, retrieval embeddings.

`ClipEmbedder` is built once per worker (the alignment and index stages, `curate sample`);
the functions below it are the scoring and embedding rules of docs/alignment.md.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from pipeline.clip.model import load_clip, resolve_device
from pipeline.config import ClipConfig
from tokenizer.shards import decode_rgb


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
