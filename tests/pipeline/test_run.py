"""The curated phase end to end: every reject reason from a real bad input, the ledger
invariant, determinism, webdataset-readable shards, resume after a killed run."""

import dataclasses
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import webdataset as wds

from pipeline import ledger
from pipeline.config import AlignConfig, RunConfig
from pipeline.run import run

IN_MEMORY = ["--direct_running_mode=in_memory", "--direct_num_workers=1"]
EXPECTED = {
    "bad-random-bytes": "NOT_AN_IMAGE", "bad-truncated": "TRUNCATED_IMAGE", "bad-empty": "EMPTY_FILE",
    "bad-bomb": "DECOMPRESSION_BOMB", "bad-missing": "FILE_NOT_FOUND", "bad-escape": "URI_NOT_ALLOWED",
    "bad-other-host": "URI_NOT_ALLOWED", "bad-tdm": "TDM_OPT_OUT", "bad-tiny": "TOO_SMALL",
    "bad-panorama": "BAD_ASPECT_RATIO", "bad-checksum": "CHECKSUM_MISMATCH", "bad-expired": "LICENSE_EXPIRED",
    "bad-not-yet-valid": "LICENSE_NOT_YET_VALID", "bad-unknown-license": "LICENSE_UNKNOWN",
    "bad-editorial-only": "USE_NOT_ALLOWED", "bad-caption-empty": "CAPTION_EMPTY",
    "bad-caption-long": "CAPTION_TOO_LONG", "bad-caption-not-text": "CAPTION_NOT_TEXT",
    "bad-bad-date": "BAD_DATE", "bad-type": "BAD_FIELD_TYPE",
    "dup-exact": "EXACT_DUPLICATE", "dup-near": "NEAR_DUPLICATE",
}


def config(corpus, out) -> RunConfig:
    """Ingest + dedup only (no CLIP), so these tests stay fast; test_e2e covers the rest."""
    return RunConfig(manifests=(str(corpus["manifest"]),), policy=str(corpus["policy"]), out=str(out),
                     align=AlignConfig(enabled=False))


def tree_digest(root: Path, *folders: str) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for folder in folders for p in sorted((root / folder).rglob("*")) if p.is_file()}


@pytest.fixture()
def first_run(tiny_corpus, tmp_path):
    report = run(config(tiny_corpus, tmp_path / "out"), until="curated", beam_flags=IN_MEMORY)
    return tiny_corpus, tmp_path / "out", report


def test_every_reason_and_the_invariant(first_run):
    corpus, out, report = first_run
    table = ledger.read_ledger(str(out)).to_pylist()
    assert len(table) == corpus["rows"] == report.summary.rows_in
    by_id = {}
    for row in table:
        by_id.setdefault(row["asset_id"], []).append(row)
    for asset_id, reason in EXPECTED.items():
        assert [r["reason"] for r in by_id[asset_id]] == [reason], asset_id
    for asset_id in ("dup-exact", "dup-near"):
        (row,) = by_id[asset_id]
        assert row["dup_of"] == row["cluster_id"] and [r["status"] for r in by_id[row["dup_of"]]] == ["kept"]
    malformed = [r for r in table if r["reason"] == "MALFORMED_ROW"]
    assert len(malformed) == 1 and malformed[0]["asset_id"] is None
    assert [r["reason"] for r in by_id["bad-no-uri"]] == ["MISSING_FIELD"]
    first, repeat = sorted(by_id[corpus["coco"][0]["asset_id"]], key=lambda r: (r["manifest_uri"], r["manifest_row"]))
    assert first["reason"] != "DUPLICATE_ASSET_ID" and repeat["reason"] == "DUPLICATE_ASSET_ID"
    nd = [c for c in corpus["coco"] if "ND" in c["license_id"]]
    disallowed = [r for r in table if r["reason"] == "LICENSE_DISALLOWED"]
    assert len(disallowed) == len(nd) > 0
    kept = [r for r in table if r["status"] == "kept"]
    assert report.summary.kept == len(kept) and report.summary.rejected == len(table) - len(kept)
    assert all(r["license_id"] and r["sha256"] for r in kept)


