"""The shard reader: exactly-once order over ranks and workers, exact resume, CM3 masking, packing,
fsspec reads, and agreement with Megatron-Core and with a reader written from the spec."""

from __future__ import annotations

import json
import pickle
import re
import runpy
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from tokenizer.cm3 import MaskConfig, unmask
from trainer.collate import PAD_DOCUMENT, document_attention_mask
from trainer.data import GlobalBatchSampler, ShardLoader
from trainer.dataset import TokenShardDataset, provenance

DOCS = Path(__file__).resolve().parents[2] / "docs" / "shards.md"
GBS = 6  # 40 sequences -> 6 full global batches and a partial one of 4



def run_epoch(loader: ShardLoader) -> list[dict]:
    return [batch for batch in loader]


def same_batches(a: list[dict], b: list[dict]) -> bool:
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if x["keys"] != y["keys"] or x["epoch"] != y["epoch"]:
            return False
        for name in ("tokens", "position_ids", "document_ids", "loss_mask", "indices", "rows", "starts", "lengths"):
            if not torch.equal(x[name], y[name]):
                return False
    return True


def sequences_of(batch: dict) -> list[np.ndarray]:
    """Each sequence of a batch, cut out of its row with `rows` / `starts` / `lengths`."""
    return [batch["tokens"][r, s : s + n].numpy() for r, s, n in
            zip(batch["rows"].tolist(), batch["starts"].tolist(), batch["lengths"].tolist())]


# order -------------------------------------------------------------------------------------
@pytest.mark.parametrize("num_samples", [40, 37])
@pytest.mark.parametrize("drop_last", [False, True])
def test_sampler_splits_every_global_batch_over_ranks_exactly_once(num_samples, drop_last):
    for gbs, world in [(6, 1), (6, 2), (6, 3), (8, 4), (12, 4), (4, 4)]:
        for epoch in (0, 1):
            order = np.random.default_rng([7, epoch]).permutation(num_samples)
            per_rank = []
            for rank in range(world):
                sampler = GlobalBatchSampler(num_samples, gbs, rank=rank, world_size=world, seed=7, drop_last=drop_last)
                sampler.epoch = epoch
                per_rank.append(list(sampler))
                assert len(per_rank[-1]) == len(sampler)
            assert len({len(batches) for batches in per_rank}) == 1  # every rank takes the same number of steps
            seen = []
            for step in zip(*per_rank):
                sizes = [len(b) for b in step]
                assert max(sizes) - min(sizes) <= 1  # even split, also of the last partial batch
                seen += [i for b in step for (e, i) in b]
                assert {e for b in step for (e, _) in b} <= {epoch}
            expected = num_samples - num_samples % gbs if drop_last else num_samples
            assert seen == order[:expected].tolist()  # contiguous slices, in the epoch's order


def test_order_depends_only_on_seed_and_epoch():
    a = GlobalBatchSampler(40, 8, seed=3)
    assert np.array_equal(a.order(2), np.random.default_rng([3, 2]).permutation(40))
    assert not np.array_equal(a.order(0), a.order(1))
    assert not np.array_equal(a.order(0), GlobalBatchSampler(40, 8, seed=4).order(0))
    with pytest.raises(ValueError, match="does not split evenly"):
        GlobalBatchSampler(40, 6, world_size=4)


