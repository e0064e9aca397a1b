"""The reference LM: causal, documents isolated in packed rows, RoPE positions that restart per
document, checkpoints that round-trip, and the registry's shapes."""

from __future__ import annotations

import json

import pytest
import torch

from trainer.collate import document_attention_mask
from trainer.model import CM3LM, LMConfig, get_lm_config, lm_config_names, load_lm, read_lm_meta, save_lm

VOCAB = 300


@pytest.fixture(scope="module")
def model() -> CM3LM:
    torch.manual_seed(0)
    return CM3LM(get_lm_config("cpu-tiny", VOCAB)).eval()


def tokens(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_future_tokens_do_not_change_past_logits(model):
    x = tokens(2, 24)
    changed = x.clone()
    changed[:, 12:] = tokens(2, 12, seed=2)
    assert not torch.equal(x, changed)
    for documents in (None, torch.zeros_like(x)):
        a, b = model(x, document_ids=documents), model(changed, document_ids=documents)
        assert torch.allclose(a[:, :12], b[:, :12], atol=1e-6)
        assert not torch.allclose(a[:, 12:], b[:, 12:], atol=1e-3)


@torch.no_grad()
def test_packed_row_equals_each_document_alone(model):
    first, second = tokens(1, 10, seed=3), tokens(1, 15, seed=4)
    row = torch.cat([first, second], dim=1)
    positions = torch.cat([torch.arange(10), torch.arange(15)])[None]
    documents = torch.cat([torch.zeros(10, dtype=torch.int64), torch.ones(15, dtype=torch.int64)])[None]
    packed = model(row, positions, documents)
    assert torch.allclose(packed[:, :10], model(first), atol=1e-5)
    assert torch.allclose(packed[:, 10:], model(second), atol=1e-5)
    # without the document mask the second document sees the first one
    assert not torch.allclose(model(row, positions)[:, 10:], model(second), atol=1e-3)


@torch.no_grad()
def test_rope_positions_restart_and_only_relative_offsets_matter(model):
    first, second = tokens(1, 10, seed=5), tokens(1, 15, seed=6)
    row = torch.cat([first, second], dim=1)
    documents = torch.cat([torch.zeros(10, dtype=torch.int64), torch.ones(15, dtype=torch.int64)])[None]
    restarted = torch.cat([torch.arange(10), torch.arange(15)])[None]
    running = torch.arange(25)[None]
    alone = model(second)
    assert torch.allclose(model(row, restarted, documents)[:, 10:], alone, atol=1e-5)
    # RoPE is relative: the same document at positions 10..24 gives the same logits ...
    assert torch.allclose(model(second, torch.arange(10, 25)[None]), alone, atol=1e-4)
    # ... but positions do matter inside a document: a permuted position sequence changes them
    assert not torch.allclose(model(second, torch.arange(15).flip(0)[None]), alone, atol=1e-3)
    assert torch.allclose(model(row, running, documents)[:, 10:], alone, atol=1e-4)


@torch.no_grad()
def test_document_mask_path_equals_plain_causal_path_for_one_document(model):
    x = tokens(3, 20, seed=7)
    assert torch.allclose(model(x), model(x, document_ids=torch.zeros_like(x)), atol=1e-5)
    assert document_attention_mask(torch.zeros_like(x)).shape == (3, 1, 20, 20)


@pytest.mark.parametrize("tied", [True, False])
def test_save_load_round_trip_gives_equal_outputs(tmp_path, tied):
    torch.manual_seed(1)
    cfg = LMConfig(name="test", vocab_size=VOCAB, n_layers=2, d_model=32, n_heads=2, tie_embeddings=tied)
    original = CM3LM(cfg).eval()
    weights = save_lm(original, str(tmp_path / "lm"), {"step": 7})
    assert weights.endswith("/lm/lm.safetensors") and (tmp_path / "lm" / "lm.json").exists()
    assert read_lm_meta(str(tmp_path / "lm"))["step"] == 7
    assert json.loads((tmp_path / "lm" / "lm.json").read_text())["config"]["tie_embeddings"] is tied
    # tied: the head is the embedding, stored once
    assert ("head.weight" in original.state_dict()) is not tied
    for source in (str(tmp_path / "lm"), weights):
        loaded = load_lm(source)
        assert loaded.cfg == cfg and not loaded.training
        x = tokens(2, 16, seed=8)
        with torch.no_grad():
            assert torch.equal(loaded(x), original(x))


def test_load_from_an_fsspec_url(tmp_path):
    import fsspec

    torch.manual_seed(2)
    original = CM3LM(LMConfig(name="test", vocab_size=VOCAB, n_layers=1, d_model=16, n_heads=2)).eval()
    save_lm(original, "memory://lm-test/lm")
    try:
        loaded = load_lm("memory://lm-test/lm")
        x = tokens(1, 8, seed=9)
        with torch.no_grad():
            assert torch.equal(loaded(x), original(x))
    finally:
        fsspec.filesystem("memory").rm("/lm-test", recursive=True)


def test_registry_shapes_and_parameter_counts():
    assert {"cpu-tiny", "cm3leon-350m"} <= set(lm_config_names())
    big = get_lm_config("cm3leon-350m", 64_512)
    assert (big.n_layers, big.d_model, big.n_heads, big.max_seq_len, big.vocab_size) == (24, 1024, 16, 4096, 64_512)
    with torch.device("meta"):  # shapes only, no memory
        meta = CM3LM(big)
    count = sum(p.numel() for p in meta.parameters())
    assert count == big.num_parameters()
    assert 330e6 < count < 400e6  # CM3leon's "350M" (368M with tied embeddings)
    tiny = get_lm_config("cpu-tiny", 3000)
    assert (tiny.n_layers, tiny.d_model, tiny.n_heads) == (4, 128, 4)
    assert sum(p.numel() for p in CM3LM(tiny).parameters()) == tiny.num_parameters() < 2e6
    with pytest.raises(KeyError, match="cpu-tiny"):
        get_lm_config("gpt-5", 100)
    with pytest.raises(ValueError, match="heads"):
        LMConfig(name="bad", vocab_size=10, n_layers=1, d_model=30, n_heads=4)
    assert LMConfig.from_dict(big.to_dict()) == big
