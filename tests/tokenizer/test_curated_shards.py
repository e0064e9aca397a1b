import hashlib

from tokenizer.shards import is_heldout, iter_samples, iter_shard, key_bucket, list_shards


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