def test_every_sequence_once_over_ranks_identical_for_any_worker_count(token_shards):
    batches = {}
    for workers in (0, 2):
        for rank in (0, 1):
            loader = ShardLoader(token_shards.dir, GBS, rank=rank, world_size=2, seed=11, num_workers=workers)
            got, steps = [], len(loader)
            for step, batch in enumerate(loader):
                got.append(batch)
                # counted when handed over (not when prefetched); after the last batch: next epoch
                expected = (1, 0) if step + 1 == steps else (0, (step + 1) * GBS)
                assert (loader.epoch, loader.consumed_samples) == expected
            batches[rank, workers] = got
    keys = [k for rank in (0, 1) for b in batches[rank, 0] for k in b["keys"]]
    assert len(keys) == len(set(keys)) == 40 and set(keys) == set(token_shards.sequences)
    assert [len(b["keys"]) for b in batches[0, 0]] == [3] * 6 + [2]
    for rank in (0, 1):
        assert same_batches(batches[rank, 0], batches[rank, 2])
    eight = run_epoch(ShardLoader(token_shards.dir, GBS, rank=1, world_size=2, seed=11, num_workers=8, prefetch_factor=1))
    assert same_batches(batches[1, 0], eight)
    # the stored tokens, masked: unmasking gives back exactly what the shards hold
    for batch in batches[0, 0]:
        for key, seq in zip(batch["keys"], sequences_of(batch)):
            assert np.array_equal(unmask(seq, token_shards.vocab), token_shards.sequences[key])


def test_a_rank_left_without_sequences_still_takes_the_last_step(token_shards):
    # 40 = 6 * 6 + 4: in the last global batch ranks 4 and 5 of 6 get nothing, but still a batch
    batches = run_epoch(ShardLoader(token_shards.dir, 6, rank=5, world_size=6, seed=1, pack=True, seq_len=256))
    assert len(batches) == 7 and [len(b["keys"]) for b in batches] == [1] * 6 + [0]
    assert batches[-1]["tokens"].shape == (0, 256) and batches[-1]["loss_mask"].sum() == 0


# resume ------------------------------------------------------------------------------------
def test_mid_epoch_resume_continues_the_uninterrupted_order(token_shards):
    reference = ShardLoader(token_shards.dir, GBS, seed=5)
    full = run_epoch(reference) + run_epoch(reference)  # two epochs: masking changes with the epoch
    # workers prefetch ahead; breaking out must not count what was prefetched but never handed over
    interrupted = ShardLoader(token_shards.dir, GBS, seed=5, num_workers=2, persistent_workers=True)
    head = []
    for batch in interrupted:
        head.append(batch)
        if len(head) == 3:
            break
    state = json.loads(json.dumps(interrupted.state_dict()))  # a checkpoint is plain JSON
    assert (state["epoch"], state["consumed_samples"]) == (0, 3 * GBS)
    resumed = ShardLoader(token_shards.dir, GBS, seed=5)
    resumed.load_state_dict(state)
    assert len(resumed) == 4
    rest = run_epoch(resumed) + run_epoch(resumed)
    assert same_batches(head + rest, full)
    assert same_batches(head + run_epoch(interrupted) + run_epoch(interrupted), full)  # same loader, iterated again


@pytest.mark.parametrize("before, after", [(2, 1), (1, 2)])
def test_resume_on_another_world_size_with_the_same_global_batch(token_shards, before, after):
    def global_batches(loaders):
        return [[k for b in step for k in b["keys"]] for step in zip(*(run_epoch(l) for l in loaders))]

    reference = global_batches([ShardLoader(token_shards.dir, GBS, seed=9)])
    first = [ShardLoader(token_shards.dir, GBS, rank=r, world_size=before, seed=9) for r in range(before)]
    its = [iter(l) for l in first]
    head = [[k for it in its for k in next(it)["keys"]] for _ in range(2)]
    state = first[0].state_dict()
    assert all(l.state_dict() == state for l in first)  # every rank checkpoints the same state
    second = [ShardLoader(token_shards.dir, GBS, rank=r, world_size=after, seed=9) for r in range(after)]
    for loader in second:
        loader.load_state_dict(state)
    assert head + global_batches(second) == reference


