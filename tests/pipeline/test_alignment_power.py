"""Issue 16's "must show" at the model level: out-of-fold CLIP training on a corpus the tiny
CLIP can learn (generated coloured shapes, manifests/shapes.py), the calibrated filter's
power on swapped captions, and its refusal to filter with a model that has no power.

Everything real: the project's own `train_clip` (with `holdout`), `ClipEmbedder`, curated tar
shards read by the training stream, `calibrate`. Shards are written here as plain
webdataset tars (KEY.jpg + KEY.json, the curated store's format) so the test does not lean on
the store writer's internals.
"""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from manifests.shapes import COLOURS, SHAPES, shapes_corpus, swap_captions, write_shapes_corpus
from pipeline import storage
from pipeline.alignment_filter import calibrate, fold_of, mismatch_pairs
from pipeline.clip import ClipEmbedder, train_clip
from pipeline.clip.train import _training_pairs
from pipeline.config import ClipConfig, ClipTrainConfig
from tokenizer import shards

FOLDS = 2
N_ROWS = 720  # 20 per colour x shape x background class; each fold model trains on ~360
SWAP_FRACTION = 0.1
DRAWS = 5  # mismatched captions per image
BUDGET = 0.02
TRAIN = dict(max_steps=100, batch_size=64, warmup_steps=10, lr=1e-3, checkpoint_every=10_000,
             progress=False, num_threads=1)


def write_rows(folder: Path, rows: list[tuple[str, bytes, list[str]]]) -> str:
    """(asset_id, image, captions) rows as one curated-store shard, through the store's own
    writer (tokenizer.shards); returns the tar's path."""
    samples = sorted((storage.asset_key(a), image, {"asset_id": a, "captions": captions, "license_id": "CC0-1.0"})
                     for a, image, captions in rows)
    folder.mkdir(parents=True, exist_ok=True)
    return str(folder / shards.write_shard(str(folder), 0, samples)["tar"])


