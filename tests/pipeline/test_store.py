"""Curated shards: deterministic bytes, atomic writes, and a lossless read-back."""

import hashlib

from manifests.schema import parse_entry
from pipeline import storage
from pipeline.records import Asset
from pipeline.stages.store import read_shard, write_shard


def make_asset(i: int) -> Asset:
    entry = parse_entry({"asset_id": f"a-{i}", "uri": f"img/{i}.jpg", "captions": [f"photo number {i}"],
                         "license_id": "CC-BY-2.0", "allowed_uses": ["ml-training"], "license_expiry": "2030-01-01",
                         "vendor_batch": "b7"})
    return Asset(entry=entry, manifest_uri="/m.jsonl", manifest_row=i, sha256="ab" * 32, image=b"\xff\xd8jpeg%d" % i,
                 source_width=640, source_height=480, captions=(f"photo number {i}",), pixel_sha256="cd" * 32)


def test_shard_bytes_do_not_depend_on_input_order(tmp_path):
    records = [(storage.asset_key(a.asset_id), a) for a in map(make_asset, range(20))]
    first = write_shard(str(tmp_path / "x"), 0, records)
    second = write_shard(str(tmp_path / "y"), 0, list(reversed(records)))
    assert first["tar_sha256"] == second["tar_sha256"] and first["samples"] == 20
    for name in ("images-000000.tar", "metadata-000000.parquet"):
        assert hashlib.sha256((tmp_path / "x" / name).read_bytes()).digest() == \
            hashlib.sha256((tmp_path / "y" / name).read_bytes()).digest()
    assert not list(tmp_path.rglob(".tmp-*"))


def test_read_back_is_lossless(tmp_path):
    assets = [make_asset(i) for i in range(5)]
    write_shard(str(tmp_path), 3, [(storage.asset_key(a.asset_id), a) for a in assets])
    back = {a.asset_id: a for a in read_shard(str(tmp_path / "images-000003.tar"))}
    for original in assets:
        got = back[original.asset_id]
        assert got.entry == original.entry and got.image == original.image and got.captions == original.captions
        assert (got.manifest_uri, got.manifest_row, got.sha256) == (original.manifest_uri, original.manifest_row,
                                                                   original.sha256)


def test_outputs_md_lists_the_metadata_parquet_columns_the_store_writes(tmp_path):
    """docs/outputs.md's column table against the file write_shard really writes."""
    import re
    from pathlib import Path

    import pyarrow.parquet as pq

    doc = (Path(__file__).resolve().parents[2] / "docs" / "outputs.md").read_text()
    table = doc.split("`metadata-NNNNNN.parquet` has one row per sample", 1)[1].split("\n\n", 2)[1]
    documented = [name for line in table.splitlines()[2:] for name in re.findall(r"`(\w+)`", line.split("|")[1])]
    write_shard(str(tmp_path), 0, [(storage.asset_key(a.asset_id), a) for a in map(make_asset, range(3))])
    written = pq.read_schema(tmp_path / "metadata-000000.parquet").names
    assert sorted(documented) == sorted(written)