def test_resume_refuses_a_different_stream(token_shards, tmp_path):
    loader = ShardLoader(token_shards.dir, GBS, seed=1)
    next(iter(loader))
    state = loader.state_dict()
    with pytest.raises(ValueError, match="seed"):
        ShardLoader(token_shards.dir, GBS, seed=2).load_state_dict(state)
    with pytest.raises(ValueError, match="global_batch_size"):
        ShardLoader(token_shards.dir, 2 * GBS, seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match="mask"):
        ShardLoader(token_shards.dir, GBS, seed=1, mask=None).load_state_dict(state)
    with pytest.raises(ValueError, match="global batch boundary"):
        ShardLoader(token_shards.dir, GBS, seed=1).load_state_dict({**state, "consumed_samples": GBS + 1})
    with pytest.raises(ValueError, match="format"):
        ShardLoader(token_shards.dir, GBS, seed=1).load_state_dict({k: v for k, v in state.items() if k != "format"})
    changed = tmp_path / "tokens"
    shutil.copytree(token_shards.dir, changed)
    index = json.loads((changed / "index.json").read_text())
    (changed / "index.json").write_text(json.dumps({**index, "note": "re-tokenised"}, indent=2, sort_keys=True) + "\n")
    with pytest.raises(ValueError, match="index_sha256"):
        ShardLoader(str(changed), GBS, seed=1).load_state_dict(state)


# masking -----------------------------------------------------------------------------------
def image_blocks_are_whole(seq: np.ndarray, vocab, grid_codes: int) -> bool:
    """Every `<img>` is followed by exactly `grid_codes` image ids and `</img>`, anywhere in the
    masked sequence (body or moved spans): a span that cut a block would break this."""
    t = seq.tolist()
    begins = [i for i, x in enumerate(t) if x == vocab.img_begin_id]
    ends = [i for i, x in enumerate(t) if x == vocab.img_end_id]
    if len(begins) != len(ends):
        return False
    for b, e in zip(begins, ends):
        if e - b - 1 != grid_codes or not vocab.is_image(seq[b + 1 : e]).all():
            return False
    return True


def test_reader_masking_respects_breaks_and_images_and_inverts(token_shards):
    vocab = token_shards.vocab
    dataset = TokenShardDataset(token_shards.dir, seed=3)
    again = TokenShardDataset(token_shards.dir, seed=3)
    per_key = {}
    for epoch in range(10):
        for sample in dataset.__getitems__([(epoch, i) for i in range(len(dataset))]):
            original = token_shards.sequences[sample["key"]]
            masked = sample["tokens"]
            spans = int(np.isin(masked, vocab.mask_ids).sum()) // 2
            assert spans >= 1 and len(masked) == len(original) + 2 * spans
            assert np.array_equal(unmask(masked, vocab), original)
            assert image_blocks_are_whole(masked, vocab, 16)
            # no span crosses <break>: the breaks stay in the body, none moves to the tail
            tail = np.flatnonzero(masked == vocab.mask_ids[0])[-1]
            assert (masked[:tail] == vocab.break_id).sum() == (original == vocab.break_id).sum()
            assert np.array_equal(masked, again[(epoch, sample["index"])]["tokens"])  # deterministic
            per_key.setdefault(sample["key"], set()).add(masked.tobytes())
    assert np.mean([len(v) > 1 for v in per_key.values()]) > 0.9  # re-masked every epoch
    plain = TokenShardDataset(token_shards.dir, mask=None)
    assert all(np.array_equal(plain[i]["tokens"], token_shards.sequences[plain.key(i)]) for i in range(len(plain)))


# batches -----------------------------------------------------------------------------------
def test_padding_and_loss_mask_without_packing(token_shards):
    vocab = token_shards.vocab
    batch = next(iter(ShardLoader(token_shards.dir, 8, seed=2)))
    lengths = batch["lengths"]
    assert batch["tokens"].shape == (8, int(lengths.max()))
    valid = torch.arange(batch["tokens"].shape[1])[None] < lengths[:, None]
    assert (batch["tokens"][~valid] == vocab.pad_id).all() and (batch["document_ids"][~valid] == PAD_DOCUMENT).all()
    assert (batch["document_ids"][valid] == 0).all()
    sentinel = torch.isin(batch["tokens"], torch.tensor(vocab.mask_ids))
    expected = valid & ~sentinel & (batch["position_ids"] > 0)
    assert torch.equal(batch["loss_mask"], expected.float())
    assert sentinel.any() and (batch["loss_mask"][:, 0] == 0).all()
    fixed = next(iter(ShardLoader(token_shards.dir, 8, seed=2, seq_len=200)))
    assert fixed["tokens"].shape == (8, 200) and torch.equal(fixed["tokens"][:, : batch["tokens"].shape[1]], batch["tokens"])


