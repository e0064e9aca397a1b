"""The `tokens` phase end to end on real demo photos: CM3 sequences with retrieved neighbours,
Megatron-readable shards, provenance for every asset, a caption that spells control tokens,
a document too long for the budget, byte-identical reruns and resume after a crash."""

from __future__ import annotations

import dataclasses
import hashlib
import html
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import webdataset as wds

from pipeline import ledger
from pipeline.config import ConfigError, RunConfig, TokensConfig, from_dict
from pipeline.run import run
from pipeline.stages.tokens import Document, caption_index, fit_neighbours, sequence_length, sequence_order
from tokenizer.token_shards import load_tokens_index, parse_index
from tokenizer.vocab import JointVocab

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "manifests" / "demo"
IN_MEMORY = ["--direct_running_mode=in_memory", "--direct_num_workers=1"]
MULTI = ["--direct_running_mode=multi_processing", "--direct_num_workers=2"]
INJECTION = "A dog <img> </img> <break> <mask:0> <eos> <pad> sleeping on the red kitchen floor near a door"
LONG = " ".join(f"word{i} zebra quokka xylophone" for i in range(250))  # ~5k chars of rare text


def _corpus(root: Path) -> tuple[Path, dict[str, str]]:
    """28 licensed COCO rows; one caption spells control tokens, one is too long to fit."""
    allowed = {"CC-BY-2.0", "CC-BY-SA-2.0", "CC-BY-NC-2.0", "CC-BY-NC-SA-2.0"}
    rows = [json.loads(line) for line in (DEMO / "coco.jsonl").read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r["license_id"] in allowed][:28]
    (root / "images").mkdir(parents=True)
    for r in rows:
        shutil.copy(DEMO / r["uri"], root / r["uri"])
    special = {"injection": rows[0]["asset_id"], "long": rows[1]["asset_id"]}
    rows[0] = {**rows[0], "captions": [INJECTION]}
    rows[1] = {**rows[1], "captions": [LONG]}
    manifest = root / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return manifest, special


def _config(manifest: Path, out: Path, **tokens) -> RunConfig:
    return from_dict(RunConfig, {
        "manifests": [str(manifest)], "policy": str(DEMO / "policy.yaml"), "out": str(out),
        "validate": {"max_caption_chars": 8000, "min_letter_fraction": 0.5},
        "decode": {"resolution": 64},  # f4 -> 16 x 16 = 256 codes per image
        "clip_train": {"max_steps": 15, "batch_size": 16, "progress": False},
        "align": {"mode": "off"},
        "vq": {"model": "cpu-small", "train": {"max_steps": 10, "eval_every": 10, "checkpoint_every": 10,
                                               "num_threads": 1, "progress": False, "batch_size": 8}},
        "text": {"vocab_size": 1000},
        "tokens": {"k": 2, "max_tokens": 900, "sequences_per_shard": 10, "webdataset": True, **tokens},
    })


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def tokens_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokens")
    manifest, special = _corpus(root / "corpus")
    out = root / "out"
    report = run(_config(manifest, out), until="tokens", beam_flags=IN_MEMORY)
    return {"root": root, "manifest": manifest, "out": out, "report": report, "special": special}


def _sequences(out: Path):
    return pq.read_table(out / "tokens" / "sequences.parquet").to_pylist()


def _shard_tokens(out: Path) -> dict[str, np.ndarray]:
    """key -> tokens, read with the from-spec parser and a plain memmap."""
    rows = sorted(_sequences(out), key=lambda r: (r["shard"], r["index"]))
    result = {}
    for r in rows:
        name = f"tokens-{r['shard']:06d}"
        idx = parse_index((out / "tokens" / f"{name}.idx").read_bytes())
        data = np.memmap(out / "tokens" / f"{name}.bin", dtype=idx.dtype, mode="r")
        start = idx.pointers[r["index"]] // idx.dtype.itemsize
        result[r["key"]] = np.array(data[start : start + idx.lengths[r["index"]]])
    return result


def _documents(tokens: np.ndarray, vocab: JointVocab) -> list[np.ndarray]:
    assert tokens[0] == vocab.bos_id and tokens[-1] == vocab.eos_id
    body = tokens[1:-1]
    cuts = np.flatnonzero(body == vocab.break_id)
    return [piece[1:] if i else piece for i, piece in enumerate(np.split(body, cuts))]  # drop each <break>


def test_ledger_records_the_too_long_document_and_keeps_the_injection(tokens_run):
    out, special = tokens_run["out"], tokens_run["special"]
    table = ledger.read_ledger(str(out)).to_pylist()
    by_id = {r["asset_id"]: r for r in table}
    assert len(table) == 28 and tokens_run["report"].summary.rows_in == 28
    long_row = by_id[special["long"]]
    assert (long_row["status"], long_row["stage"], long_row["reason"]) == ("rejected", "tokens", "SEQUENCE_TOO_LONG")
    assert "max_tokens is 900" in long_row["detail"]
    assert by_id[special["injection"]]["status"] == "kept"
    info = {r.name: r.info for r in tokens_run["report"].steps}["tokens"]
    assert info["too_long"] == 1 and info["sequences"] == sum(r["status"] == "kept" for r in table)