def test_curated_store_is_webdataset_with_full_metadata(first_run):
    corpus, out, report = first_run
    index = json.loads((out / "curated" / "index.json").read_text())
    assert index["samples"] == report.summary.kept
    samples = list(wds.WebDataset([str(out / "curated" / s["tar"]) for s in index["shards"]], shardshuffle=False))
    assert len(samples) == report.summary.kept
    for sample in samples:
        meta = json.loads(sample["json"])
        assert meta["key"] == sample["__key__"] and meta["license_id"] and meta["captions"]
        assert meta["manifest_row"] >= 1 and meta["sha256"] and meta["source_width"] > 0
        assert sample["jpg"][:2] == b"\xff\xd8"
    meta = pq.read_table(out / "curated" / index["shards"][0]["metadata"]).to_pylist()
    assert meta == sorted(meta, key=lambda r: r["key"])
    with tarfile.open(out / "curated" / index["shards"][0]["tar"]) as tar:
        assert {(m.mtime, m.uid, m.uname) for m in tar.getmembers()} == {(0, 0, "")}


def test_run_json_counters_account_for_every_row_the_ledger_holds(first_run):
    """validate, license, fetch, decode, dedup and store counters in run.json against the ledger.
    A stage counts what it saw; the one later relabelling is a repeated asset id (docs/reasons.md)."""
    from collections import Counter

    corpus, out, report = first_run
    counters = json.loads((out / "run.json").read_text())["counters"]
    assert counters == report.counters
    rows = ledger.read_ledger(str(out)).to_pylist()
    final = Counter((r["stage"], r["reason"]) for r in rows if r["status"] == "rejected")

    def rejected(stage):
        return {k.split("/", 2)[2]: v for k, v in counters.items() if k.startswith(f"{stage}/rejected/")}

    repeats = final["validate", "DUPLICATE_ASSET_ID"]
    assert repeats >= 1 and counters["ingest/in"] == counters["validate/in"] == corpus["rows"]
    assert rejected("validate") == {reason: n for (stage, reason), n in final.items() if stage == "validate"}
    assert counters["validate/in"] == counters["validate/kept"] + sum(rejected("validate").values()) - repeats
    assert counters["license/in"] == counters["validate/kept"]  # repeats are still checked: their id is decided later
    assert counters["fetch/in"] == counters["license/kept"] and counters["decode/in"] == counters["fetch/kept"]
    relabelled = 0  # a repeated id's row, counted by the stage that ended it, says DUPLICATE_ASSET_ID in the ledger
    for stage in ("license", "fetch", "decode"):
        counted = rejected(stage)
        assert counters[f"{stage}/in"] == counters[f"{stage}/kept"] + sum(counted.values())
        assert set(counted) == {reason for (s, reason) in final if s == stage}
        for reason, n in counted.items():
            assert n >= final[stage, reason]
            relabelled += n - final[stage, reason]
    relabelled += counters["decode/kept"] - counters["dedup_exact/in"]
    assert relabelled == repeats
    for stage, reason in (("dedup_exact", "EXACT_DUPLICATE"), ("dedup_near", "NEAR_DUPLICATE")):
        assert rejected(stage) == {reason: final[stage, reason]} and final[stage, reason] >= 1
        assert counters[f"{stage}/in"] == counters[f"{stage}/kept"] + final[stage, reason]
    assert counters["dedup_near/in"] == counters["dedup_exact/kept"]
    index = json.loads((out / "curated" / "index.json").read_text())
    assert counters["store/samples_written"] == counters["dedup_near/kept"] == index["samples"] == report.summary.kept