def test_packing_keeps_sequences_whole_and_resets_positions(token_shards):
    vocab = token_shards.vocab
    seq_len = 256
    packed = run_epoch(ShardLoader(token_shards.dir, 12, seed=4, pack=True, seq_len=seq_len))
    padded = run_epoch(ShardLoader(token_shards.dir, 12, seed=4))
    seen = []
    for p, q in zip(packed, padded):
        tokens, pos, docs, loss = p["tokens"], p["position_ids"], p["document_ids"], p["loss_mask"]
        assert tokens.shape[1] == seq_len and tokens.shape[0] < len(p["keys"])  # several documents per row
        assert p["keys"] == q["keys"]
        assert [s.tolist() for s in sequences_of(p)] == [s.tolist() for s in sequences_of(q)]  # whole, same content
        covered = torch.zeros_like(tokens, dtype=torch.bool)
        for r, s, n in zip(p["rows"].tolist(), p["starts"].tolist(), p["lengths"].tolist()):
            assert torch.equal(pos[r, s : s + n], torch.arange(n))  # positions restart per document
            assert (docs[r, s : s + n] == docs[r, s]).all() and loss[r, s] == 0  # first token: not predictable
            assert not covered[r, s : s + n].any()
            covered[r, s : s + n] = True
        for row in docs:  # document ids count 0, 1, ... along a row
            ids = row[row != PAD_DOCUMENT]
            assert torch.equal(torch.unique_consecutive(ids), torch.arange(int(ids.max()) + 1))
        assert torch.equal(covered, docs != PAD_DOCUMENT)
        assert (tokens[~covered] == vocab.pad_id).all() and (loss[~covered] == 0).all()
        sentinel = torch.isin(tokens, torch.tensor(vocab.mask_ids))
        assert (loss[sentinel] == 0).all()
        assert torch.equal(loss.bool(), covered & ~sentinel & (pos > 0))
        seen += p["keys"]
    assert sorted(seen) == sorted(token_shards.sequences)


def test_seq_len_that_cannot_hold_a_masked_sequence_is_refused_at_construction(token_shards):
    longest = max(len(s) for s in token_shards.sequences.values())
    with pytest.raises(ValueError, match="too short"):
        ShardLoader(token_shards.dir, 4, pack=True, seq_len=longest + 31)  # 16 spans may add 32 tokens
    ShardLoader(token_shards.dir, 4, pack=True, seq_len=longest + 32)
    ShardLoader(token_shards.dir, 4, pack=True, seq_len=longest, mask=None)
    ShardLoader(token_shards.dir, 4, pack=True, seq_len=longest + 4, mask=MaskConfig(max_spans=2))
    with pytest.raises(ValueError, match="too short"):
        ShardLoader(token_shards.dir, 4, pack=True, seq_len=longest - 1, mask=None)


def test_document_attention_mask_equals_attention_per_document(token_shards):
    batch = next(iter(ShardLoader(token_shards.dir, 12, seed=4, pack=True, seq_len=256)))
    docs = batch["document_ids"]
    rows, length = docs.shape
    q, k, v = torch.randn(3, rows, 2, length, 8, generator=torch.Generator().manual_seed(0)).unbind(0)
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=document_attention_mask(docs))
    assert not out.isnan().any()  # padding rows are not empty
    for r, s, n in zip(batch["rows"].tolist(), batch["starts"].tolist(), batch["lengths"].tolist()):
        alone = torch.nn.functional.scaled_dot_product_attention(q[r : r + 1, :, s : s + n], k[r : r + 1, :, s : s + n],
                                                                 v[r : r + 1, :, s : s + n], is_causal=True)
        torch.testing.assert_close(out[r : r + 1, :, s : s + n], alone)


