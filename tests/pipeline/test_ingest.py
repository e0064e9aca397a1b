"""Manifest readers (JSONL / CSV / Parquet, local and memory://) and the validation stage."""

import json

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import ValidateConfig
from pipeline.records import RejectReason
from pipeline import ledger
from pipeline.stages.ingest import clean_captions, read_manifest

ROWS = [
    {"asset_id": "a", "uri": "a.jpg", "captions": ["A red bus in the street."], "license_id": "CC-BY-2.0",
     "allowed_uses": ["ml-training"]},
    {"asset_id": "b", "uri": "b.jpg", "caption": "Two cats on a sofa.", "license_id": "CC-BY-2.0"},
]


def test_jsonl_malformed_line_is_a_row_not_a_crash(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n\n{broken\n[1, 2]\n" + json.dumps(ROWS[1]) + "\n")
    rows = list(read_manifest(str(path)))
    assert [r.manifest_row for r in rows] == [1, 2, 3, 4]
    assert rows[1].parse_error.startswith("invalid JSON") and rows[2].parse_error.startswith("line is a JSON list")
    assert rows[3].raw["asset_id"] == "b"


def test_csv_and_parquet_and_memory_urls(tmp_path):
    csv_text = "asset_id,uri,caption,license_id,allowed_uses\na,a.jpg,A red bus.,CC-BY-2.0,ml-training;research\n" \
               "b,b.jpg,Two cats.,CC-BY-2.0\n"
    with fsspec.open("memory://deliveries/m.csv", "w") as f:
        f.write(csv_text)
    rows = list(read_manifest("memory://deliveries/m.csv"))
    assert rows[0].raw["allowed_uses"] == "ml-training;research"
    assert rows[1].parse_error == "4 cells for 5 columns"

    table = pa.Table.from_pylist([dict(r, captions=r.get("captions", [r.get("caption")])) for r in ROWS])
    pq.write_table(table, tmp_path / "m.parquet")
    rows = list(read_manifest(f"file://{tmp_path}/m.parquet"))
    assert [r.raw["asset_id"] for r in rows] == ["a", "b"] and [r.manifest_row for r in rows] == [1, 2]


def test_gzip_manifest(tmp_path):
    import gzip
    with gzip.open(tmp_path / "m.jsonl.gz", "wt") as f:
        f.write("\n".join(json.dumps(r) for r in ROWS))
    assert len(list(read_manifest(str(tmp_path / "m.jsonl.gz")))) == 2


def test_unknown_format_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="unknown manifest format"):
        list(read_manifest(str(tmp_path / "m.xml")))


@pytest.mark.parametrize("captions,reason", [
    (["   ", ""], RejectReason.CAPTION_EMPTY),
    (["word " * 400], RejectReason.CAPTION_TOO_LONG),
    (["IMG_0042.JPG 1234-5678 ####"], RejectReason.CAPTION_NOT_TEXT),
    (["http://x.y/1234567890.jpg"], RejectReason.CAPTION_NOT_TEXT),
])
def test_caption_filters(captions, reason):
    kept, failure = clean_captions(captions, ValidateConfig())
    assert kept == () and failure[0] == reason


def test_caption_cleaning_keeps_good_ones_and_normalises():
    kept, failure = clean_captions(["  A  dog\tin\nthe park. ", "####", "A  dog in the park."], ValidateConfig())
    assert kept == ("A dog in the park.",) and failure is None


def test_validate_outputs_and_counters_in_a_run(tmp_path, demo_dir):
    """Validation inside the prepare step: every row once in the ledger with its reason; the
    repeated id is found among valid rows (the earliest wins) after the chunk boundary."""
    from pipeline.config import AlignConfig, CuratedConfig, RunConfig
    from pipeline.run import run

    photos = sorted((demo_dir / "images").glob("*.jpg"))
    for name, photo in zip(("a.jpg", "b.jpg", "again.jpg"), photos):
        (tmp_path / name).write_bytes(photo.read_bytes())
    rows = ROWS + [
        dict(ROWS[0], uri="again.jpg"),  # duplicate id: later row rejected
        {"asset_id": "c", "uri": "c.jpg", "captions": ["  "], "license_id": "CC-BY-2.0"},
        {"asset_id": "d", "caption": "no uri here", "license_id": "CC-BY-2.0"},
    ]
    path = tmp_path / "m.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n{oops\n")
    policy = tmp_path / "policy.yaml"
    policy.write_text("as_of: '2026-01-01'\nallowed_licenses: [CC-BY-2.0]\nrequired_use: null\n")
    cfg = RunConfig(manifests=(str(path),), policy=str(policy), out=str(tmp_path / "out"),
                    align=AlignConfig(enabled=False), curated=CuratedConfig(chunk_rows=2))
    report = run(cfg, until="curated", beam_flags=["--direct_running_mode=in_memory", "--direct_num_workers=1"])
    table = sorted(ledger.read_ledger(cfg.out).to_pylist(), key=lambda r: r["manifest_row"])
    assert [(r["manifest_row"], r["reason"], r["dup_of"]) for r in table] == [
        (1, None, None), (2, None, None), (3, "DUPLICATE_ASSET_ID", "a"), (4, "CAPTION_EMPTY", None),
        (5, "MISSING_FIELD", None), (6, "MALFORMED_ROW", None)]
    counters = report.counters
    assert counters["ingest/in"] == 6 and counters["validate/in"] == 6
    assert counters["validate/kept"] == 3  # before the duplicate-id check
    assert counters["validate/rejected/DUPLICATE_ASSET_ID"] == 1
    assert counters["validate/rejected/MALFORMED_ROW"] == 1