def test_a_delivery_of_two_manifests_with_an_id_in_both(tiny_corpus, tmp_path):
    """The COCO rows in a.jsonl, the bad cases in b.jsonl (exact and near copies of a's photos,
    a's first id repeated) plus a kept asset's id again in b with another photo. One ledger over
    both files; dedup works across them; of a repeated id, the earliest (manifest URL, row) wins,
    however the manifests are listed."""
    from tests.conftest import DEMO, demo_rows, write_jsonl

    corpus = tiny_corpus
    target = next(r for r in corpus["coco"] if "ND" not in r["license_id"]
                  and r["asset_id"] not in {b.get("derived_from") for b in corpus["bad"] if isinstance(b, dict)})
    used = {r["uri"] for r in corpus["coco"]}
    other = next(r for r in demo_rows("coco.jsonl") if r["uri"] not in used and "ND" not in r["license_id"])
    shutil.copy(DEMO / other["uri"], corpus["dir"] / other["uri"])
    again = {**target, "uri": other["uri"], "sha256": other["sha256"]}  # same id, another photo
    a = write_jsonl(corpus["dir"] / "a.jsonl", corpus["coco"])
    b = write_jsonl(corpus["dir"] / "b.jsonl", corpus["bad"] + [again])
    rows_in = len(corpus["coco"]) + len(corpus["bad"]) + 1

    def deliver(manifests, out):
        cfg = RunConfig(manifests=tuple(str(m) for m in manifests), policy=str(corpus["policy"]), out=str(out),
                        align=AlignConfig(enabled=False))
        report = run(cfg, until="curated", beam_flags=IN_MEMORY)
        assert report.summary.rows_in == rows_in
        rows = ledger.read_ledger(str(out)).to_pylist()
        assert len(rows) == rows_in and {r["manifest_uri"] for r in rows} == {str(a), str(b)}
        return rows, {(r["manifest_uri"], r["asset_id"]): r for r in rows}

    _, by = deliver([a, b], tmp_path / "ab")
    assert {p.name[:11] for p in (tmp_path / "ab" / "ledger").glob("*.parquet")} == {"ledger-0000", "ledger-0001"}
    for asset_id, reason in EXPECTED.items():  # dup-exact / dup-near in b match their originals in a
        assert by[str(b), asset_id]["reason"] == reason, asset_id
    first, repeat = by[str(a), target["asset_id"]], by[str(b), target["asset_id"]]
    assert first["status"] == "kept" and first["sha256"] == target["sha256"]
    assert (repeat["status"], repeat["stage"], repeat["reason"], repeat["dup_of"]) == \
        ("rejected", "validate", "DUPLICATE_ASSET_ID", target["asset_id"])
    assert f"{a} row {first['manifest_row']}" in repeat["detail"]
    assert by[str(b), corpus["coco"][0]["asset_id"]]["reason"] == "DUPLICATE_ASSET_ID"  # a's first id, repeated in b
    meta = [m for p in sorted((tmp_path / "ab" / "curated").glob("metadata-*.parquet"))
            for m in pq.read_table(p).to_pylist() if m["asset_id"] == target["asset_id"]]
    assert [(m["manifest_uri"], m["sha256"]) for m in meta] == [(str(a), target["sha256"])]

    _, by = deliver([b, a], tmp_path / "ba")  # listed the other way round: a (the earlier URL) still wins
    assert by[str(b), target["asset_id"]]["reason"] == "DUPLICATE_ASSET_ID"  # manifests in URL order, not as listed
    assert tree_digest(tmp_path / "ab", "curated", "ledger") == tree_digest(tmp_path / "ba", "curated", "ledger")


def test_same_inputs_give_byte_identical_outputs(first_run, tmp_path):
    corpus, out, _ = first_run
    again = tmp_path / "again"
    run(config(corpus, again), until="curated",
        beam_flags=["--direct_running_mode=multi_threading", "--direct_num_workers=2"])
    assert tree_digest(out, "curated", "ledger") == tree_digest(again, "curated", "ledger")


def test_rerun_skips_a_complete_phase_and_invariant_breaks_loudly(first_run):
    corpus, out, _ = first_run
    before = tree_digest(out, "curated", "ledger")
    report = run(config(corpus, out), until="curated", beam_flags=IN_MEMORY)
    assert [(r.name, r.skipped) for r in report.steps] == [("prepare", True), ("clip", True), ("align", True)]
    assert tree_digest(out, "curated", "ledger") == before
    with pytest.raises(ledger.LedgerInvariantError):
        ledger.check_invariant(str(out), report.summary.rows_in + 1)