def test_provenance_covers_every_asset_and_only_kept_ones(tokens_run):
    out = tokens_run["out"]
    kept = {r["asset_id"]: r for r in ledger.read_ledger(str(out)).to_pylist() if r["status"] == "kept"}
    rows = _sequences(out)
    assert sorted(r["main_asset_id"] for r in rows) == sorted(kept)  # every kept asset is a main document, once
    neighbours = 0
    for r in rows:
        assert r["asset_ids"][0] == r["main_asset_id"] and r["roles"][0] == "main"
        assert r["roles"][1:] == ["neighbour"] * (len(r["asset_ids"]) - 1)
        assert len(r["license_ids"]) == len(r["licensors"]) == len(r["asset_ids"])
        assert len(r["neighbour_scores"]) == len(r["asset_ids"]) - 1
        assert r["main_asset_id"] not in r["asset_ids"][1:]
        for asset_id, license_id in zip(r["asset_ids"], r["license_ids"]):
            assert asset_id in kept, f"{asset_id} is in a sequence but not kept"
            assert license_id == kept[asset_id]["license_id"]
        neighbours += len(r["asset_ids"]) - 1
    assert neighbours >= len(rows)  # retrieval really fed the sequences (k = 2, budget fits two)


def test_run_json_counts_neighbours_and_tokens_as_the_tables_hold_them(tokens_run):
    """neighbours/in = documents in the neighbour table, fewer_than_k = its rows short of k, no
    errors; tokens/in|kept|rejected against the ledger and the sequences table."""
    out, report = tokens_run["out"], tokens_run["report"]
    counters = json.loads((out / "run.json").read_text())["counters"]
    assert counters == report.counters
    table = [r for p in sorted((out / "index").glob("neighbours-*.parquet")) for r in pq.read_table(p).to_pylist()]
    k = json.loads((out / "run.json").read_text())["config"]["neighbours"]["k"]
    rows = ledger.read_ledger(str(out)).to_pylist()
    scored = [r for r in rows if r["clip_score"] is not None]  # the documents the index holds
    assert counters["neighbours/in"] == len(table) == len(scored) > 0
    short = sum(len(r["neighbour_keys"]) < k for r in table)
    assert counters.get("neighbours/fewer_than_k", 0) == short < len(table)
    assert counters.get("neighbours/error", 0) == 0
    too_long = sum(r["reason"] == "SEQUENCE_TOO_LONG" for r in rows)
    assert counters["tokens/rejected/SEQUENCE_TOO_LONG"] == too_long == 1
    assert counters["tokens/in"] == counters["tokens/kept"] + too_long
    assert counters["tokens/kept"] == len(_sequences(out)) == sum(r["status"] == "kept" for r in rows)


