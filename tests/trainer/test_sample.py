"""Sampling from the reference LM (`trainer/sample.py`, `trainer/kv_cache.py`): a random-init tiny
LM over the real joint vocabulary of `conftest.token_shards` (a BPE trained on the demo captions,
512 image codes), a tiny VQ, and a run folder laid out like the pipeline's."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tokenizer.cm3 import CM3Format, build_document, build_sequence, sequence_documents
from pipeline.config import DecodeConfig
from pipeline.stages.decode import decode_image
from tokenizer.shards import write_store
from tokenizer.vq.config import VQConfig
from tokenizer.vq.model import VQModel, save_vq
from trainer.kv_cache import CachedLM
from trainer.model import CM3LM, LMConfig, save_lm
from trainer.run_models import curated_decode_settings
from trainer.sample import (
    SampleConfig,
    caption_candidates,
    caption_prompt,
    caption_to_image,
    draw,
    image_prompt,
    image_to_caption,
    load_run_models,
    neighbour_documents,
    render_ids,
    sample_caption_ids,
    sample_image_codes,
    unconditional_image_prompt,
    write_samples,
)

REPO = Path(__file__).resolve().parents[2]
PHOTO = sorted((REPO / "manifests" / "demo" / "images").glob("*.jpg"))[0]
GRID = 4
RESOLUTION = 16  # TINY_VQ is f4: 16 px -> 4 x 4 codes
CAPTION = "a dog running on the beach"



def tiny_lm(vocab_size: int, seed: int = 0) -> CM3LM:
    """Random init, wide enough (std 0.3, not 0.02) that next-token logits depend on the prompt:
    otherwise guided, conditional and unconditional samples would agree by accident."""
    torch.manual_seed(seed)
    return CM3LM(LMConfig(name="test-tiny", vocab_size=vocab_size, n_layers=2, d_model=32, n_heads=2,
                          init_std=0.3)).eval()


def constant_lm(vocab_size: int, token: int, strength: float) -> CM3LM:
    """A real CM3LM whose every next-token logit is `strength * d_model` for `token` and 0 for
    every other id, whatever the prompt: blocks add nothing, every embedding is all ones, and
    the (untied) head reads only the row of `token`."""
    model = CM3LM(LMConfig(name="constant", vocab_size=vocab_size, n_layers=1, d_model=16, n_heads=2,
                           tie_embeddings=False))
    with torch.no_grad():
        for block in model.blocks:
            block.attn.out.weight.zero_()
            block.mlp.down.weight.zero_()
        model.embed.weight.fill_(1.0)
        model.head.weight.zero_()
        model.head.weight[token] = strength
    return model.eval()


@pytest.fixture(scope="module")
def vocab(token_shards):
    return token_shards.vocab


@pytest.fixture(scope="module")
def model(vocab) -> CM3LM:
    return tiny_lm(vocab.size)


TINY_VQ = VQConfig(name="test-tiny", resolution=RESOLUTION, patch_size=2, base_channels=16, channel_mult=(1, 1),
                   num_res_blocks=1, norm_groups=4, latent_channels=16, codebook_size=512, code_dim=4)


def build_run_out(out: Path, tokens_dir: str, model: CM3LM) -> Path:
    """OUT/ as the pipeline and `curate train-lm` leave it: models/ (vocab + BPE, VQ, LM),
    tokens/, run.json with the curated resolution."""
    shutil.copytree(tokens_dir, out / "tokens")
    (out / "models").mkdir()
    for name in ("vocab.json", "text-bpe.json"):
        shutil.copy(Path(tokens_dir) / name, out / "models" / name)
    torch.manual_seed(0)
    save_vq(VQModel(TINY_VQ), str(out / "models" / "vq"))
    save_lm(model, str(out / "models" / "lm"))
    (out / "run.json").write_text(json.dumps({"config": {"decode": {"resolution": RESOLUTION, "jpeg_quality": 95}}}))
    return out


@pytest.fixture(scope="module")
def run_out(tmp_path_factory, token_shards, model) -> Path:
    return build_run_out(tmp_path_factory.mktemp("run"), token_shards.dir, model)


# the key/value cache ---------------------------------------------------------------------------
def test_incremental_decoding_equals_a_full_forward(model, vocab):
    tokens = torch.randint(0, vocab.size, (2, 40), generator=torch.Generator().manual_seed(0))
    full = model(tokens)
    cache = CachedLM(model, max_len=40, batch_size=2)
    pieces = [cache.feed(tokens[:, :10], all_logits=True)]  # a prompt, then one token at a time, then a chunk
    pieces += [cache.feed(tokens[:, t : t + 1], all_logits=True) for t in range(10, 33)]
    last = cache.feed(tokens[:, 33:])
    pieces.append(full[:, 33:])
    torch.testing.assert_close(torch.cat(pieces[:-1], dim=1), full[:, :33], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(last, full[:, -1], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="holds 40 tokens"):
        cache.feed(tokens[:, :1])


# prompts ---------------------------------------------------------------------------------------
def test_unconditional_prompt_is_the_masked_caption_form(vocab):
    uncond = unconditional_image_prompt(vocab)
    assert uncond.tolist() == [vocab.bos_id, vocab.mask_ids[0], vocab.img_begin_id]
    assert render_ids(vocab, uncond) == "<bos> <mask:0> <img>"


def test_a_caption_spelling_img_stays_plain_text(vocab):
    caption = "a sign that reads <img> and </img> <break> <mask:0>"
    prompt = image_prompt(vocab, caption)
    assert prompt[0] == vocab.bos_id and prompt[-1] == vocab.img_begin_id
    assert (prompt == vocab.img_begin_id).sum() == 1  # only the real one, at the end
    specials = set(vocab.specials.values()) | set(vocab.mask_ids)
    assert not specials & set(prompt[1:-1].tolist())
    assert vocab.ids_to_text(prompt[1:-1]) == caption
    assert render_ids(vocab, prompt) == f"<bos> {json.dumps(caption)} <img>"


def test_retrieval_prepends_documents_separated_by_break(vocab, token_shards):
    keys = sorted(token_shards.sequences)[:3]
    found = neighbour_documents(token_shards.dir, [keys[0], "no-such-key", keys[1]], [0.8, 0.7, 0.6])
    assert [(n.key, n.score) for n in found] == [(keys[0], 0.8), (keys[1], 0.6)]  # a missing key is skipped
    for n in found:  # the main document: the end of its own sequence, before eos
        stored = token_shards.sequences[n.key]
        assert stored[-len(n.tokens) - 1 : -1].tolist() == n.tokens.tolist()
        assert stored[-len(n.tokens) - 2] in (vocab.bos_id, vocab.break_id)
        assert vocab.break_id not in n.tokens.tolist() and (n.tokens == vocab.img_begin_id).sum() == 1
    prompt = image_prompt(vocab, CAPTION, [n.tokens for n in found])
    caption = vocab.text_to_ids(CAPTION).tolist()
    assert prompt.tolist() == ([vocab.bos_id] + found[0].tokens.tolist() + [vocab.break_id] + found[1].tokens.tolist()
                               + [vocab.break_id] + caption + [vocab.img_begin_id])
    assert render_ids(vocab, prompt).startswith("<bos> ")
    assert render_ids(vocab, prompt).count("<break>") == 2


def test_sequence_documents_inverts_build_sequence(vocab):
    rng = np.random.default_rng(0)
    docs = [build_document(vocab, vocab.text_to_ids(f"caption {i} <break>"), rng.integers(0, 512, (2, 2)),
                           CM3Format(image_first=bool(i % 2))) for i in range(3)]
    for fmt in (CM3Format(), CM3Format(add_bos=False, add_eos=False)):
        back = sequence_documents(vocab, build_sequence(vocab, docs[:2], docs[2], fmt))
        assert [d.tolist() for d in back] == [d.tolist() for d in docs]


# caption -> image ------------------------------------------------------------------------------
def test_image_sampling_always_yields_grid_squared_image_codes(model, vocab):
    for seed in range(6):
        for grid in (GRID, 3):
            cfg = SampleConfig(temperature=5.0, top_p=1.0, cfg_scale=3.0, seed=seed)
            codes = caption_to_image(model, vocab, CAPTION, grid, cfg)
            assert codes.shape == (grid, grid) and codes.dtype == np.int64
            assert codes.min() >= 0 and codes.max() < vocab.num_image_codes
    # a model that always wants to end the sequence still has to draw an image
    eos_lover = constant_lm(vocab.size, vocab.eos_id, strength=4.0)
    prompt = image_prompt(vocab, CAPTION)
    assert int(eos_lover(torch.as_tensor(prompt.astype(np.int64))[None])[0, -1].argmax()) == vocab.eos_id
    for cfg in (SampleConfig(seed=1), SampleConfig(temperature=0.0), SampleConfig(cfg_scale=1.0, top_p=1.0)):
        codes = caption_to_image(eos_lover, vocab, CAPTION, GRID, cfg)
        assert codes.shape == (GRID, GRID) and 0 <= codes.min() and codes.max() < vocab.num_image_codes


def test_same_seed_same_image_other_seed_other_image(model, vocab):
    cfg = SampleConfig(temperature=1.5, top_p=1.0, seed=7)
    first = caption_to_image(model, vocab, CAPTION, GRID, cfg)
    assert np.array_equal(first, caption_to_image(model, vocab, CAPTION, GRID, cfg))
    assert not np.array_equal(first, caption_to_image(model, vocab, CAPTION, GRID, SampleConfig(temperature=1.5, top_p=1.0, seed=8)))


def test_guidance_at_scale_one_is_conditional_sampling(model, vocab):
    prompt, uncond = image_prompt(vocab, CAPTION), unconditional_image_prompt(vocab)
    cfg = SampleConfig(temperature=1.5, top_p=1.0, cfg_scale=1.0, seed=3)
    conditional = sample_image_codes(model, vocab, prompt, GRID, cfg)
    assert np.array_equal(sample_image_codes(model, vocab, prompt, GRID, cfg, uncond), conditional)
    assert np.array_equal(caption_to_image(model, vocab, CAPTION, GRID, cfg), conditional)
    # scale 0 is the unconditional stream alone, and a larger scale moves away from the conditional one
    zero = SampleConfig(temperature=1.5, top_p=1.0, cfg_scale=0.0, seed=3)
    unconditional = sample_image_codes(model, vocab, uncond, GRID, zero)
    assert np.array_equal(sample_image_codes(model, vocab, prompt, GRID, zero, uncond), unconditional)
    assert not np.array_equal(unconditional, conditional)
    guided = caption_to_image(model, vocab, CAPTION, GRID, SampleConfig(temperature=1.5, top_p=1.0, cfg_scale=5.0, seed=3))
    assert not np.array_equal(guided, conditional)


def test_top_p_and_temperature(vocab):
    scores = torch.tensor([0.0, 3.0, 2.9, -1.0])
    gen = torch.Generator().manual_seed(0)
    assert {draw(scores, SampleConfig(top_p=0.01), gen) for _ in range(50)} == {1}  # the nucleus is the top id
    assert {draw(scores, SampleConfig(temperature=0.0), gen) for _ in range(5)} == {1}
    assert {draw(scores, SampleConfig(top_p=0.9), gen) for _ in range(200)} == {1, 2}  # 0 and 3 are the tail
    assert {draw(scores, SampleConfig(top_p=1.0, temperature=10.0), gen) for _ in range(200)} == {0, 1, 2, 3}
    with pytest.raises(ValueError):
        SampleConfig(top_p=0.0)


# image -> caption ------------------------------------------------------------------------------
def test_captions_hold_only_text_ids_and_stop_at_eos_or_max(model, vocab):
    allowed = set(caption_candidates(vocab).tolist()) - {vocab.eos_id}
    specials = set(vocab.specials.values()) | set(vocab.mask_ids)
    assert not allowed & specials and max(allowed) < vocab.bpe_size
    codes = np.random.default_rng(0).integers(0, vocab.num_image_codes, (GRID, GRID))
    prompt = caption_prompt(vocab, codes)
    assert prompt.tolist() == [vocab.bos_id, vocab.img_begin_id, *vocab.codes_to_ids(codes).ravel().tolist(), vocab.img_end_id]
    for seed in range(8):
        ids = sample_caption_ids(model, vocab, prompt, SampleConfig(temperature=3.0, top_p=1.0, max_caption_tokens=12, seed=seed))
        assert 0 < len(ids) <= 12 and set(ids.tolist()) <= allowed
    assert isinstance(image_to_caption(model, vocab, codes, SampleConfig(max_caption_tokens=5)), str)
    stops = constant_lm(vocab.size, vocab.eos_id, strength=4.0)
    assert len(sample_caption_ids(stops, vocab, prompt, SampleConfig(max_caption_tokens=12))) == 0
    never_stops = constant_lm(vocab.size, vocab.eos_id, strength=-4.0)
    ids = sample_caption_ids(never_stops, vocab, prompt, SampleConfig(top_p=1.0, max_caption_tokens=12))
    assert len(ids) == 12 and set(ids.tolist()) <= allowed
    img_lover = constant_lm(vocab.size, vocab.img_begin_id, strength=4.0)  # specials are never drawn
    ids = sample_caption_ids(img_lover, vocab, prompt, SampleConfig(max_caption_tokens=12))
    assert len(ids) == 12 and set(ids.tolist()) <= allowed


# a run's folder --------------------------------------------------------------------------------
def test_write_samples_writes_a_png_a_caption_and_their_records(run_out, model, vocab):
    cfg = SampleConfig(seed=5, max_caption_tokens=8)
    result = write_samples(str(run_out), CAPTION, str(PHOTO), cfg)
    assert result["grid"] == GRID
    png = Path(result["image"]["png"])
    assert png.parent == run_out / "samples"
    with Image.open(png) as img:
        img.load()
        assert img.format == "PNG" and img.size == (RESOLUTION, RESOLUTION) and img.mode == "RGB"
    record = json.loads(Path(result["image"]["json"]).read_text())
    lm_sha = hashlib.sha256((run_out / "models" / "lm" / "lm.safetensors").read_bytes()).hexdigest()
    assert record["lm"]["sha256"] == lm_sha == result["lm_sha256"]
    assert record["caption"] == CAPTION and record["settings"] == cfg.to_dict() and record["grid"] == GRID
    assert record["prompt"]["ids"] == image_prompt(vocab, CAPTION).tolist()
    assert record["unconditional_prompt"]["text"] == "<bos> <mask:0> <img>"
    assert np.array_equal(np.array(record["codes"]), result["image"]["codes"])
    assert np.array_equal(result["image"]["codes"], caption_to_image(model, vocab, CAPTION, GRID, cfg))
    text = Path(result["caption"]["txt"]).read_text().rstrip("\n")
    caption_record = json.loads(Path(result["caption"]["json"]).read_text())
    assert text == result["caption"]["text"] == caption_record["caption"]
    assert caption_record["prompt"]["text"] == f"<bos> <img> [{GRID * GRID} image codes] </img>"
    assert caption_record["stopped_by"] in ("eos", "max_caption_tokens") and len(caption_record["caption_ids"]) <= 8
    # the same seed writes the same files again; another seed writes new ones
    png_bytes = png.read_bytes()
    again = write_samples(str(run_out), CAPTION, None, cfg)
    assert again["image"]["png"] == str(png) and png.read_bytes() == png_bytes
    other = write_samples(str(run_out), CAPTION, None, SampleConfig(seed=6), out_dir=str(run_out / "other"))
    assert Path(other["image"]["png"]).parent == run_out / "other" and Path(other["image"]["png"]).name != png.name


def test_run_models_are_checked_against_each_other(run_out, vocab, tmp_path):
    models = load_run_models(str(run_out))
    assert (models.resolution, models.grid, models.vq.cfg.downsample_factor) == (RESOLUTION, GRID, 4)
    save_lm(tiny_lm(vocab.size + 1), str(tmp_path / "wrong-lm"))
    with pytest.raises(ValueError, match="ids"):
        load_run_models(str(run_out), lm=str(tmp_path / "wrong-lm"))
    with pytest.raises(FileNotFoundError, match="train-lm"):
        load_run_models(str(run_out), lm=str(tmp_path / "missing"))


def test_resolution_from_curated_images_without_run_json(tmp_path):
    jpeg = decode_image(PHOTO.read_bytes(), DecodeConfig(resolution=24), hash_kind=None).jpeg
    write_store([("k1", jpeg, {"key": "k1"})], str(tmp_path / "curated"))
    assert curated_decode_settings(str(tmp_path)) == (24, 95)
    (tmp_path / "run.json").write_text(json.dumps({"config": {"decode": {"resolution": 128, "jpeg_quality": 90}}}))
    assert curated_decode_settings(str(tmp_path)) == (128, 90)


def test_trainer_sample_does_not_import_beam():
    import subprocess
    import sys

    code = "import sys, trainer.sample; assert 'apache_beam' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