# storage and format ------------------------------------------------------------------------
def test_memory_filesystem_reads_the_same_tokens_as_local_memmaps(token_shards, memory_token_shards):
    local, remote = TokenShardDataset(token_shards.dir), TokenShardDataset(memory_token_shards)
    assert local.index_sha256 == remote.index_sha256 and not remote._local and local._local
    everything = list(range(len(local)))
    for a, b in zip(local.raw_tokens(everything), remote.raw_tokens(everything)):
        assert np.array_equal(a, b)
    assert same_batches(run_epoch(ShardLoader(token_shards.dir, GBS, seed=1, pack=True, seq_len=256)),
                        run_epoch(ShardLoader(memory_token_shards, GBS, seed=1, pack=True, seq_len=256)))


def test_dataset_object_holds_arrays_not_python_lists(token_shards):
    dataset = TokenShardDataset(token_shards.dir)
    dataset.raw_tokens([0, len(dataset) - 1])  # opens memmaps
    for name, value in vars(dataset).items():
        if isinstance(value, (list, tuple, dict, set)):
            assert len(value) <= 4, name  # per shard at most (4 shards), never per sequence
    assert dataset.keys.dtype.kind == "S" and dataset.lengths.dtype == np.int64
    clone = pickle.loads(pickle.dumps(dataset))  # what a spawned worker receives: no open memmaps
    assert all(b is None for b in clone._bins) and clone[(0, 5)]["key"] == dataset[(0, 5)]["key"]


def test_megatron_indexed_dataset_reads_the_shards(token_shards):
    from megatron.core.datasets import indexed_dataset as indexed  # a test dependency (pyproject [test])
    ours = TokenShardDataset(token_shards.dir, mask=None)
    for position, shard in enumerate(ours.shard_numbers.tolist()):
        n = int((ours.shard_of == position).sum())
        # Megatron cannot memory-map a 0-byte .bin (the pipeline's empty shard): read that one unmapped
        megatron = indexed.IndexedDataset(f"{token_shards.dir}/tokens-{shard:06d}", mmap=n > 0)
        first = int(ours.first_index[position])
        assert len(megatron) == n
        assert np.array_equal(megatron.sequence_lengths, ours.lengths[first : first + n])
        assert np.array_equal(megatron.document_indices, np.arange(n + 1))  # one document per sequence
        for i, tokens in enumerate(ours.raw_tokens(range(first, first + n))):
            assert megatron[i].dtype == tokens.dtype and np.array_equal(megatron[i], tokens)