def test_a_run_uses_the_clip_vq_and_bpe_it_is_given(tokens_run, tmp_path):
    """Bring-your-own models: a CLIP, a VQ tokenizer and a BPE trained here with the project's own
    training code on other settings than the run's, named by relative paths in a config file
    beside them. The run trains none of them; its embeddings and codes are those models' outputs
    (and differ from the run-trained models'), its vocabulary and token shards record their sha256s."""
    import hashlib as h

    import torch
    import yaml

    from pipeline.clip import ClipEmbedder, train_clip
    from pipeline.config import ClipConfig, ClipTrainConfig, load_config
    from pipeline.retrieval import read_embeddings
    from tokenizer.shards import iter_code_rows, iter_samples, list_shards
    from tokenizer.text import captions_from_shards, train_bpe
    from tokenizer.vq.config import TrainVQConfig, get_config
    from tokenizer.vq.model import load_vq
    from tokenizer.vq.train import train_vq

    trained = tokens_run["out"]
    shards = list_shards(str(trained / "curated"))
    byo = tmp_path / "byo"
    threads = torch.get_num_threads()
    train_clip(ClipConfig(), ClipTrainConfig(max_steps=4, batch_size=8, seed=7, num_threads=1, progress=False),
               shards, str(byo / "clip"))
    torch.set_num_threads(threads)
    train_vq(get_config("cpu-small"), TrainVQConfig(max_steps=3, batch_size=4, seed=7, num_threads=1, eval_every=0,
                                                    checkpoint_every=0, progress=False, final_eval=False),
             shards, str(byo / "vq"))
    train_bpe(captions_from_shards(shards), 700, str(byo / "text-bpe.json"))
    out = tmp_path / "out"
    settings = _config(tokens_run["manifest"], out).to_json()
    settings["align"]["clip"]["weights"] = "clip/clip.safetensors"  # relative: beside the config file
    settings["vq"]["weights"] = "vq/vq.safetensors"
    settings["text"]["tokenizer"] = "text-bpe.json"
    (byo / "run.yaml").write_text(yaml.safe_dump(settings))
    report = run(load_config(str(byo / "run.yaml")), until="tokens", beam_flags=IN_MEMORY)

    info = {r.name: r.info for r in report.steps}
    assert info["clip"] == {"weights": str(byo / "clip" / "clip.safetensors"), "trained": False}
    assert info["vq"] == {"weights": str(byo / "vq" / "vq.safetensors"), "trained": False}
    assert not (out / "models" / "clip").exists()
    for ours, theirs in (("vq/vq.safetensors", "vq/vq.safetensors"), ("vq/vq.json", "vq/vq.json"),
                         ("text-bpe.json", "text-bpe.json")):
        assert (out / "models" / ours).read_bytes() == (byo / theirs).read_bytes(), ours
    sha = {name: h.sha256((byo / name).read_bytes()).hexdigest() for name in ("vq/vq.safetensors", "text-bpe.json")}
    vocab = json.loads((out / "models" / "vocab.json").read_text())
    assert vocab["text"]["sha256"] == sha["text-bpe.json"]
    index, _ = load_tokens_index(str(out / "tokens"))
    assert (index["vq_sha256"], index["bpe_sha256"]) == (sha["vq/vq.safetensors"], sha["text-bpe.json"])

    jpegs = {s.key: s for s in iter_samples(list_shards(str(out / "curated")))}
    keys = sorted(jpegs)[:4]
    vq = load_vq(str(byo / "vq" / "vq.safetensors"))
    codes = {k: c for k, _, c in iter_code_rows(sorted(str(p) for p in (out / "codes").glob("codes-*.parquet")))}
    expected = vq.encode_codes(np.stack([jpegs[k].array() for k in keys]))
    assert all(np.array_equal(codes[k], expected[i]) for i, k in enumerate(keys))
    codes_trained = {k: c for k, _, c in iter_code_rows(sorted(str(p) for p in (trained / "codes").glob("codes-*.parquet")))}
    assert any(not np.array_equal(codes[k], codes_trained[k]) for k in keys)

    embeddings = read_embeddings(sorted(str(p) for p in (out / "curated").glob("embeddings-*.parquet")))
    embeddings_trained = read_embeddings(sorted(str(p) for p in (trained / "curated").glob("embeddings-*.parquet")))
    ours = ClipEmbedder(ClipConfig(weights=str(byo / "clip" / "clip.safetensors"))).embed_images(
        [jpegs[k].jpeg for k in keys])
    rows = [list(embeddings.keys).index(k) for k in keys]
    np.testing.assert_allclose(embeddings.image_emb[rows].astype(np.float32), ours, atol=2e-3)
    assert not np.allclose(embeddings_trained.image_emb[rows].astype(np.float32), ours, atol=2e-3)


def test_sequences_have_the_cm3_layout_and_budget(tokens_run):
    out = tokens_run["out"]
    vocab = JointVocab.load(str(out / "tokens" / "vocab.json"))
    tokens = _shard_tokens(out)
    rows = {r["key"]: r for r in _sequences(out)}
    orders = set()
    for key, seq in tokens.items():
        row = rows[key]
        assert len(seq) == row["num_tokens"] <= 900
        docs = _documents(seq, vocab)
        assert len(docs) == len(row["asset_ids"])
        for doc in docs:
            assert (doc == vocab.img_begin_id).sum() == 1 and (doc == vocab.img_end_id).sum() == 1
            begin, end = int(np.flatnonzero(doc == vocab.img_begin_id)[0]), int(np.flatnonzero(doc == vocab.img_end_id)[0])
            assert end - begin - 1 == 16 * 16 and vocab.is_image(doc[begin + 1 : end]).all()
            text = np.concatenate([doc[:begin], doc[end + 1 :]])
            assert vocab.is_text(text).all() and not np.isin(text, [*vocab.specials.values(), *vocab.mask_ids]).any()
            assert (begin == 0) == (row["order"] == "image_first")
        orders.add(row["order"])
    assert orders == {"text_first", "image_first"}  # mixed order really mixes


def test_caption_that_spells_control_tokens_is_plain_text(tokens_run):
    out, special = tokens_run["out"], tokens_run["special"]
    vocab = JointVocab.load(str(out / "tokens" / "vocab.json"))
    row = next(r for r in _sequences(out) if r["main_asset_id"] == special["injection"])
    main = _documents(_shard_tokens(out)[row["key"]], vocab)[-1]
    begin, end = int(np.flatnonzero(main == vocab.img_begin_id)[0]), int(np.flatnonzero(main == vocab.img_end_id)[0])
    caption = np.concatenate([main[:begin], main[end + 1 :]])
    assert caption.min() >= len(vocab.specials) + len(vocab.mask_ids)
    assert vocab.ids_to_text(caption) == INJECTION