def score_rows(emb: ClipEmbedder, rows, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Matched scores of `rows` and DRAWS mismatched scores per row (captions of other rows)."""
    images = emb.embed_images([r.image for r in rows])
    texts = emb.embed_texts([r.caption for r in rows])
    pairs = mismatch_pairs(len(rows), DRAWS, seed)
    return (images * texts).sum(1), (images[pairs[:, 0]] * texts[pairs[:, 1]]).sum(1)


def out_of_fold_scores(rows, shard_urls: list[str], base: Path, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Train model k on every fold but k, score fold k with it; pooled over folds."""
    matched, mismatched = np.zeros(len(rows)), []
    for k in range(FOLDS):
        out = base / f"clip-fold{k}"
        train_clip(ClipConfig(arch="cpu-tiny", device="cpu"), ClipTrainConfig(seed=seed, **TRAIN),
                   shard_urls, str(out), holdout=(k, FOLDS))
        idx = [i for i, r in enumerate(rows) if fold_of(r.asset_id, FOLDS) == k]
        emb = ClipEmbedder(ClipConfig(arch="cpu-tiny", weights=str(out / "clip.safetensors"), device="cpu"))
        m, x = score_rows(emb, [rows[i] for i in idx], seed * 1000 + k)
        matched[idx] = m
        mismatched.append(x)
    return matched, np.concatenate(mismatched)




@pytest.fixture(scope="module")
def swapped_corpus(tmp_path_factory):
    rows, swapped = swap_captions(shapes_corpus(N_ROWS, seed=0), SWAP_FRACTION, seed=0)
    base = tmp_path_factory.mktemp("shapes")
    url = write_rows(base, [(r.asset_id, r.image, [r.caption]) for r in rows])
    return rows, swapped, [url], base


# ------------------------------------------------------------------------------ the corpus


def test_shapes_corpus_is_deterministic_and_captions_describe_the_image(tmp_path):
    rows = shapes_corpus(40, seed=3)
    assert rows == shapes_corpus(40, seed=3)
    assert rows != shapes_corpus(40, seed=4)
    for r in rows[:12]:
        assert r.caption == f"a {r.colour} {r.shape} on a {r.background} background"
        pixels = np.asarray(Image.open(io.BytesIO(r.image)).convert("RGB"))
        # the shape's colour is really in the picture
        assert (np.abs(pixels.astype(int) - COLOURS[r.colour]).sum(-1) < 60).mean() > 0.05
    swapped_rows, swapped = swap_captions(rows, 0.25, seed=1)
    assert len(swapped) == 10
    for before, after in zip(rows, swapped_rows):
        if after.asset_id in swapped:
            colour, shape = after.caption.split()[1:3]
            assert colour != before.colour and shape != before.shape and shape in SHAPES
        else:
            assert after == before
    manifest = write_shapes_corpus(tmp_path, rows[:3])
    lines = [json.loads(x) for x in manifest.read_text().splitlines()]
    assert [x["asset_id"] for x in lines] == [r.asset_id for r in rows[:3]]
    assert (tmp_path / lines[0]["uri"]).read_bytes() == rows[0].image


# ------------------------------------------------------------------- out-of-fold training


def test_holdout_stream_skips_exactly_the_held_out_fold(tmp_path):
    rows = [(f"a{i}", f"img{i}".encode(), [f"cap{i}"]) for i in range(60)]
    url = write_rows(tmp_path, rows)
    for k in range(FOLDS):
        stream = _training_pairs([url], 8, random.Random(0), holdout=(k, FOLDS))
        seen = {next(stream)[1] for _ in range(600)}
        expected = {f"cap{i}" for i in range(60) if fold_of(f"a{i}", FOLDS) != k}
        assert seen == expected
    everything = _training_pairs([url], 8, random.Random(0))
    assert {next(everything)[1] for _ in range(600)} == {f"cap{i}" for i in range(60)}


def test_holdout_training_records_its_fold_and_refuses_another_folds_checkpoint(tmp_path, swapped_corpus, one_torch_thread):
    _, _, urls, _ = swapped_corpus
    cfg, small = ClipConfig(arch="cpu-tiny", device="cpu"), dict(TRAIN, max_steps=1, batch_size=4)
    summary = train_clip(cfg, ClipTrainConfig(**small), urls, str(tmp_path / "f0"), holdout=(0, FOLDS))
    assert summary["holdout"] == {"fold": 0, "folds": FOLDS}
    with pytest.raises(ValueError, match="holdout"):
        train_clip(cfg, ClipTrainConfig(**small), urls, str(tmp_path / "f0"), holdout=(1, FOLDS))
    with pytest.raises(ValueError, match="holdout"):
        train_clip(cfg, ClipTrainConfig(**small), urls, str(tmp_path / "bad"), holdout=(2, FOLDS))
    plain = train_clip(cfg, ClipTrainConfig(**small), urls, str(tmp_path / "all"))
    assert "holdout" not in plain  # a run without folds writes the clip.json it always did


# ----------------------------------------------------------------------------- must show


@pytest.mark.slow
def test_power_out_of_fold_filter_catches_swapped_captions(swapped_corpus, one_torch_thread):
    """10 % of rows carry the caption of a different colour and shape. Out of fold, the
    calibrated filter must catch >= 90 % of them with <= 2 % false rejects of good rows."""
    rows, swapped, urls, base = swapped_corpus
    matched, mismatched = out_of_fold_scores(rows, urls, base, seed=0)
    cal = calibrate(matched, mismatched, BUDGET)
    assert cal.decision == "filter", cal
    bad = np.array([r.asset_id in swapped for r in rows])
    rejected = np.array([cal.rejects(s) for s in matched])
    assert rejected[bad].mean() >= 0.9, (rejected[bad].mean(), cal)
    assert rejected[~bad].mean() <= BUDGET, (rejected[~bad].mean(), cal)
    assert cal.expected_false_reject <= BUDGET


@pytest.mark.slow
def test_no_power_model_with_random_weights_rejects_nothing(swapped_corpus):
    rows, _, _, _ = swapped_corpus
    emb = ClipEmbedder(ClipConfig(arch="cpu-tiny", weights=None, device="cpu", num_threads=1))
    matched, mismatched = score_rows(emb, rows, seed=0)
    cal = calibrate(matched, mismatched, BUDGET)
    assert cal.decision == "too_weak", cal
    assert "too weak" in cal.reason
    assert np.mean([cal.rejects(s) for s in matched]) <= 0.01
