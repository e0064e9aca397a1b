"""EncodeImages stage and encode_curated_store on real demo photos, with a tiny VQ model."""

from __future__ import annotations

import hashlib
from pathlib import Path

import apache_beam as beam
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from pipeline.records import RejectReason
from pipeline.stages.encode import EncodeConfig, EncodeImages, encode_curated_store
from pipeline.config import DecodeConfig
from pipeline.stages.decode import decode_image
from tokenizer.shards import iter_code_rows, write_store
from tokenizer.vq.config import VQConfig
from tokenizer.vq.model import VQModel, load_vq, save_vq

DEMO = Path(__file__).resolve().parents[2] / "manifests" / "demo" / "images"
TINY = VQConfig(name="test-tiny", resolution=64, patch_size=2, base_channels=16, channel_mult=(1, 1), num_res_blocks=1,
                norm_groups=4, latent_channels=16, codebook_size=64, code_dim=4)


@pytest.fixture(scope="module", autouse=True)
def _single_threaded(one_torch_thread):
    """Every test here runs with one torch thread (tests/conftest.py)."""


@pytest.fixture(scope="module")
def photos() -> list[tuple[str, bytes, dict]]:
    paths = sorted(DEMO.glob("*.jpg"))[:10]
    assert paths, f"demo photos missing from {DEMO}"
    out = []
    for p in paths:
        asset_id = f"coco-{p.stem}"
        key = hashlib.sha256(asset_id.encode()).hexdigest()[:16]
        jpeg = decode_image(p.read_bytes(), DecodeConfig(), hash_kind=None).jpeg  # what the pipeline stores
        out.append((key, jpeg, {"asset_id": asset_id, "key": key, "captions": ["x"], "license_id": "CC-BY-2.0"}))
    return out


@pytest.fixture(scope="module")
def model_path(tmp_path_factory, photos) -> str:
    torch.manual_seed(0)
    model = VQModel(TINY)
    x = torch.from_numpy(np.stack([np.asarray(__import__("tokenizer.shards", fromlist=["decode_rgb"]).decode_rgb(p[1])) for p in photos[:4]]))
    with torch.no_grad():  # seed the codebook from real encodings so codes are diverse
        model.train()(x.permute(0, 3, 1, 2).float() / 127.5 - 1)
    return save_vq(model.eval(), str(tmp_path_factory.mktemp("vq") / "vq.safetensors"))


def _expected(model_path: str, photos) -> dict[str, np.ndarray]:
    model = load_vq(model_path)
    arrays = np.stack([np.asarray(__import__("tokenizer.shards", fromlist=["decode_rgb"]).decode_rgb(p[1])) for p in photos])
    codes = model.encode_codes(arrays)
    return {p[0]: c for p, c in zip(photos, codes)}


def test_encode_images_stage_codes_rejects_and_counters(model_path, photos):
    expected = _expected(model_path, photos)
    inputs = [(k, jpeg) for k, jpeg, _ in photos] + [("badbadbadbadbad0", b"not a jpeg at all")]
    p = TestPipeline()
    kept, rejected = p | beam.Create(inputs) | EncodeImages(EncodeConfig(model_path=model_path, batch_size=4))
    as_lists = kept | beam.Map(lambda kv: (kv[0], kv[1].dtype.name, kv[1].shape, kv[1].tolist()))
    assert_that(as_lists, equal_to([(k, "uint16", (64, 64), c.tolist()) for k, c in expected.items()]), label="codes")
    assert_that(rejected | beam.Map(lambda r: (r.asset_id, r.stage, r.reason)),
                equal_to([("badbadbadbadbad0", "encode", RejectReason.NOT_AN_IMAGE)]), label="rejects")
    result = p.run()
    result.wait_until_finish()
    counters = {c.key.metric.name: c.committed for c in result.metrics().query(MetricsFilter().with_namespace("encode"))["counters"]}
    assert counters == {"in": 11, "kept": 10, "rejected/NOT_AN_IMAGE": 1}


def test_encode_config_is_validated(tmp_path):
    with pytest.raises(FileNotFoundError):
        EncodeImages(EncodeConfig(model_path=str(tmp_path / "missing.safetensors")))
    with pytest.raises(ValueError):
        EncodeConfig(model_path="")
    with pytest.raises(ValueError):
        EncodeConfig(model_path="m", batch_size=0)
    with pytest.raises(ValueError):
        EncodeConfig(model_path="m", device="tpu")


@pytest.mark.slow
def test_encode_curated_store_writes_sorted_deterministic_parquet(tmp_path, model_path, photos):
    curated = tmp_path / "curated"
    write_store(photos, str(curated), per_shard=4)
    res1 = encode_curated_store(str(curated), model_path, str(tmp_path / "out1"), batch_size=3)
    res2 = encode_curated_store(str(curated), model_path, str(tmp_path / "out2"), batch_size=5, num_shards=3)
    assert res1["counters"]["in"] == res1["counters"]["kept"] == len(photos) and res1["rejected"] == 0
    expected = _expected(model_path, photos)
    asset_of = {k: m["asset_id"] for k, _, m in photos}
    rows = []
    for f in res1["files"]:
        assert Path(f).name.startswith("codes-") and f.endswith(".parquet")
        t = pq.read_table(f)
        assert t.schema.field("codes").type.value_type.bit_width == 16
        keys = t.column("key").to_pylist()
        assert keys == sorted(keys)
        rows += t.to_pylist()
    assert sorted(r["key"] for r in rows) == sorted(expected)
    for r in rows:
        assert r["asset_id"] == asset_of[r["key"]] and (r["h"], r["w"]) == (64, 64)
        assert np.array_equal(np.array(r["codes"]).reshape(r["h"], r["w"]), expected[r["key"]])
    # the Beam-free reader gives the same codes back, ready for decode_codes
    read = {k: (a, c) for k, a, c in iter_code_rows(res1["files"])}
    assert set(read) == set(expected) and all(np.array_equal(c, expected[k]) for k, (_, c) in read.items())
    some = next(iter(read.values()))[1][None]
    assert load_vq(model_path).decode_codes(some).shape == (1, 256, 256, 3)
    # same config, other batch size: byte-identical files
    res3 = encode_curated_store(str(curated), model_path, str(tmp_path / "out3"), batch_size=5)
    assert [Path(f).read_bytes() for f in res1["files"]] == [Path(f).read_bytes() for f in res3["files"]]
    assert len(res2["files"]) <= 3