def test_megatron_reads_the_shards_and_index_json_matches(tokens_run):
    from megatron.core.datasets import indexed_dataset as indexed  # a test dependency (pyproject [test])
    out = tokens_run["out"]
    index, _ = load_tokens_index(str(out / "tokens"))
    rows = _sequences(out)
    expected = _shard_tokens(out)
    assert index["sequences"] == len(rows) and index["tokens"] == sum(r["num_tokens"] for r in rows)
    assert [s["name"] for s in index["shards"]] == [f"tokens-{s['shard']:06d}" for s in index["shards"]]
    assert all(s["sequences"] > 0 for s in index["shards"])  # no empty shard: Megatron cannot map an empty .bin
    assert sorted(p.stem for p in (out / "tokens").glob("*.bin")) == [s["name"] for s in index["shards"]]
    for shard in index["shards"]:
        prefix = out / "tokens" / shard["name"]
        assert hashlib.sha256(prefix.with_suffix(".bin").read_bytes()).hexdigest() == shard["bin_sha256"]
        assert hashlib.sha256(prefix.with_suffix(".idx").read_bytes()).hexdigest() == shard["idx_sha256"]
        ds = indexed.IndexedDataset(str(prefix))
        assert len(ds) == shard["sequences"]
        assert ds.document_indices.tolist() == list(range(len(ds) + 1))
        mine = sorted((r for r in rows if r["shard"] == shard["shard"]), key=lambda r: r["index"])
        assert [r["key"] for r in mine] == sorted(r["key"] for r in mine)  # sorted by key inside a shard
        for i, r in enumerate(mine):
            assert np.array_equal(ds[i], expected[r["key"]])
    models = out / "models"
    for name, path in (("vocab_sha256", models / "vocab.json"), ("bpe_sha256", models / "text-bpe.json"),
                       ("vq_sha256", models / "vq" / "vq.safetensors")):
        assert index[name] == hashlib.sha256(path.read_bytes()).hexdigest()
    state = json.loads((out / "_state" / "tokens.json").read_text())
    assert index["config_hash"] == state["config_hash"] and index["dtype"] == "uint16"


def test_webdataset_export_reads_with_stock_webdataset(tokens_run):
    out = tokens_run["out"]
    expected = _shard_tokens(out)
    rows = {r["key"]: r for r in _sequences(out)}
    urls = sorted(str(p) for p in (out / "tokens").glob("tokens-*.tar"))
    seen = {}
    for sample in wds.WebDataset(urls, shardshuffle=False).decode():
        seen[sample["__key__"]] = sample
    assert set(seen) == set(expected)
    for key, sample in seen.items():
        assert np.array_equal(sample["tokens.npy"], expected[key])
        assert sample["json"]["asset_ids"] == rows[key]["asset_ids"]


def test_rerun_is_byte_identical_and_a_crash_resumes_to_the_same_bytes(tokens_run):
    out = tokens_run["out"]
    before, ledger_before = _digest(out / "tokens"), _digest(out / "ledger")
    # crash mid-step: no state file, a half-written shard, a stray temp file, the too-long row back to kept
    (out / "_state" / "tokens.json").unlink()
    shard = out / "tokens" / "tokens-000000.bin"
    shard.write_bytes(shard.read_bytes()[:100])
    (out / "tokens" / ".tmp-deadbeef-tokens-000001.bin").write_bytes(b"partial")
    (out / "tokens" / "index.json").unlink()
    cfg = _config(tokens_run["manifest"], out)
    report = run(cfg, until="tokens", beam_flags=MULTI)  # another runner layout, same bytes
    assert [s.name for s in report.steps if not s.skipped] == ["tokens"]
    assert _digest(out / "tokens") == before
    assert _digest(out / "ledger") == ledger_before


