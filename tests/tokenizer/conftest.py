"""Fixtures: tiny curated stores built in tmp dirs from the real demo photos and captions."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.config import DecodeConfig
from pipeline.stages.decode import decode_image
from tokenizer.shards import write_store
from tokenizer.vq.config import VQConfig
from tokenizer.vq.model import VQModel

REPO = Path(__file__).resolve().parents[2]
DEMO_IMAGES = REPO / "manifests" / "demo" / "images"
CAPTION_MANIFEST = REPO / "manifests" / "demo" / "coco.jsonl"  # inside the repo: tests read nothing outside it

# Small enough that a training step on 4 crops of 32 px takes milliseconds.
TINY = VQConfig(
    name="test-tiny",
    resolution=64,
    patch_size=2,
    base_channels=16,
    channel_mult=(1, 1),
    num_res_blocks=1,
    norm_groups=4,
    latent_channels=16,
    codebook_size=64,
    code_dim=4,
    usage_decay=0.9,
    dead_code_threshold=0.05,
    restart_every=2,
)


@pytest.fixture(scope="module", autouse=True)
def _single_threaded(one_torch_thread):
    """Every test here runs with one torch thread (tests/conftest.py)."""


@pytest.fixture(scope="session")
def tiny_cfg() -> VQConfig:
    return TINY


@pytest.fixture(scope="session")
def demo_photos() -> list[Path]:
    photos = sorted(DEMO_IMAGES.glob("*.jpg"))
    assert photos, f"demo photos missing from {DEMO_IMAGES}"
    return photos


def _load_caption_rows() -> dict[str, dict]:
    """Demo manifest rows keyed by image file name."""
    rows = [json.loads(line) for line in CAPTION_MANIFEST.read_text().splitlines() if line.strip()]
    return {Path(r["uri"]).name: r for r in rows}


@pytest.fixture(scope="session")
def caption_rows() -> dict[str, dict]:
    rows = _load_caption_rows()
    assert len(rows) >= 100, f"{CAPTION_MANIFEST} has {len(rows)} rows"
    return rows


@pytest.fixture(scope="session")
def demo_captions(caption_rows) -> list[str]:
    return [c for r in caption_rows.values() for c in r["captions"]]


def _curated(tmp_path_factory, photos: list[Path], captions: dict[str, dict], n: int, per_shard: int, name: str):
    out = tmp_path_factory.mktemp(name)
    samples = []
    for p in photos[:n]:
        asset_id = f"coco-{p.stem}"
        key = hashlib.sha256(asset_id.encode()).hexdigest()[:16]
        caps = captions[p.name]["captions"]  # every demo photo has its manifest row: a missing one fails here
        jpeg = decode_image(p.read_bytes(), DecodeConfig(), hash_kind=None).jpeg  # what the pipeline stores
        samples.append((key, jpeg, {"asset_id": asset_id, "key": key, "captions": caps, "license_id": "CC-BY-2.0"}))
    urls = write_store(samples, str(out), per_shard=per_shard)
    return {"dir": str(out), "urls": urls, "samples": sorted(samples, key=lambda s: s[0])}


@pytest.fixture(scope="session")
def curated_store(tmp_path_factory, demo_photos):
    """24 real photos at 256 px in 3 shards (at least one of them falls in the held-out split)."""
    captions = _load_caption_rows()
    return _curated(tmp_path_factory, demo_photos, captions, 24, 8, "curated")


@pytest.fixture(scope="session")
def real_batch(curated_store) -> np.ndarray:
    """uint8 [4, 256, 256, 3] real photos."""
    from tokenizer.shards import decode_rgb

    return np.stack([np.asarray(decode_rgb(s[1])) for s in curated_store["samples"][:4]])


@pytest.fixture()
def data_initialised_model(tiny_cfg, real_batch) -> VQModel:
    """A tiny model whose codebook was seeded from real encodings (so codes are diverse)."""
    torch.manual_seed(0)
    model = VQModel(tiny_cfg)
    x = torch.from_numpy(real_batch).permute(0, 3, 1, 2).float() / 127.5 - 1
    model.train()
    with torch.no_grad():
        model(x)
    return model.eval()