def test_memory_filesystem_end_to_end(tiny_corpus):
    import fsspec
    fs = fsspec.filesystem("memory")
    root = "/e2e-corpus"
    for path in Path(tiny_corpus["dir"]).rglob("*"):
        if path.is_file():
            fs.pipe(f"{root}/{path.relative_to(tiny_corpus['dir'])}", path.read_bytes())
    cfg = RunConfig(manifests=(f"memory://{root}/manifest.jsonl",), policy=str(tiny_corpus["policy"]),
                    out="memory://e2e-out", align=AlignConfig(enabled=False))
    report = run(cfg, until="curated", beam_flags=IN_MEMORY)
    assert report.summary.kept > 0 and report.summary.rows_in == tiny_corpus["rows"]
    assert fs.exists("/e2e-out/curated/index.json")


def _curate(args, **kw):
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kw)


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_outputs(tiny_corpus, tmp_path):
    """Every phase through the CLI (multi-processing workers), killed mid-prepare at a fixed point
    (SIGKILL to the whole run once 2 of its 6 chunks are staged: CM3CURATE_KILL_AFTER_CHUNKS), resumed."""
    from pipeline.stages.prepare import KILL_AFTER_CHUNKS_ENV

    cfg = tmp_path / "run.yaml"
    cfg.write_text("curated: {chunk_rows: 8}\n"
                   "clip_train: {max_steps: 3, batch_size: 8, progress: false}\n"
                   "align: {mode: top_fraction, keep_fraction: 0.9}\n"
                   "vq: {train: {max_steps: 3, batch_size: 4, eval_every: 3, checkpoint_every: 3, eval_images: 2,\n"
                   "             grid_images: 2, num_threads: 1, progress: false}}\n")
    assert tiny_corpus["rows"] > 5 * 8  # 6 chunks: the kill comes with 4 still to do
    args = ["run", "--config", str(cfg), "--manifest", str(tiny_corpus["manifest"]),
            "--policy", str(tiny_corpus["policy"])]
    reference = tmp_path / "reference"
    done = _curate(args + ["--out", str(reference)])
    assert done.wait(timeout=300) == 0, done.stdout.read()

    out = tmp_path / "interrupted"
    killed = _curate(args + ["--out", str(out)], start_new_session=True,  # its own process group: the hook kills it all
                     env={**os.environ, KILL_AFTER_CHUNKS_ENV: "2"})
    output = killed.communicate(timeout=300)[0]
    assert killed.returncode == -signal.SIGKILL, output
    assert len(list((out / "_work" / "slices").glob("*.parquet"))) >= 2
    assert not (out / "_state" / "prepare.json").exists() and not (out / "ledger").exists()

    resumed = _curate(args + ["--out", str(out)])
    output = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, output
    outputs = ("curated", "ledger", "index", "codes")
    assert tree_digest(out, *outputs) == tree_digest(reference, *outputs)
    vocab, ref_vocab = (json.loads((d / "models" / "vocab.json").read_text()) for d in (out, reference))
    vocab["text"].pop("tokenizer_uri"), ref_vocab["text"].pop("tokenizer_uri")  # absolute paths differ
    assert vocab == ref_vocab and vocab["text"]["sha256"]
    assert not list(out.rglob(".tmp-*"))
    rows = ledger.read_ledger(str(out)).to_pylist()
    assert any(r["clip_score"] is not None for r in rows)
    assert len([r for r in rows if r["reason"] == "LOW_ALIGNMENT"]) >= 1


def test_partial_outputs_of_a_crashed_phase_are_replaced(first_run, tmp_path):
    """A crash can leave temp files, a half-written set of shards and no state file."""
    corpus, out, _ = first_run
    reference = tree_digest(out, "curated", "ledger")
    (out / "_state" / "prepare.json").unlink()  # a crash during the first step
    shards = sorted((out / "curated").glob("images-*.tar"))
    shards[0].write_bytes(shards[0].read_bytes()[:1000])
    (out / "curated" / ".tmp-deadbeef-images-000009.tar").write_bytes(b"partial")
    (out / "curated" / "images-000099.tar").write_bytes(b"stale shard from another assignment")
    report = run(config(corpus, out), until="curated", beam_flags=IN_MEMORY)
    assert [r.skipped for r in report.steps] == [False, False, False]
    assert tree_digest(out, "curated", "ledger") == reference


