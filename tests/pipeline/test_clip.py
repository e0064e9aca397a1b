"""CLIP training, safe loading of user weights, and scoring on the real demo photos.

The helpers at the top (demo corpus → curated shards, the trained tiny CLIP) are shared with
test_align.py and test_retrieval.py; the trained checkpoint is cached under pytest's
session temp dir so the session trains once.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline import storage
from pipeline.config import ClipConfig, ClipTrainConfig, DecodeConfig
from pipeline.stages.decode import decode_image
from pipeline.clip import (
    BUILTIN_ARCHS,
    ClipEmbedder,
    build_model,
    document_embedding,
    iter_curated_samples,
    load_clip,
    read_state_dict,
    register_model_config,
    train_clip,
)
from pipeline.clip.train import contrastive_loss
from tokenizer.shards import write_shard

REPO = Path(__file__).resolve().parents[2]
DEMO_IMAGES = REPO / "manifests" / "demo" / "images"
CAPTION_SOURCE = REPO / "manifests" / "demo" / "coco.jsonl"  # inside the repo: tests read nothing outside it
TRAIN_STEPS = 60


def demo_pairs() -> list[tuple[str, Path, list[str]]]:
    """(asset_id, image path, captions) for every demo photo, sorted by asset id."""
    pairs = []
    for line in CAPTION_SOURCE.read_text().splitlines():
        row = json.loads(line)
        name = Path(row.get("uri") or row.get("path") or row["file_name"]).name
        if (DEMO_IMAGES / name).exists() and row.get("captions"):
            pairs.append((str(row.get("asset_id") or Path(name).stem), DEMO_IMAGES / name, list(row["captions"])))
    return sorted(pairs)


def curated_jpeg(path: Path) -> bytes:
    """What the pipeline stores for a photo: its own decode and normalisation (256² centre crop, JPEG)."""
    return decode_image(path.read_bytes(), DecodeConfig(), hash_kind=None).jpeg


def write_curated_shard(out_dir: str, shard: int, samples: list[tuple[str, bytes, list[str]]]) -> str:
    """`out_dir/images-NNNNNN.tar` (+ its metadata Parquet) from (asset_id, jpeg, captions), through
    the store's writer; returns the tar's path."""
    keyed = sorted((storage.asset_key(a), a, jpg, caps) for a, jpg, caps in samples)
    entry = write_shard(out_dir, shard, (
        (key, jpg, {"asset_id": a, "key": key, "shard": shard, "captions": caps, "license_id": "CC-BY-4.0",
                    "cluster_id": None}) for key, a, jpg, caps in keyed))
    return f"{out_dir}/{entry['tar']}"


def demo_corpus(base: Path) -> tuple[list[str], list[tuple[str, bytes, list[str]]]]:
    """The demo photos as two curated shards (cached in `base`) and the in-memory samples."""
    samples = [(a, curated_jpeg(p), caps) for a, p, caps in demo_pairs()]
    half = len(samples) // 2
    urls = [str(base / f"images-{i:06d}.tar") for i in range(2)]
    if not all(Path(u).exists() for u in urls):
        write_curated_shard(str(base), 0, samples[:half])
        write_curated_shard(str(base), 1, samples[half:])
    return urls, samples


def trained_clip_dir(base: Path, shard_urls: list[str]) -> Path:
    """Train the cpu-tiny CLIP on the demo corpus once per session (~20 s on 2 cores)."""
    out = base / "clip-cpu-tiny"
    if not (out / "clip.safetensors").exists():
        train_clip(ClipConfig(arch="cpu-tiny", device="cpu"),
                   ClipTrainConfig(max_steps=TRAIN_STEPS, batch_size=64, warmup_steps=10, lr=1e-3,
                                   checkpoint_every=1000, progress=False, seed=0, num_threads=1),
                   shard_urls, str(out))
    return out


@pytest.fixture(scope="session")
def demo_shards(tmp_path_factory) -> tuple[list[str], list[tuple[str, bytes, list[str]]]]:
    return demo_corpus(tmp_path_factory.getbasetemp() / "demo-curated")


@pytest.fixture(scope="session")
def trained_clip(tmp_path_factory, demo_shards) -> Path:
    return trained_clip_dir(tmp_path_factory.getbasetemp(), demo_shards[0])


def auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """P(matched score > mismatched score), ties half."""
    diff = pos[:, None] - neg[None, :]
    return float((diff > 0).mean() + 0.5 * (diff == 0).mean())


# ------------------------------------------------------------------------------------ tests


def test_streaming_reader_groups_members_by_key(tmp_path):
    url = write_curated_shard(str(tmp_path), 0, [("a", b"jpg-a", ["x"]), ("b", b"jpg-b", ["y", "z"])])
    got = {s["meta"]["asset_id"]: (s["jpg"], s["meta"]["captions"]) for s in iter_curated_samples([url])}
    assert got == {"a": (b"jpg-a", ["x"]), "b": (b"jpg-b", ["y", "z"])}


@pytest.mark.slow
def test_training_writes_checkpoint_with_config_and_learns(trained_clip):
    summary = json.loads((trained_clip / "clip.json").read_text())
    assert summary["steps"] == TRAIN_STEPS
    assert summary["model_cfg"] == BUILTIN_ARCHS["cpu-tiny"]
    assert summary["final_loss"] < summary["first_loss"] - 0.3
    # the weights load strictly into the arch named in clip.json (and via the json itself)
    model, _, _ = load_clip(str(trained_clip / "clip.json"), str(trained_clip / "clip.safetensors"), "cpu")
    assert model.visual.image_size in (64, (64, 64))


@pytest.mark.slow
def test_trained_clip_scores_matched_captions_above_shuffled(trained_clip, demo_shards):
    _, samples = demo_shards
    emb = ClipEmbedder(ClipConfig(arch="cpu-tiny", weights=str(trained_clip / "clip.safetensors"), device="cpu"))
    images = emb.embed_images([jpg for _, jpg, _ in samples])
    texts = emb.embed_texts([caps[0] for _, _, caps in samples])
    matched = (images * texts).sum(1)
    shuffled = (images * np.roll(texts, 7, axis=0)).sum(1)
    assert auc(matched, shuffled) > 0.75


def test_resume_continues_from_checkpoint(tmp_path, demo_shards):
    shards = demo_shards[0][:1]
    cfg = ClipConfig(arch="cpu-tiny", device="cpu")
    small = dict(batch_size=8, warmup_steps=1, checkpoint_every=2, progress=False, shuffle_buffer=16)
    first = train_clip(cfg, ClipTrainConfig(max_steps=2, **small), shards, str(tmp_path))
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert first["steps"] == 2 and ckpt["step"] == 2
    second = train_clip(cfg, ClipTrainConfig(max_steps=3, **small), shards, str(tmp_path))
    assert second["steps"] == 3
    assert len(torch.load(tmp_path / "checkpoint.pt", weights_only=True)["losses"]) == 3  # 2 resumed + 1 new


def _reference_embeddings(model: torch.nn.Module, preprocess, tokenizer, jpgs, captions) -> np.ndarray:
    from tokenizer.shards import decode_rgb

    with torch.inference_mode():
        img = model.encode_image(torch.stack([preprocess(decode_rgb(j)) for j in jpgs]))
        txt = model.encode_text(tokenizer(captions))
    return torch.cat([img, txt]).numpy()


def test_user_weights_load_from_path_and_memory_identically(tmp_path, demo_shards):
    from safetensors.torch import save as save_safetensors

    _, samples = demo_shards
    jpgs, caps = [s[1] for s in samples[:4]], [s[2][0] for s in samples[:4]]
    torch.manual_seed(123)
    reference = build_model(BUILTIN_ARCHS["cpu-tiny"]).eval()
    state = reference.state_dict()
    _, preprocess, tokenizer = load_clip("cpu-tiny", None, "cpu")
    expected = _reference_embeddings(reference, preprocess, tokenizer, jpgs, caps)

    # an open_clip-style training checkpoint (DDP prefix, under "state_dict") on local disk
    pt = tmp_path / "epoch_3.pt"
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state.items()}}, pt)
    # safetensors and a bare torch state dict in fsspec memory://
    storage.write_bytes("memory://clip-test/weights.safetensors",
                        save_safetensors({k: v.contiguous() for k, v in state.items()}))
    buf = io.BytesIO()
    torch.save(state, buf)
    storage.write_bytes("memory://clip-test/weights.bin", buf.getvalue())

    for url in (str(pt), "memory://clip-test/weights.safetensors", "memory://clip-test/weights.bin"):
        model, preprocess, tokenizer = load_clip("cpu-tiny", url, "cpu")
        got = _reference_embeddings(model, preprocess, tokenizer, jpgs, caps)
        np.testing.assert_array_equal(got, expected, err_msg=url)
    fresh = build_model(BUILTIN_ARCHS["cpu-tiny"]).eval()
    assert not np.allclose(_reference_embeddings(fresh, preprocess, tokenizer, jpgs, caps), expected)


class _Payload:
    def __reduce__(self):  # what a malicious checkpoint would do on unpickling
        return (exec, ("raise SystemExit('pickle executed')",))


def test_pickled_code_in_checkpoint_is_refused(tmp_path):
    bad = tmp_path / "evil.pt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "hook": _Payload()}, bad)
    with pytest.raises(Exception) as err:
        read_state_dict(str(bad))
    assert "pickle executed" not in str(err.value)
    assert not isinstance(err.value, SystemExit)


def test_document_embedding_is_renormalised_mean():
    img, txt = np.array([3.0, 0.0]), np.array([0.0, 1.0])
    np.testing.assert_allclose(document_embedding(img, txt), [2 ** -0.5, 2 ** -0.5], rtol=1e-6)
    np.testing.assert_allclose(document_embedding(img, None), [1.0, 0.0])


def test_models_come_from_open_clips_registry_and_factory():
    """A built-in arch is an ordinary open_clip registry entry after loading, and the model
    load_clip builds (seed 0, no weights) is exactly what open_clip.create_model builds."""
    import open_clip

    model, _, _ = load_clip("cpu-tiny", None, "cpu")
    assert open_clip.get_model_config("cpu-tiny") == BUILTIN_ARCHS["cpu-tiny"]
    torch.manual_seed(0)
    direct = open_clip.create_model("cpu-tiny", pretrained=None, pretrained_text=False)
    for key, value in direct.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    # a config dict (a checkpoint's clip.json, a user's JSON) is registered under its content
    cfg = json.loads(json.dumps(BUILTIN_ARCHS["cpu-tiny"]))
    cfg["embed_dim"] = 64
    name = register_model_config(cfg)
    assert name.startswith("cm3curate-") and open_clip.get_model_config(name) == cfg
    assert register_model_config(json.loads(json.dumps(cfg))) == name
    assert build_model(cfg).text_projection.shape[1] == 64


def test_building_a_model_leaves_logging_alone(caplog):
    """open_clip's factory would configure the root logger and warn "initialized randomly"
    for every model, even one whose weights load_clip loads next."""
    import logging

    handlers = list(logging.getLogger().handlers)
    with caplog.at_level(logging.INFO):
        build_model(BUILTIN_ARCHS["cpu-tiny"], "cpu-tiny")
    assert not [r for r in caplog.records if "pretrained weights" in r.getMessage()]
    assert logging.getLogger().handlers == handlers


def test_training_loss_is_open_clips_with_the_previous_bits():
    """`contrastive_loss` is open_clip's ClipLoss, and gives the same value and gradients, to
    the bit, as the symmetric cross-entropy this project trained with before: the trained
    CLIP, and so every alignment score and index, stay byte-identical."""
    import open_clip
    import torch.nn.functional as F

    loss = contrastive_loss()
    assert isinstance(loss, open_clip.ClipLoss)
    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(16, 32, generator=g), dim=-1).requires_grad_()
    txt = F.normalize(torch.randn(16, 32, generator=g), dim=-1).requires_grad_()
    scale = torch.tensor(14.3)
    ours = loss(img, txt, scale)
    grads = torch.autograd.grad(ours, (img, txt))
    logits = scale * img @ txt.T
    target = torch.arange(16)
    before = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
    assert torch.equal(ours, before)
    for got, want in zip(grads, torch.autograd.grad(before, (img, txt))):
        assert torch.equal(got, want)