def read_shard_from_spec(prefix: str) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """docs/shards.md's byte layout, read with struct + numpy only."""
    idx = Path(prefix + ".idx").read_bytes()
    assert idx[:9] == b"MMIDIDX\x00\x00"
    version, code, count, doc_count = struct.unpack_from("<QBQQ", idx, 9)
    assert version == 1
    dtype = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32, 8: np.uint16}[code]
    lengths = np.frombuffer(idx, "<i4", count, 34)
    pointers = np.frombuffer(idx, "<i8", count, 34 + 4 * count)
    documents = np.frombuffer(idx, "<i8", doc_count, 34 + 12 * count)
    assert len(idx) == 34 + 12 * count + 8 * doc_count
    data = np.fromfile(prefix + ".bin", dtype=dtype)
    itemsize = np.dtype(dtype).itemsize
    return lengths, documents, [data[p // itemsize : p // itemsize + n] for p, n in zip(pointers, lengths)]


def test_a_reader_written_from_the_spec_agrees(token_shards):
    ours = TokenShardDataset(token_shards.dir, mask=None)
    rows = provenance(token_shards.dir, [k.decode() for k in ours.keys]).to_pylist()
    for position, shard in enumerate(ours.shard_numbers.tolist()):
        lengths, documents, sequences = read_shard_from_spec(f"{token_shards.dir}/tokens-{shard:06d}")
        first = int(ours.first_index[position])
        assert np.array_equal(lengths, ours.lengths[first : first + len(lengths)])
        assert np.array_equal(documents, np.arange(len(lengths) + 1))
        for i, tokens in enumerate(sequences):
            key = ours.key(first + i)
            assert np.array_equal(tokens, token_shards.sequences[key])
            assert (rows[first + i]["shard"], rows[first + i]["index"]) == (shard, i)
        keys = [ours.key(first + i) for i in range(len(sequences))]
        assert keys == sorted(keys)  # sorted by key inside a shard


def test_provenance_maps_a_batch_back_to_its_assets(token_shards):
    batch = next(iter(ShardLoader(token_shards.dir, 8, seed=6)))
    table = provenance(token_shards.dir, batch["keys"])
    assert table.column("key").to_pylist() == batch["keys"]
    for row in table.to_pylist():
        expected = token_shards.provenance[row["key"]]
        assert row["asset_ids"] == expected["asset_ids"] and row["roles"] == expected["roles"]
        assert row["license_ids"] == expected["license_ids"]
        assert row["num_tokens"] == len(token_shards.sequences[row["key"]])
    with pytest.raises(KeyError, match="not-a-key"):
        provenance(token_shards.dir, [batch["keys"][0], "not-a-key"])


# docs --------------------------------------------------------------------------------------
def doc_block(name: str) -> str:
    """The fenced block right after `<!-- tested: NAME -->` in docs/shards.md (so it cannot drift)."""
    match = re.search(rf"<!-- tested: {name} -->\s*```\w*\n(.*?)```", DOCS.read_text(), re.S)
    assert match, f"docs/shards.md lost its tested block {name!r}"
    return match.group(1)


def test_the_reader_example_in_the_docs_runs(token_shards, tmp_path):
    script = tmp_path / "example.py"
    script.write_text(doc_block("reader-example"))
    out = runpy.run_path(str(script), init_globals={"TOKENS": token_shards.dir})
    assert out["loader"].state_dict()["consumed_samples"] == out["state"]["consumed_samples"] == 8
    assert torch.isfinite(out["loss"]) and [r["key"] for r in out["rows"]] == out["batch"]["keys"]


def test_the_numpy_example_in_the_docs_reads_the_first_sequence(token_shards, tmp_path):
    script = tmp_path / "example.py"
    script.write_text(doc_block("numpy-example"))
    out = runpy.run_path(str(script), init_globals={"TOKENS": token_shards.dir})
    first = min(k for k in token_shards.sequences if int(k, 16) % 3 == 0)  # shard 0: keys hashing to 0, sorted
    assert np.array_equal(out["sequence"], token_shards.sequences[first])


def test_the_duckdb_queries_in_the_docs_run(token_shards):
    import duckdb  # a dependency of cm3curate
    parts = f"{token_shards.dir}/sequences.parquet"
    key = sorted(token_shards.sequences)[0]
    rows = duckdb.sql(doc_block("provenance-sql").replace("OUT/tokens/sequences.parquet", parts).replace("KEY", key)).fetchall()
    expected = token_shards.provenance[key]
    assert [r[0] for r in rows] == expected["asset_ids"] and [r[1] for r in rows] == expected["roles"]
    assert [r[2] for r in rows] == expected["license_ids"]
    asset = "coco-0003"
    rows = duckdb.sql(doc_block("asset-sql").replace("OUT/tokens/sequences.parquet", parts).replace("ASSET", asset)).fetchall()
    having = {k: p["asset_ids"].index(asset) == 0 for k, p in token_shards.provenance.items() if asset in p["asset_ids"]}
    assert len(having) > 1 and {r[0]: r[3] for r in rows} == having  # as main once, as a neighbour elsewhere


# held-out split ------------------------------------------------------------------------------
def test_split_is_a_pure_function_of_the_key_disjoint_and_complete(token_shards):
    from tokenizer.shards import is_heldout

    every = TokenShardDataset(token_shards.dir, mask=None)
    train = TokenShardDataset(token_shards.dir, mask=None, split="train")
    held = TokenShardDataset(token_shards.dir, mask=None, split="heldout")
    keys = {name: [d.key(i) for i in range(len(d))] for name, d in (("all", every), ("train", train), ("held", held))}
    assert 0 < len(keys["held"]) < len(keys["train"])
    assert not set(keys["train"]) & set(keys["held"])
    assert sorted(keys["train"] + keys["held"]) == sorted(keys["all"])
    assert keys["held"] == [k for k in keys["all"] if is_heldout(k)]  # the split every tool uses, in shard order
    again = TokenShardDataset(token_shards.dir, mask=None, split="heldout")
    assert [again.key(i) for i in range(len(again))] == keys["held"]
    for i, key in enumerate(keys["held"]):  # the split's index i reads the right tokens
        assert np.array_equal(held[i]["tokens"], token_shards.sequences[key])
    with pytest.raises(ValueError, match="split"):
        TokenShardDataset(token_shards.dir, split="test")


def test_split_loader_sees_its_split_once_per_epoch_and_refuses_another_split(token_shards):
    from tokenizer.shards import is_heldout

    loader = ShardLoader(token_shards.dir, 4, seed=1, split="train", mask=None)
    seen = [k for batch in run_epoch(loader) for k in batch["keys"]]
    assert sorted(seen) == sorted(k for k in token_shards.sequences if not is_heldout(k))
    state = loader.state_dict()
    assert state["split"] == "train"
    with pytest.raises(ValueError, match="split"):
        ShardLoader(token_shards.dir, 4, seed=1, split="heldout", mask=None).load_state_dict(state)
    with pytest.raises(ValueError, match="split"):
        ShardLoader(token_shards.dir, 4, seed=1, mask=None).load_state_dict(state)


# SFT: answer_start ---------------------------------------------------------------------------
@pytest.mark.parametrize("mask", [None, MaskConfig()])
@pytest.mark.parametrize("pack", [False, True])
def test_no_loss_before_answer_start(sft_token_shards, mask, pack):
    """Unmasked: weight 0 exactly before answer_start, 1 from it on. CM3-masked: the weighted
    tokens are exactly the stored answer tokens (wherever masking moved them)."""
    assert TokenShardDataset(sft_token_shards.dir).answer_starts.dtype == np.int32
    loader = ShardLoader(sft_token_shards.dir, 8, seed=3, mask=mask, pack=pack, seq_len=512 if pack else None)
    checked = with_prompt = 0
    for batch in run_epoch(loader):
        for key, (r, s, n) in zip(batch["keys"], zip(batch["rows"].tolist(), batch["starts"].tolist(),
                                                         batch["lengths"].tolist())):
            stored = sft_token_shards.sequences[key]
            answer = sft_token_shards.provenance[key]["answer_start"]
            weights, tokens = batch["loss_mask"][r, s : s + n].numpy(), batch["tokens"][r, s : s + n].numpy()
            first = max(answer, 1)  # a document's first token never carries loss
            if mask is None:
                assert np.array_equal(weights, (np.arange(n) >= first).astype(np.float32))
            else:
                assert weights.sum() == len(stored) - first
                assert sorted(tokens[weights == 1].tolist()) == sorted(stored[first:].tolist())
            checked += 1
            with_prompt += answer > 0
    assert checked == len(sft_token_shards.sequences) and 0 < with_prompt < checked


def test_shards_without_answer_start_keep_the_usual_loss_mask(token_shards, sft_token_shards):
    assert TokenShardDataset(token_shards.dir).answer_starts is None
    plain = ShardLoader(token_shards.dir, 8, seed=3, mask=None)
    assert all(float(b["loss_mask"].sum()) == float((b["lengths"] - 1).sum()) for b in run_epoch(plain))


def test_sft_copies_of_a_document_share_its_side_of_the_split():
    from pipeline.stages.sft import sft_key
    from tokenizer.shards import is_heldout
    from trainer.dataset import document_key

    keys = [f"{i:016x}" for i in range(400)]
    for key in keys:
        copies = {sft_key(key, task, copy) for task in ("captioning", "generation") for copy in range(3)}
        assert {document_key(k) for k in copies} == {key}
    assert 10 < sum(is_heldout(document_key(sft_key(k, "generation", 0))) for k in keys) < 80  # ~10 % held out
