"""The chunked prepare step: chunk boundaries change nothing but the ledger's file layout,
repeated ids and duplicates are found across chunks, and the work files are cleaned up."""

import dataclasses
import json

import pyarrow.parquet as pq
import pytest

from pipeline import ledger
from pipeline.config import AlignConfig, CuratedConfig, ConfigError, RunConfig
from pipeline.run import run
from pipeline.stages.ingest import read_manifest
from pipeline.storage import SpanWriter, read_span
from pipeline.stages.ingest import Chunk, read_chunks
from pipeline.stages.prepare import load_record
from tests.pipeline.test_run import IN_MEMORY, tree_digest

MULTI = ["--direct_running_mode=multi_processing", "--direct_num_workers=2"]


def _config(corpus, out, chunk_rows: int) -> RunConfig:
    return RunConfig(manifests=(str(corpus["manifest"]),), policy=str(corpus["policy"]), out=str(out),
                     align=AlignConfig(enabled=False), curated=CuratedConfig(samples_per_shard=5, chunk_rows=chunk_rows))


def _rows(out) -> list[dict]:
    return sorted(ledger.read_ledger(str(out)).to_pylist(), key=lambda r: (r["manifest_uri"], r["manifest_row"]))


def _manifest_lines() -> str:
    lines = [json.dumps({"asset_id": f"a{i}", "caption": "caf\u00e9 \u2603"}, ensure_ascii=False) for i in range(7)]
    lines.insert(2, "")  # blank lines are not rows
    lines.insert(5, "{not json")  # a malformed line is a row (rejected later)
    lines.insert(6, "   ")
    return "\r\n".join(lines) + "\n"


@pytest.mark.parametrize("name", ["m.jsonl", "m.jsonl.gz", "m.csv"])
def test_chunks_hold_every_row_once_with_its_number(tmp_path, name):
    """JSONL chunks are byte ranges the worker reads; other formats carry their rows. Either
    way the rows and their numbers are those of a plain read of the manifest."""
    import gzip

    path = tmp_path / name
    if name.endswith(".csv"):
        path.write_text("asset_id,caption\n" + "".join(f"a{i},photo {i}\n" for i in range(7)))
    elif name.endswith(".gz"):
        path.write_bytes(gzip.compress(_manifest_lines().encode()))
    else:
        path.write_text(_manifest_lines())
    chunks = list(read_chunks((3, str(path)), 3))
    assert [(c.manifest_index, c.index) for c in chunks] == [(3, 0), (3, 1), (3, 2)]
    assert all((c.span is not None) == (name == "m.jsonl") for c in chunks)
    rows = [r for c in chunks for r in c.source_rows()]
    assert rows == list(read_manifest(str(path)))
    assert [r.manifest_row for r in rows] == list(range(1, 9 if name != "m.csv" else 8))
    assert chunks[1].name == "chunk-0003-000001"


def test_staging_pointers_round_trip(tmp_path):
    staging = SpanWriter(str(tmp_path / "staging" / "chunk.bin"))
    refs = [staging.append(data) for data in (b"first", b"", b"third bytes")]
    staging.close()
    assert [read_span(r) for r in refs] == [b"first", b"", b"third bytes"]
    assert refs[2].endswith("@5:11")


