"""What sampling needs from a run's output folder (`trainer.sample`): the LM, the vocabulary
and the VQ, loaded and checked against each other, the curated image size and JPEG quality, and
an input image turned into the pixels the curated store would hold.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass

import fsspec
import numpy as np
import torch
from PIL import Image, ImageOps

from tokenizer.vocab import JointVocab
from tokenizer.vq.model import VQModel, load_vq
from trainer.model import CM3LM, load_lm


@dataclass(frozen=True)
class RunModels:
    """What sampling needs from a run's output folder, loaded and checked against each other."""

    lm: CM3LM
    lm_url: str
    lm_sha256: str
    vocab: JointVocab
    vq: VQModel
    vq_url: str
    vq_sha256: str
    resolution: int  # curated image side, px
    grid: int  # codes per side: resolution // VQ downsampling factor
    jpeg_quality: int


def url_sha256(url: str) -> str:
    digest = hashlib.sha256()
    with fsspec.open(url, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def curated_decode_settings(run_out: str) -> tuple[int, int]:
    """(resolution, jpeg quality) of the run's curated images: `decode` in `OUT/run.json`, else
    the size of the first image in `OUT/curated` (quality 95, the pipeline's default)."""
    root = run_out.rstrip("/")
    fs, path = fsspec.core.url_to_fs(f"{root}/run.json")
    if fs.exists(path):
        with fs.open(path, "r") as handle:
            decode = json.load(handle).get("config", {}).get("decode", {})
        if "resolution" in decode:
            return int(decode["resolution"]), int(decode.get("jpeg_quality", 95))
    from tokenizer.shards import iter_shard, list_shards

    for url in list_shards(f"{root}/curated"):
        for sample in iter_shard(url):
            width, height = sample.image().size
            if width != height:
                raise ValueError(f"curated image {sample.key} is {width}x{height}, not square")
            return width, 95
    raise FileNotFoundError(f"{root}: neither run.json (decode.resolution) nor curated images to read the image size from")


def load_run_models(run_out: str, lm: str | None = None, device: str | torch.device = "cpu") -> RunModels:
    """The LM (`lm`, default `OUT/models/lm`), the vocabulary (`OUT/models/vocab.json` + BPE),
    the VQ (`OUT/models/vq/vq.safetensors`) and the image grid of a run."""
    root = run_out.rstrip("/")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    lm_dir = (lm or f"{root}/models/lm").rstrip("/")
    lm_url = lm_dir if lm_dir.endswith(".safetensors") else f"{lm_dir}/lm.safetensors"
    fs, path = fsspec.core.url_to_fs(lm_url)
    if not fs.exists(path):
        raise FileNotFoundError(f"no LM checkpoint at {lm_url}: train one with `curate train-lm` or pass --lm")
    vocab = JointVocab.load(f"{root}/models/vocab.json")
    model = load_lm(lm_url, device)
    if model.cfg.vocab_size != vocab.size:
        raise ValueError(f"{lm_url} has {model.cfg.vocab_size} ids, {root}/models/vocab.json {vocab.size}")
    vq_url = f"{root}/models/vq/vq.safetensors"
    vq = load_vq(vq_url, device)
    if vq.cfg.codebook_size != vocab.num_image_codes:
        raise ValueError(f"{vq_url} has {vq.cfg.codebook_size} codes, the vocabulary {vocab.num_image_codes}")
    resolution, quality = curated_decode_settings(root)
    factor = vq.cfg.downsample_factor
    if resolution % factor:
        raise ValueError(f"curated resolution {resolution} is not a multiple of the VQ's factor {factor}")
    return RunModels(model, lm_url, url_sha256(lm_url), vocab, vq, vq_url, url_sha256(vq_url), resolution, resolution // factor,
                     quality)


def curated_pixels(image_path: str, resolution: int, jpeg_quality: int = 95) -> np.ndarray:
    """uint8 [resolution, resolution, 3] as the curated store would hold the image: EXIF
    orientation applied, shorter-side resize + centre crop in one bicubic resample (as
    `pipeline/stages/decode.py` does), then the store's JPEG round trip."""
    with fsspec.open(image_path, "rb") as handle:
        img = Image.open(io.BytesIO(handle.read()))
        img.load()
    img = ImageOps.exif_transpose(img).convert("RGB")
    side = min(img.size)
    left, top = (img.width - side) / 2, (img.height - side) / 2
    img = img.resize((resolution, resolution), Image.Resampling.BICUBIC, box=(left, top, left + side, top + side),
                     reducing_gap=3.0)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=jpeg_quality)
    return np.array(Image.open(buf).convert("RGB"), dtype=np.uint8)