@pytest.mark.slow
def test_align_step_with_semantic_dedup_keeps_the_ledger_whole(tiny_corpus, tmp_path):
    """CLIP scores + semantic dedup in the align step: every rejection lands in the ledger once,
    the prepare step's duplicates wait on standby and still point at kept assets, and only kept
    documents reach the embeddings table."""
    from pipeline.config import ClipTrainConfig, DedupConfig
    from pipeline.retrieval import read_embeddings

    cfg = dataclasses.replace(
        config(tiny_corpus, tmp_path / "out"), align=AlignConfig(mode="off"),
        clip_train=ClipTrainConfig(max_steps=3, batch_size=8, progress=False),
        dedup=DedupConfig(semantic=True, semantic_threshold=0.5))
    report = run(cfg, until="curated", beam_flags=IN_MEMORY)
    rows = ledger.read_ledger(cfg.out).to_pylist()
    semantic = [r for r in rows if r["reason"] == "SEMANTIC_DUPLICATE"]
    kept = {r["asset_id"] for r in rows if r["status"] == "kept"}
    assert semantic and all(r["dup_of"] in kept and r["clip_score"] is not None for r in semantic)
    dups = [r for r in rows if r["reason"] in ("EXACT_DUPLICATE", "NEAR_DUPLICATE", "SEMANTIC_DUPLICATE")]
    assert {"dup-exact", "dup-near"} <= {r["asset_id"] for r in dups}
    assert all(r["dup_of"] in kept for r in dups)  # a duplicate always points at a kept asset
    standby = pq.read_table(tmp_path / "out" / "_work" / "prepared" / "standby" / "metadata-000000.parquet")
    prepared = {r["asset_id"] for r in dups if r["stage"] in ("dedup_exact", "dedup_near")}
    assert set(standby.column("asset_id").to_pylist()) == prepared  # kept on standby, then scored:
    assert all(r["clip_score"] is not None for r in dups)  # every duplicate's row holds its score
    assert report.summary.rows_in == len(rows) == tiny_corpus["rows"]
    urls = sorted(str(p) for p in (tmp_path / "out" / "curated").glob("embeddings-*.parquet"))
    assert set(read_embeddings(urls).keys) == {r["key"] for r in rows if r["status"] == "kept"}


def test_malloc_arena_cap_is_set_for_local_workers_unless_the_user_chose(monkeypatch) -> None:
    from pipeline.runner import limit_malloc_arenas

    monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
    limit_malloc_arenas()
    assert os.environ["MALLOC_ARENA_MAX"] == "2"  # the workers inherit it
    monkeypatch.setenv("MALLOC_ARENA_MAX", "8")
    limit_malloc_arenas()
    assert os.environ["MALLOC_ARENA_MAX"] == "8"


def test_later_steps_reject_or_annotate_kept_rows_through_one_work_file(first_run, tmp_path):
    """encode, neighbours and tokens hand their findings to the ledger as {key, reason, detail}
    rows: rejections, or notes on rows that stay kept; a rerun of the step undoes its own."""
    _, out, report = first_run
    kept = [r for r in ledger.read_ledger(str(out)).to_pylist() if r["status"] == "kept"]
    a, b = kept[0]["key"], kept[1]["key"]
    url = str(tmp_path / "changes.jsonl")
    ledger.write_changes(url, [{"key": b, "reason": "ERROR", "detail": "boom"}])
    assert ledger.apply_changes(str(out), "neighbours", url, as_notes=True) == {b: ("ERROR", "boom")}
    ledger.write_changes(url, [{"key": a, "reason": "SEQUENCE_TOO_LONG", "detail": "too long"}])
    ledger.apply_changes(str(out), "tokens", url)
    rows = {r["key"]: r for r in ledger.read_ledger(str(out)).to_pylist()}
    assert (rows[a]["status"], rows[a]["stage"], rows[a]["reason"]) == ("rejected", "tokens", "SEQUENCE_TOO_LONG")
    assert (rows[b]["status"], rows[b]["detail"]) == ("kept", "neighbours: ERROR: boom")
    assert not os.path.exists(url)  # the work file is consumed
    ledger.check_invariant(str(out), report.summary.rows_in)  # still one row per manifest row
    ledger.update_statuses(str(out), "neighbours", restore=True)
    ledger.update_statuses(str(out), "tokens", restore=True)
    rows = {r["key"]: r for r in ledger.read_ledger(str(out)).to_pylist()}
    assert rows[a]["status"] == "kept" and rows[b]["detail"] is None