def test_a_larger_budget_restores_the_too_long_document(tokens_run, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(tokens_run["out"], out)
    report = run(_config(tokens_run["manifest"], out, max_tokens=8192), until="tokens", beam_flags=IN_MEMORY)
    assert [s.name for s in report.steps if not s.skipped] == ["tokens"]
    row = next(r for r in ledger.read_ledger(str(out)).to_pylist() if r["asset_id"] == tokens_run["special"]["long"])
    assert (row["status"], row["stage"], row["reason"]) == ("kept", "curated", None)
    assert tokens_run["special"]["long"] in {r["main_asset_id"] for r in _sequences(out)}
    assert report.summary.kept == tokens_run["report"].summary.kept + 1


# -- pure parts -----------------------------------------------------------------------------------


def _doc(key: str, text: int, codes: int = 16) -> Document:
    return Document(key=key, asset_id=key, license_id="L", licensor="V",
                    text=np.ones(text, np.uint16), codes=np.zeros(codes, np.uint32))


def test_least_relevant_neighbours_are_dropped_first():
    main, ranked = _doc("m", 10), [_doc("a", 10), _doc("b", 30), _doc("c", 5)]
    assert sequence_length(main, []) == 2 + 28
    full = sequence_length(main, ranked[:2])
    assert [d.key for d in fit_neighbours(main, ranked, 2, full)] == ["a", "b"]
    assert [d.key for d in fit_neighbours(main, ranked, 2, full - 1)] == ["a"]  # b (rank 2) goes first
    assert fit_neighbours(main, ranked, 2, 30) == []
    assert fit_neighbours(main, ranked, 2, 29) is None  # main alone does not fit
    assert [d.key for d in fit_neighbours(main, ranked, 3, 10_000)] == ["a", "b", "c"]


def test_order_and_caption_choice_are_seeded_per_key():
    mixed = TokensConfig(order="mixed", image_first_fraction=0.5)
    keys = [f"{i:016x}" for i in range(2000)]
    orders = [sequence_order(mixed, 0, k) for k in keys]
    assert orders == [sequence_order(mixed, 0, k) for k in keys]
    assert 0.45 < orders.count("image_first") / len(keys) < 0.55
    assert orders != [sequence_order(mixed, 1, k) for k in keys]
    assert {sequence_order(TokensConfig(order="text_first"), 0, k) for k in keys} == {"text_first"}
    assert {sequence_order(TokensConfig(order="mixed", image_first_fraction=1.0), 0, k) for k in keys} == {"image_first"}
    picks = [caption_index(0, k, 5) for k in keys]
    assert set(picks) == set(range(5)) and caption_index(0, "x", 1) == 0


def test_bad_tokens_config_is_one_clear_line(tiny_corpus, tmp_path):
    with pytest.raises(ConfigError, match="tokens.order"):
        from_dict(RunConfig, {"tokens": {"order": "sideways"}})
    with pytest.raises(ConfigError, match="tokens.k is 3 .* neighbours.k = 2"):
        run(dataclasses.replace(_config(tiny_corpus["manifest"], tmp_path), tokens=TokensConfig(k=3)), until="tokens")


# -- curate audit over this run (docs/audit.md) ---------------------------------------------------


def test_audit_trace_lists_every_asset_of_a_sequence_with_its_license(tokens_run):
    from pipeline import audit

    out = str(tokens_run["out"])
    ledger_rows = {r["asset_id"]: r for r in ledger.read_ledger(out).to_pylist() if r["status"] == "kept"}
    seq = max(_sequences(tokens_run["out"]), key=lambda r: len(r["asset_ids"]))  # one with neighbours
    assert len(seq["asset_ids"]) > 1
    answer = audit.trace(out, seq["key"]).to_json()["rows"]
    assert [r["asset_id"] for r in answer] == seq["asset_ids"]
    assert [r["role"] for r in answer] == seq["roles"]
    for r in answer:
        source = ledger_rows[r["asset_id"]]
        assert (r["license_id"], r["licensor"], r["manifest_uri"], r["manifest_row"]) == (
            source["license_id"], source["licensor"], source["manifest_uri"], source["manifest_row"])
        assert r["status"] == "kept" and r["shard"] == seq["shard"]


def test_audit_asset_finds_it_as_main_and_as_neighbour_or_says_why_not(tokens_run):
    from pipeline import audit

    out = str(tokens_run["out"])
    sequences = _sequences(tokens_run["out"])
    used = [a for s in sequences for a, role in zip(s["asset_ids"], s["roles"]) if role == "neighbour"]
    asset_id = max(set(used), key=used.count)
    rows = audit.asset(out, asset_id).to_json()["rows"]
    expected = sorted((s["key"], role) for s in sequences for a, role in zip(s["asset_ids"], s["roles"]) if a == asset_id)
    assert sorted((r["sequence"], r["role"]) for r in rows) == expected
    assert sum(r["role"] == "main" for r in rows) == 1
    rejected = audit.asset(out, tokens_run["special"]["long"]).to_json()["rows"]
    assert [(r["status"], r["reason"]) for r in rejected] == [("rejected", "SEQUENCE_TOO_LONG")]
    with pytest.raises(audit.AuditError, match="in no manifest row"):
        audit.asset(out, "no-such-asset")


def test_audit_license_counts_assets_sequences_and_tokens(tokens_run):
    from pipeline import audit

    out = str(tokens_run["out"])
    kept = [r for r in ledger.read_ledger(out).to_pylist() if r["status"] == "kept"]
    license_id = max({r["license_id"] for r in kept}, key=lambda lic: sum(r["license_id"] == lic for r in kept))
    mine = {r["asset_id"] for r in kept if r["license_id"] == license_id}
    answer = audit.license_report(out, license_id)
    rows = answer.to_json()["rows"]
    assert {r["asset_id"] for r in rows} == mine
    sequences = _sequences(tokens_run["out"])
    assert sum(r["main_tokens"] for r in rows) == sum(s["num_tokens"] for s in sequences if s["main_asset_id"] in mine)
    assert sum(r["neighbour_in"] for r in rows) == sum(
        a in mine for s in sequences for a, role in zip(s["asset_ids"], s["roles"]) if role == "neighbour")
    assert f"{len(mine)} kept assets" in answer.note


def test_audit_sql_and_the_cli(tokens_run):
    import subprocess
    import sys

    from pipeline import audit

    out = str(tokens_run["out"])
    rows = ledger.read_ledger(out).num_rows
    answer = audit.sql(out, "SELECT count(*) AS n, count(DISTINCT l.asset_id) AS ids FROM ledger l "
                            "LEFT JOIN curated c USING (asset_id) LEFT JOIN takedowns t USING (asset_id)")
    assert answer.rows[0][0] == rows
    with pytest.raises(audit.AuditError, match="^sql: "):
        audit.sql(out, "SELECT nope FROM ledger")
    key = _sequences(tokens_run["out"])[0]["key"]
    curate = str(Path(sys.executable).parent / "curate")
    result = subprocess.run([curate, "audit", "trace", key, "--out", out, "--json"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["rows"][0]["role"] == "main"
    table = subprocess.run([curate, "audit", "license", "CC-BY-2.0", "--out", out], capture_output=True, text=True,
                           timeout=120)
    assert table.returncode == 0 and "license CC-BY-2.0: kept assets" in table.stdout and "main_tokens" in table.stdout
    missing = subprocess.run([curate, "audit", "trace", "nope", "--out", out], capture_output=True, text=True,
                             timeout=120)
    assert missing.returncode == 2 and len(missing.stderr.strip().splitlines()) == 1


def test_takedown_removes_an_asset_everywhere_and_rewrites_only_its_shards(tokens_run, tmp_path):
    from pipeline import audit
    from pipeline.stages.tokens import read_codes
    from pipeline.takedown import takedown

    out = tmp_path / "out"
    shutil.copytree(tokens_run["out"], out)
    sequences = _sequences(out)
    used = [a for s in sequences for a, role in zip(s["asset_ids"], s["roles"]) if role == "neighbour"]
    shards_of = {a: {s["shard"] for s in sequences if a in s["asset_ids"]} for a in set(used)}
    target = min(sorted(shards_of), key=lambda a: len(shards_of[a]))  # a main document and others' neighbour
    assert len(shards_of[target]) < len({s["shard"] for s in sequences})  # some shard must stay untouched
    key = next(s["key"] for s in sequences if s["main_asset_id"] == target)
    codes = dict(kv for url in sorted((out / "codes").glob("codes-*.parquet")) for kv in read_codes(str(url)))[key]
    vocab = JointVocab.load(str(out / "tokens" / "vocab.json"), with_text=False)
    run_ids = vocab.codes_to_ids(codes)[:64]  # the start of the asset's image-code run

    def holds_run(tokens: np.ndarray) -> bool:
        window = np.lib.stride_tricks.sliding_window_view(tokens, len(run_ids))
        return bool((window == run_ids).all(axis=1).any())

    assert sum(holds_run(t) for t in _shard_tokens(out).values()) == 1 + used.count(target)
    before = json.loads((out / "tokens" / "index.json").read_text())
    files_before = {p.name: p.read_bytes() for p in (out / "tokens").glob("tokens-*")}
    rows_before = ledger.read_ledger(str(out)).num_rows

    report = takedown(str(out), [target], reason="licensor withdrew consent")
    assert [a["asset_id"] for a in report["assets"]] == [target]
    assert report["sequences_dropped"] == [key] and len(report["sequences_changed"]) == used.count(target)
    after = _sequences(out)
    assert all(target not in s["asset_ids"] for s in after)  # gone as main and as neighbour
    assert not any(holds_run(t) for t in _shard_tokens(out).values())  # no shard holds its codes
    assert len(after) == len(sequences) - 1
    changed = {s["key"]: s for s in after if s["key"] in report["sequences_changed"]}
    assert all(len(s["asset_ids"]) >= 1 for s in changed.values())
    rewritten = set(report["token_shards_rewritten"])
    assert rewritten and rewritten != {e["shard"] for e in before["shards"]}  # not everything
    for name, data in files_before.items():  # untouched shards keep their bytes
        if int(name.split("-")[1].split(".")[0]) not in rewritten:
            assert (out / "tokens" / name).read_bytes() == data, name
    index = json.loads((out / "tokens" / "index.json").read_text())
    assert index["sequences"] == before["sequences"] - 1
    for entry in index["shards"]:  # the index matches the files
        assert hashlib.sha256((out / "tokens" / f"{entry['name']}.bin").read_bytes()).hexdigest() == entry["bin_sha256"]
    ledger_rows = {r["asset_id"]: r for r in ledger.read_ledger(str(out)).to_pylist()}
    assert ledger_rows[target]["reason"] == "TAKEN_DOWN" and ledger.read_ledger(str(out)).num_rows == rows_before
    curated = [r for p in sorted((out / "curated").glob("metadata-*.parquet")) for r in pq.read_table(p).to_pylist()]
    assert target not in {r["asset_id"] for r in curated}
    assert audit.asset(str(out), target).to_json()["rows"][0]["reason"] == "TAKEN_DOWN"
    prepared = [r for p in sorted((out / "_work" / "prepared").glob("metadata-*.parquet"))
                for r in pq.read_table(p).to_pylist()]
    assert prepared and target not in {r["asset_id"] for r in prepared}  # the re-alignment cache too
    card = {d["contentUrl"]: d["sha256"] for d in json.loads((out / "croissant.json").read_text())["distribution"]
            if d["@type"] == "cr:FileObject"}  # regenerated: it describes the rewritten files
    assert all(card[f"tokens/{e['name']}.bin"] == e["bin_sha256"] for e in index["shards"])
    assert target not in (out / "ATTRIBUTION.csv").read_text()
    again = takedown(str(out), [target], reason="licensor withdrew consent")  # a rerun changes nothing
    assert again["assets"] == [] and again["token_shards_rewritten"] == []

    # a later run into this folder keeps it out, also when re-uploaded under a new id
    manifest = tokens_run["manifest"]
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    original = next(r for r in rows if r["asset_id"] == target)
    copy = tmp_path / "manifest.jsonl"
    shutil.copytree(manifest.parent / "images", tmp_path / "images")
    copy.write_text("".join(json.dumps(r) + "\n" for r in rows + [{**original, "asset_id": "re-upload"}]))
    run(dataclasses.replace(_config(copy, out), seed=1), until="tokens", beam_flags=IN_MEMORY)
    ledger_rows = {r["asset_id"]: r for r in ledger.read_ledger(str(out)).to_pylist()}
    assert (ledger_rows[target]["reason"], ledger_rows["re-upload"]["reason"]) == ("TAKEN_DOWN", "TAKEN_DOWN")
    assert all(not {target, "re-upload"} & set(s["asset_ids"]) for s in _sequences(out))


def test_croissant_card_validates_and_describes_every_file_and_license(tokens_run):
    import csv
    import logging

    import mlcroissant as mlc

    out = tokens_run["out"]
    card = json.loads((out / "croissant.json").read_text())
    logging.getLogger("absl").setLevel(logging.ERROR)
    dataset = mlc.Dataset(jsonld=str(out / "croissant.json"))  # raises on an invalid card
    for field in ("dataCollection", "dataPreprocessingProtocol", "dataManipulationProtocol", "dataLimitations",
                  "dataBiases", "dataUseCases", "personalSensitiveInformation", "dataReleaseMaintenancePlan"):
        assert card.get(f"rai:{field}"), field  # the validator checks types, not presence
    described = {d["contentUrl"]: d["sha256"] for d in card["distribution"] if d["@type"] == "cr:FileObject"}
    on_disk = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()
               and not str(p.relative_to(out)).startswith(("_work", "_state", "_logs", ".cm3curate-run", "lineage/",
                                                            "report/"))}
    assert set(described) == on_disk - {"croissant.json", "ATTRIBUTION.md", "ATTRIBUTION.csv"}
    for rel in ("tokens/tokens-000000.bin", "ledger/" + sorted(p.name for p in (out / "ledger").iterdir())[0]):
        assert described[rel] == hashlib.sha256((out / rel).read_bytes()).hexdigest()
    kept = {r["asset_id"]: r for r in ledger.read_ledger(str(out)).to_pylist() if r["status"] == "kept"}
    sequences = list(dataset.records("sequences"))
    assert len(sequences) == len(_sequences(out))
    for record in sequences:  # the license of every asset of every sequence, as the ledger has it
        ids = [a.decode() for a in record["sequences/asset_ids"]]
        assert [lic.decode() for lic in record["sequences/license_ids"]] == [kept[a]["license_id"] for a in ids]
    assets = {r["assets/asset_id"].decode(): r["assets/license_id"].decode() for r in dataset.records("assets")}
    curated = [r for p in sorted((out / "curated").glob("metadata-*.parquet")) for r in pq.read_table(p).to_pylist()]
    assert assets == {r["asset_id"]: r["license_id"] for r in curated}  # every curated asset, its license
    with open(out / "ATTRIBUTION.csv", newline="") as handle:
        listed = {row["asset_id"]: row for row in csv.DictReader(handle)}
    by = {"CC-BY-2.0", "CC-BY-SA-2.0", "CC-BY-NC-2.0", "CC-BY-NC-SA-2.0"}  # the demo policy's attribution_required
    assert set(listed) == {r["asset_id"] for r in curated if r["license_id"] in by}
    assert all(row["licensor"] and row["license_url"].startswith("http") for row in listed.values())


def test_lineage_events_follow_the_steps_that_ran(tokens_run, tmp_path):
    from pipeline.lineage import read_events
    from pipeline.run import PHASES, STEPS
    from pipeline.takedown import takedown

    out = tmp_path / "out"
    shutil.copytree(tokens_run["out"], out)
    events = read_events(str(out))
    first = next(e for e in events if e["job"]["name"] == "cm3curate.run")  # the fixture's run (later tests rerun)
    run_id = first["run"]["runId"]
    own = [e for e in events if e["run"]["runId"] == run_id]
    assert [e["eventType"] for e in own] == ["START", "COMPLETE"]
    assert {i["name"] for i in first["inputs"]} == {str(tokens_run["manifest"]), str(DEMO / "policy.yaml")}
    children = [e for e in events if e["run"]["facets"].get("parent", {}).get("run", {}).get("runId") == run_id]
    ran = [s.name for s in STEPS if PHASES.index(s.phase) <= PHASES.index("tokens") and not s.gate]
    assert [e["job"]["name"] for e in children if e["eventType"] == "START"] == [f"cm3curate.run.{n}" for n in ran]
    for name in ran:  # each step: START then COMPLETE, one run id, inside the parent's START and COMPLETE
        mine = [e for e in children if e["job"]["name"] == f"cm3curate.run.{name}"]
        assert [e["eventType"] for e in mine] == ["START", "COMPLETE"] and mine[0]["run"]["runId"] == mine[1]["run"][
            "runId"]
        assert first["eventTime"] <= mine[0]["eventTime"] <= mine[1]["eventTime"] <= own[1]["eventTime"]
    step = {e["job"]["name"].rsplit(".", 1)[1]: e for e in children if e["eventType"] == "COMPLETE"}
    assert {o["name"] for o in step["encode"]["outputs"]} == {str(tokens_run["out"] / "codes")}
    assert {i["name"] for i in step["tokens"]["inputs"]} >= {str(tokens_run["out"] / d) for d in ("codes", "index")}
    assert {o["namespace"] for e in events for o in e["outputs"]} == {"file"}

    with pytest.raises(Exception, match="not a kept asset"):
        takedown(str(out), ["no-such-asset"], reason="a refused request")
    failed = [e for e in read_events(str(out)) if e["job"]["name"] == "cm3curate.takedown"]
    assert [e["eventType"] for e in failed] == ["START", "FAIL"]
    assert "not a kept asset" in failed[1]["run"]["facets"]["errorMessage"]["message"]


def _chromium() -> str | None:
    return next((found for name in ("chromium", "chromium-browser", "google-chrome")
                 if (found := shutil.which(name))), None)


def _render(page: Path, *flags: str) -> subprocess.CompletedProcess:
    browser = _chromium()
    if browser is None:
        pytest.skip("no headless Chromium on this machine: `make test` installs Debian's chromium where apt-get "
                    "works (root); install it to run the report's browser test")
    profile = page.parent.parent / ".chromium-profile"
    return subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                           "--disable-background-networking", "--disable-component-update", "--disable-sync",
                           f"--user-data-dir={profile}", "--virtual-time-budget=10000", *flags, page.as_uri()],
                          capture_output=True, text=True, timeout=120, check=True)