def test_chunk_size_changes_nothing_but_the_ledger_layout(tiny_corpus, tmp_path):
    """Chunks of 4 rows: the repeated id, the exact and the near duplicate all sit in other
    chunks than their originals; decisions, shards and ledger rows must not change."""
    whole = tmp_path / "whole"
    run(_config(tiny_corpus, whole, 500), until="curated", beam_flags=IN_MEMORY)
    small = tmp_path / "small"
    report = run(_config(tiny_corpus, small, 4), until="curated", beam_flags=MULTI)
    assert tree_digest(small, "curated") == tree_digest(whole, "curated")
    assert _rows(small) == _rows(whole)
    assert report.summary.rows_in == tiny_corpus["rows"] == len(_rows(small))
    reasons = {r["reason"] for r in _rows(small)}
    assert {"DUPLICATE_ASSET_ID", "EXACT_DUPLICATE", "NEAR_DUPLICATE"} <= reasons
    c = report.counters  # each dedup stage accounts for what it was given
    assert c["dedup_exact/in"] == c["dedup_exact/kept"] + c["dedup_exact/rejected/EXACT_DUPLICATE"]
    assert c["dedup_near/in"] == c["dedup_exact/kept"] == c["dedup_near/kept"] + c["dedup_near/rejected/NEAR_DUPLICATE"]
    assert c["validate/rejected/DUPLICATE_ASSET_ID"] == sum(r["reason"] == "DUPLICATE_ASSET_ID" for r in _rows(small))
    files = sorted(p.name for p in (small / "ledger").glob("*.parquet"))
    chunks = -(-tiny_corpus["rows"] // 4)
    assert len(files) == -(-chunks // 10) > 1 and len(list((whole / "ledger").glob("*.parquet"))) == 1
    for name in files:  # each file is in manifest order
        rows = pq.read_table(small / "ledger" / name).column("manifest_row").to_pylist()
        assert rows == sorted(rows)
    assert not (small / "_work" / "staging").exists() and not (small / "_work" / "slices").exists()


def test_first_valid_row_keeps_its_id_even_when_a_later_stage_rejects_it(tiny_corpus, tmp_path):
    """As in a validate-time check: the earliest valid row owns the id, whatever happens to it
    afterwards, and a later row with that id is a DUPLICATE_ASSET_ID even if it would pass."""
    allowed = [c for c in tiny_corpus["coco"] if "ND" not in c["license_id"]]
    disallowed = next(c["license_id"] for c in tiny_corpus["coco"] if "ND" in c["license_id"])
    first = dict(allowed[0], license_id=disallowed)  # a valid row, rejected by the license gate
    manifest = tiny_corpus["dir"] / "ids.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in (first, allowed[1], allowed[0])))
    cfg = dataclasses.replace(_config(tiny_corpus, tmp_path / "out", 1), manifests=(str(manifest),))
    run(cfg, until="curated", beam_flags=IN_MEMORY)
    rows = _rows(tmp_path / "out")
    assert [(r["manifest_row"], r["status"], r["reason"]) for r in rows] == [
        (1, "rejected", "LICENSE_DISALLOWED"), (2, "kept", None), (3, "rejected", "DUPLICATE_ASSET_ID")]
    assert rows[2]["stage"] == "validate" and f"{manifest} row 1" in rows[2]["detail"]


def test_a_kept_record_is_the_asset_without_pixels_in_memory(tiny_corpus, tmp_path):
    from manifests.policy import load_policy
    from pipeline.stages.prepare import ProcessChunk, slice_url

    cfg = _config(tiny_corpus, tmp_path / "out", 500)
    dofn = ProcessChunk(cfg.validate, load_policy(cfg.policy), cfg.fetch, cfg.decode, cfg.dedup, str(tmp_path / "work"))
    dofn.setup()
    rows = tuple(read_manifest(str(tiny_corpus["manifest"])))[:3]
    (summary,) = dofn.process(Chunk(0, str(tiny_corpus["manifest"]), 0, rows))
    assert summary["rows"] == 3 and summary["kept"] >= 1
    table = pq.read_table(slice_url(str(tmp_path / "work"), summary["chunk"])).to_pylist()
    kept = [r for r in table if r["status"] == "kept"]
    asset = load_record(kept[0]["record"])
    assert asset.image is None and asset.source_bytes is None and asset.asset_id == kept[0]["asset_id"]
    assert asset.image_bytes()[:2] == b"\xff\xd8" and asset.phash == kept[0]["phash"]
    assert kept[0]["area"] == asset.source_width * asset.source_height


def test_chunk_rows_is_validated():
    with pytest.raises(ConfigError, match="chunk_rows"):
        CuratedConfig(chunk_rows=0)


def test_a_redelivery_is_deduplicated_against_the_previous_run(tiny_corpus, tmp_path):
    """dedup.previous_run in a run: copies of curated assets under new ids are rejected with
    dup_of = the asset of the earlier store, by exact match before near search."""
    first = tmp_path / "first"
    run(_config(tiny_corpus, first, 500), until="curated", beam_flags=IN_MEMORY)
    kept = [r["asset_id"] for r in _rows(first) if r["status"] == "kept"][:2]
    by_id = {c["asset_id"]: c for c in tiny_corpus["coco"]}
    manifest = tiny_corpus["dir"] / "again.jsonl"
    manifest.write_text("".join(json.dumps(dict(by_id[a], asset_id=f"again-{a}")) + "\n" for a in kept))
    cfg = dataclasses.replace(_config(tiny_corpus, tmp_path / "second", 500), manifests=(str(manifest),))
    cfg = dataclasses.replace(cfg, dedup=dataclasses.replace(cfg.dedup, previous_run=str(first / "curated")))
    report = run(cfg, until="curated", beam_flags=IN_MEMORY)
    rows = _rows(tmp_path / "second")
    assert [(r["reason"], r["dup_of"]) for r in rows] == [("EXACT_DUPLICATE", a) for a in kept]
    assert all("previous run" in r["detail"] for r in rows) and report.summary.kept == 0
    assert report.counters["dedup_exact/rejected/EXACT_DUPLICATE"] == 2
