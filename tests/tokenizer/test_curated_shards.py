import hashlib
import json

import numpy as np
import pytest

from tokenizer.shards import (
    METADATA_SCHEMA,
    atomic_open,
    is_heldout,
    iter_samples,
    iter_shard,
    key_bucket,
    list_shards,
    sample_json_bytes,
    write_bytes_atomic,
    write_shard,
    write_store,
)


def test_reader_streams_every_sample_with_metadata(curated_store):
    urls = list_shards(curated_store["dir"])
    assert urls == sorted(curated_store["urls"])
    got = list(iter_samples(urls))
    assert [s.key for s in got] == [s[0] for s in curated_store["samples"]]
    first = got[0]
    assert first.meta["key"] == first.key and first.meta["asset_id"].startswith("coco-")
    assert isinstance(first.meta["captions"], list)
    arr = first.array()
    assert arr.shape == (256, 256, 3) and arr.dtype.name == "uint8"
    assert len(list(iter_shard(urls[0]))) == 8


def test_heldout_split_is_deterministic_disjoint_and_about_ten_percent(curated_store):
    urls = curated_store["urls"]
    train = {s.key for s in iter_samples(urls, "train")}
    held = {s.key for s in iter_samples(urls, "heldout")}
    assert train.isdisjoint(held) and len(train | held) == len(curated_store["samples"])
    assert held == {s.key for s in iter_samples(urls, "heldout")}
    keys = [hashlib.sha256(str(i).encode()).hexdigest()[:16] for i in range(20_000)]
    frac = sum(map(is_heldout, keys)) / len(keys)
    assert 0.09 < frac < 0.11
    assert all(0 <= key_bucket(k) < 100 for k in keys[:100])
    assert is_heldout(keys[0], 100) and not is_heldout(keys[0], 0)


# ------------------------------------------------------------------------------ the format's writer


def _ustar_tar(samples) -> bytes:
    """The tar the store wrote before it used webdataset's TarWriter: stdlib USTAR, fixed headers."""
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for key, jpeg, meta in samples:
            for name, data in ((f"{key}.jpg", jpeg), (f"{key}.json", sample_json_bytes(meta))):
                info = tarfile.TarInfo(name)
                info.size, info.mtime, info.mode, info.uid, info.gid = len(data), 0, 0o644, 0, 0
                info.uname = info.gname = ""
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _samples(n: int):
    rng = np.random.default_rng(0)
    keys = sorted(hashlib.blake2b(f"a-{i}".encode(), digest_size=8).hexdigest() for i in range(n))
    return [(k, rng.integers(0, 256, int(rng.integers(1, 3000)), dtype=np.uint8).tobytes(),
             {"asset_id": f"a-{i}", "key": k, "shard": 0, "captions": ["ünïcode caption"], "license_id": "CC-BY-2.0",
              "extra": {"b": 1}, "objects": [{"label": "dog", "bbox": [1, 2, 3, 4]}] if i % 2 else None})
            for i, k in enumerate(keys)]


def test_webdataset_tarwriter_writes_the_bytes_of_the_stdlib_ustar_writer(tmp_path):
    """TarWriter writes PAX whatever its `format` says; for our names that must stay USTAR's bytes."""
    samples = _samples(12)
    entry = write_shard(str(tmp_path), 0, samples)
    data = (tmp_path / "images-000000.tar").read_bytes()
    assert data == _ustar_tar(samples)
    assert entry["tar_sha256"] == hashlib.sha256(data).hexdigest() and entry["samples"] == 12


def test_written_shard_reads_back_with_its_metadata_parquet(tmp_path):
    import pyarrow.parquet as pq

    samples = _samples(5)
    write_shard(str(tmp_path), 0, samples)
    back = list(iter_shard(str(tmp_path / "images-000000.tar")))
    assert [(s.key, s.jpeg, s.meta) for s in back] == samples
    table = pq.read_table(tmp_path / "metadata-000000.parquet")
    assert table.schema == METADATA_SCHEMA
    rows = table.to_pylist()
    assert [r["key"] for r in rows] == [s[0] for s in samples]
    assert [r["image_bytes"] for r in rows] == [len(s[1]) for s in samples]
    assert json.loads(rows[1]["extra_json"]) == {"b": 1, "objects": [{"label": "dog", "bbox": [1, 2, 3, 4]}]}
    assert rows[0]["extra_json"] == '{"b": 1}' and rows[0]["manifest_row"] is None  # absent -> null
    unnumbered = [(k, jpeg, {f: v for f, v in meta.items() if f != "shard"}) for k, jpeg, meta in samples]
    write_shard(str(tmp_path), 5, unnumbered)  # the Parquet's shard is the shard written, not what the JSON says
    assert set(pq.read_table(tmp_path / "metadata-000005.parquet").column("shard").to_pylist()) == {5}


def test_writer_refuses_samples_out_of_key_order(tmp_path):
    samples = _samples(3)
    with pytest.raises(ValueError, match="sorted by key"):
        write_shard(str(tmp_path), 0, reversed(samples))
    assert not list(tmp_path.iterdir())  # neither the tar nor a temp file is left


def test_write_store_gives_a_complete_store(tmp_path):
    samples = [(k, jpeg, {"asset_id": meta["asset_id"]}) for k, jpeg, meta in _samples(7)]
    urls = write_store(reversed(samples), str(tmp_path), per_shard=3)
    assert urls == list_shards(str(tmp_path)) and len(urls) == 3
    index = json.loads((tmp_path / "index.json").read_text())
    assert index["samples"] == 7 and [s["samples"] for s in index["shards"]] == [3, 3, 1]
    got = list(iter_samples(urls))
    assert [(s.key, s.meta["shard"]) for s in got] == [(k, i // 3) for i, (k, _, _) in enumerate(samples)]


def test_atomic_open_shows_a_file_only_when_complete(tmp_path):
    target = tmp_path / "sub" / "f.bin"
    write_bytes_atomic(str(target), b"old")
    with pytest.raises(RuntimeError):
        with atomic_open(str(target)) as handle:
            handle.write(b"half")
            assert target.read_bytes() == b"old"  # the new bytes are not visible while written
            raise RuntimeError("killed")
    assert target.read_bytes() == b"old" and [p.name for p in target.parent.iterdir()] == ["f.bin"]
    write_bytes_atomic(str(target), b"new")
    assert target.read_bytes() == b"new" and [p.name for p in target.parent.iterdir()] == ["f.bin"]