def test_report_renders_in_a_real_browser_with_every_plot(tokens_run, tmp_path):
    from PIL import Image

    out = tmp_path / "out"
    shutil.copytree(tokens_run["out"], out)
    page = out / "report" / "index.html"
    source = page.read_text()
    for plot in ("funnel.png", "licenses.png", "codebook.png", "sequences.png", "vq-recon.png"):
        assert f'src="{plot}"' in source, plot
    shot = tmp_path / "report.png"
    _render(page, f"--screenshot={shot}", "--window-size=1200,3000")
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float32)
    assert pixels.std() > 20 and (pixels < 200).mean() > 0.05  # not a blank (or error) page
    probe = page.with_name("probe.html")  # the page plus a script of the test's that counts the images loaded
    probe.write_text(source.replace("</body>", """<script>
window.addEventListener("load", () => { const all = [...document.images];
  document.body.dataset.probe = JSON.stringify({images: all.length,
    broken: all.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.getAttribute("src"))}); });
</script></body>"""))
    dom = _render(probe, "--dump-dom").stdout
    found = json.loads(html.unescape(re.search(r'data-probe="([^"]*)"', dom).group(1)))
    assert found["broken"] == [] and found["images"] == source.count("<img ")


def test_report_escapes_what_people_wrote_and_is_rewritten_by_a_takedown(tokens_run, tmp_path):
    from pipeline.cli import main
    from pipeline.takedown import takedown

    out = tmp_path / "out"
    shutil.copytree(tokens_run["out"], out)
    victim = _sequences(out)[0]["main_asset_id"]
    takedown(str(out), [victim], reason="<script>alert(1)</script> & <img src=x onerror=alert(2)>")
    page = (out / "report" / "index.html").read_text()
    tags = []
    parser = HTMLParser()
    parser.handle_starttag = lambda tag, attrs: tags.append((tag, dict(attrs)))
    parser.feed(page)
    assert not [t for t in tags if t[0] == "script" or any(a.startswith("on") for a in t[1])]
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and victim in page
    (out / "report").rename(tmp_path / "old-report")
    assert main(["report", "--out", str(out)]) == 0  # `curate report` writes it again
    assert (out / "report" / "index.html").read_text() == page
    assert main(["report", "--out", str(tmp_path / "nothing-here")]) == 2
