"""Dedup stages under Beam: kept records, reject reasons, dup_of / cluster_id, counters,
incremental dedup against a previous run, and the semantic stage on synthetic vectors."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Callable

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that
from PIL import Image, ImageDraw, ImageFont

from manifests.schema import ManifestEntry
from pipeline import dedup_hash
from pipeline.config import DecodeConfig, DedupConfig
from pipeline.records import Asset, Rejected, RejectReason
from pipeline.stages.decode import decode_image
from pipeline.stages.dedup import (
    Dedup,
    DedupExact,
    DedupNearDuplicates,
    DedupSemantic,
    load_previous_hashes,
    representative_rank,
)

ROOT = Path(__file__).resolve().parents[2]
COCO = sorted((ROOT / "manifests" / "demo" / "images").glob("*.jpg"))


# --------------------------------------------------------------------------- corpus


def _encode(img: Image.Image, fmt: str = "JPEG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def make_asset(asset_id: str, data: bytes, license_id: str = "CC-BY-4.0", row: int = 0, decodable: bool = True) -> Asset:
    """An asset as it leaves ingest: decoded and normalised by the real decode stage, which
    drops the source bytes (so the near stage hashes the normalised image)."""
    entry = ManifestEntry(asset_id=asset_id, uri=f"{asset_id}.jpg", captions=("a photo",), license_id=license_id)
    fields: dict = dict(sha256=hashlib.sha256(data).hexdigest(), source_size=len(data))
    if decodable:
        decoded = decode_image(data, DecodeConfig())
        fields.update(
            source_format=decoded.format,
            source_width=decoded.width,
            source_height=decoded.height,
            image=decoded.jpeg,
            pixel_sha256=decoded.pixel_sha256,
        )
    else:
        fields.update(image=data)
    return Asset(entry=entry, manifest_uri="mem://delivery.jsonl", manifest_row=row, **fields)


def _photo(k: int) -> Image.Image:
    with Image.open(COCO[k * 11]) as im:
        return im.convert("RGB")


def _small_copy(img: Image.Image) -> bytes:
    """Half size, heavy JPEG recompression."""
    return _encode(img.resize((img.width // 2, img.height // 2), Image.LANCZOS), quality=30)


def _watermark(img: Image.Image) -> Image.Image:
    base = img.convert("RGBA")
    layer = Image.new("RGBA", base.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    size = max(12, base.size[0] // 12)
    for y in range(0, base.size[1], size * 3):
        draw.text((size // 2, y), "(c) STOCKPHOTO", font=ImageFont.load_default(size=size), fill=(255, 255, 255, 110))
    return Image.alpha_composite(base, layer).convert("RGB")


@pytest.fixture(scope="module")
def corpus() -> dict[str, Asset]:
    """Six distinct real photos and the copies a stock delivery makes of them."""
    photos = {f"a{k}": _photo(k) for k in range(1, 7)}
    data = {name: COCO[int(name[1:]) * 11].read_bytes() for name in photos}
    items = {name: make_asset(name, data[name], row=i) for i, name in enumerate(photos)}
    p = photos
    extra = {
        # same bytes, other license, larger id: exact duplicate of a1
        "z-copy-a1": make_asset("z-copy-a1", data["a1"], license_id="LicenseRef-vendor-b", row=10),
        # lossless PNG of the decoded a2: other bytes, same pixels
        "png-a2": make_asset("png-a2", _encode(p["a2"], "PNG"), row=11),
        # half size, heavy recompression: near duplicate of a3 (a3 has the larger resolution)
        "small-a3": make_asset("small-a3", _small_copy(p["a3"]), row=12),
        # watermarked, same size: near duplicate of a4, which wins on asset_id
        "wm-a4": make_asset("wm-a4", _encode(_watermark(p["a4"]), quality=85), row=13),
        # mirrored: pHash does not catch flips (documented), so it stays
        "flip-a5": make_asset("flip-a5", _encode(p["a5"].transpose(Image.FLIP_LEFT_RIGHT), quality=90), row=14),
    }
    items.update(extra)
    return items


def _bad_asset() -> Asset:
    return make_asset("bad", b"not an image at all", row=99, decodable=False)


# --------------------------------------------------------------------------- harness


def _run(build: Callable[[beam.Pipeline], tuple[beam.PCollection, beam.PCollection]], checks) -> dict[str, int]:
    """Build, attach `assert_that` checks on (kept, rejected), run; return counters by name."""
    p = TestPipeline()
    kept, rejected = build(p)
    check_kept, check_rejected = checks
    assert_that(kept, check_kept, label="CheckKept")
    assert_that(rejected, check_rejected, label="CheckRejected")
    result = p.run()
    result.wait_until_finish()
    counters: dict[str, int] = {}
    for c in result.metrics().query(MetricsFilter())["counters"]:
        name = f"{c.key.metric.namespace}/{c.key.metric.name}"
        counters[name] = counters.get(name, 0) + c.committed
    return counters


def _ids(expected: set[str]):
    def check(actual: list[Asset]) -> None:
        got = sorted(a.asset_id for a in actual)
        assert got == sorted(expected), got

    return check


def _rejections(expected: dict[str, tuple[RejectReason, str | None]], detail_has: dict[str, str] | None = None):
    """asset_id -> (reason, dup_of); every rejection also names its cluster."""

    def check(actual: list[Rejected]) -> None:
        got = {r.asset_id: (r.reason, r.dup_of) for r in actual}
        assert got == expected, got
        for r in actual:
            if r.reason is not RejectReason.ERROR:
                assert r.cluster_id and r.dup_of, r
            for aid, text in (detail_has or {}).items():
                if r.asset_id == aid:
                    assert text in r.detail, r.detail

    return check


# --------------------------------------------------------------------------- tests


def test_config_is_validated() -> None:
    with pytest.raises(ValueError):
        DedupConfig(hamming_radius=-1)
    with pytest.raises(ValueError):
        DedupConfig(hash_kind="ahash")
    with pytest.raises(ValueError):
        DedupConfig(bucket_cap=1)
    with pytest.raises(ValueError):
        DedupConfig(semantic_threshold=1.5)
    for engine in ("gpu", "numpy"):  # numpy: the engine removed in issue 13
        with pytest.raises(ValueError, match="engine"):
            DedupConfig(engine=engine)
    with pytest.raises(ValueError, match="threads"):
        DedupConfig(threads=0)
    with pytest.raises(ValueError):
        DedupConfig(license_preference="CC0-1.0")
    with pytest.raises(TypeError):
        DedupExact({"exact": True})
    assert DedupConfig(license_preference=["CC0-1.0"]).license_preference == ("CC0-1.0",)


def test_representative_rank_rule(corpus) -> None:
    """Larger resolution, then license preference, then smallest asset_id."""
    prefs = ("LicenseRef-vendor-b", "CC-BY-4.0")
    a1, copy = corpus["a1"], corpus["z-copy-a1"]
    assert min([a1, copy], key=lambda a: representative_rank(a)) is a1  # id breaks the tie
    assert min([a1, copy], key=lambda a: representative_rank(a, prefs)) is copy  # license first
    small, big = corpus["small-a3"], corpus["a3"]
    assert min([small, big], key=lambda a: representative_rank(a, prefs)) is big  # resolution first


def test_exact_stage(corpus) -> None:
    assets = list(corpus.values())
    cfg = DedupConfig()
    counters = _run(
        lambda p: p | beam.Create(assets) | DedupExact(cfg),
        (
            _ids(set(corpus) - {"z-copy-a1", "png-a2"}),
            _rejections(
                {
                    "z-copy-a1": (RejectReason.EXACT_DUPLICATE, "a1"),
                    "png-a2": (RejectReason.EXACT_DUPLICATE, "a2"),
                },
                {"z-copy-a1": "same source bytes", "png-a2": "same decoded pixels"},
            ),
        ),
    )
    assert counters["dedup_exact/in"] == len(assets)
    assert counters["dedup_exact/kept"] == len(assets) - 2
    assert counters["dedup_exact/rejected/EXACT_DUPLICATE"] == 2


def test_exact_stage_license_preference_and_no_pixel_pass(corpus) -> None:
    """With the vendor license preferred, the copy is kept; without the pixel pass the PNG stays."""
    assets = [corpus["a1"], corpus["z-copy-a1"], corpus["a2"], corpus["png-a2"]]
    cfg = DedupConfig(pixel_exact=False, license_preference=("LicenseRef-vendor-b",))
    _run(
        lambda p: p | beam.Create(assets) | DedupExact(cfg),
        (
            _ids({"z-copy-a1", "a2", "png-a2"}),
            _rejections({"a1": (RejectReason.EXACT_DUPLICATE, "z-copy-a1")}),
        ),
    )


def test_near_stage_on_real_photos(corpus) -> None:
    assets = [a for k, a in corpus.items() if k not in ("z-copy-a1", "png-a2")] + [_bad_asset()]
    cfg = DedupConfig(threads=2)

    def kept_check(actual: list[Asset]) -> None:
        _ids({"a1", "a2", "a3", "a4", "a5", "a6", "flip-a5"})(actual)
        by_id = {a.asset_id: a for a in actual}
        assert all(a.phash and len(a.phash) == 16 for a in actual)
        assert by_id["a3"].cluster_id == "a3" and by_id["a4"].cluster_id == "a4"
        assert by_id["a1"].cluster_id is None  # singleton

    counters = _run(
        lambda p: p | beam.Create(assets) | DedupNearDuplicates(cfg),
        (
            kept_check,
            _rejections(
                {
                    "small-a3": (RejectReason.NEAR_DUPLICATE, "a3"),
                    "wm-a4": (RejectReason.NEAR_DUPLICATE, "a4"),
                    "bad": (RejectReason.ERROR, None),
                },
                {"small-a3": "Hamming distance", "wm-a4": "radius 8"},
            ),
        ),
    )
    assert counters["dedup_near/in"] == len(assets)
    assert counters["dedup_near/kept"] == 7
    assert counters["dedup_near/rejected/NEAR_DUPLICATE"] == 2
    assert counters["dedup_near/rejected/ERROR"] == 1


def _write_previous(path: Path, rows: list[dict]) -> None:
    path.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path / "metadata-000000.parquet")


def test_incremental_against_previous_run(tmp_path, corpus) -> None:
    """A new delivery re-sends a curated asset (same bytes, new id and license) and a
    recompressed copy of another: both rejected with dup_of = the previous asset."""
    a1, a3 = corpus["a1"], corpus["a3"]
    phash_a3 = dedup_hash.hash_to_hex(dedup_hash.image_hash_from_bytes(a3.image))
    _write_previous(
        tmp_path / "curated",
        [
            {"asset_id": "prev-a1", "sha256": a1.sha256, "phash": dedup_hash.hash_to_hex(dedup_hash.image_hash_from_bytes(a1.image))},
            {"asset_id": "prev-a3", "sha256": "0" * 64, "phash": phash_a3},
        ],
    )
    url = str(tmp_path / "curated" / "metadata-*.parquet")
    assert [p.asset_id for p in load_previous_hashes(url)] == ["prev-a1", "prev-a3"]
    delivery = [
        make_asset("new-1", COCO[11].read_bytes(), license_id="LicenseRef-other", row=0),
        make_asset("new-3", _small_copy(_photo(3)), row=1),
        corpus["a6"],
        corpus["a2"],
        corpus["png-a2"],
    ]
    cfg = DedupConfig(previous_run=url)
    counters = _run(
        lambda p: p | beam.Create(delivery) | Dedup(cfg),
        (
            _ids({"a6", "a2"}),
            _rejections(
                {
                    "new-1": (RejectReason.EXACT_DUPLICATE, "prev-a1"),
                    "new-3": (RejectReason.NEAR_DUPLICATE, "prev-a3"),
                    "png-a2": (RejectReason.EXACT_DUPLICATE, "a2"),
                },
                {"new-1": "previous run", "new-3": "previous-run asset"},
            ),
        ),
    )
    assert counters["dedup_exact/in"] == 5 and counters["dedup_exact/kept"] == 3
    assert counters["dedup_near/in"] == 3 and counters["dedup_near/kept"] == 2
    assert counters["dedup_near/rejected/NEAR_DUPLICATE"] == 1


def test_full_dedup_accounts_for_every_row(corpus) -> None:
    """rows in == kept + rejected, each row once; exact runs before near."""
    assets = list(corpus.values()) + [_bad_asset()]
    expected_kept = {"a1", "a2", "a3", "a4", "a5", "a6", "flip-a5"}

    def rejected_check(actual: list[Rejected]) -> None:
        ids = [r.asset_id for r in actual]
        assert len(ids) == len(set(ids)) == len(assets) - len(expected_kept)
        assert {r.stage for r in actual} == {"dedup_exact", "dedup_near"}

    _run(lambda p: p | beam.Create(assets) | Dedup(DedupConfig()), (_ids(expected_kept), rejected_check))


def test_semantic_stage_synthetic_embeddings(corpus) -> None:
    """SemDeDup bookkeeping with plain vectors: a1 ~ flip-a5 (cos ~0.999) merge; a2 and a3
    (cos 0.8) do not; an asset without an embedding passes through."""
    rng = np.random.default_rng(0)
    base = rng.normal(size=(4, 32)).astype(np.float32)
    e = {
        "a1": base[0],
        "flip-a5": base[0] + 0.01 * rng.normal(size=32).astype(np.float32),
        "a2": base[1],
        "a3": (0.8 * base[1] / np.linalg.norm(base[1]) + 0.6 * base[2] / np.linalg.norm(base[2])).astype(np.float32),
    }
    assets = [corpus[k] for k in ("a1", "flip-a5", "a2", "a3", "a4")]
    cfg = DedupConfig(semantic=True, semantic_threshold=0.95)

    def build(p):
        emb = p | "Emb" >> beam.Create(list(e.items()))
        return p | "Assets" >> beam.Create(assets) | DedupSemantic(cfg, emb)

    counters = _run(
        build,
        (
            _ids({"a1", "a2", "a3", "a4"}),
            _rejections({"flip-a5": (RejectReason.SEMANTIC_DUPLICATE, "a1")}, {"flip-a5": "cosine similarity 0.99"}),
        ),
    )
    assert counters["dedup_semantic/in"] == 5
    assert counters["dedup_semantic/kept"] == 4
    assert counters["dedup_semantic/rejected/SEMANTIC_DUPLICATE"] == 1


def test_near_stage_trusts_an_upstream_full_frame_phash(corpus) -> None:
    """hash_input="auto": a pHash set upstream (decode, from the full frame) is used as is;
    hash_input="image" recomputes it from the normalised image."""
    a1, a2 = corpus["a1"], corpus["a2"]
    same = dedup_hash.hash_to_hex(dedup_hash.image_hash_from_bytes(a1.image))
    size = dict(source_width=a1.source_width, source_height=a1.source_height)  # tie: a1 wins on id
    assets = [a1.replace(phash=same), a2.replace(phash=same, **size)]
    _run(
        lambda p: p | beam.Create(assets) | DedupNearDuplicates(DedupConfig()),
        (_ids({"a1"}), _rejections({"a2": (RejectReason.NEAR_DUPLICATE, "a1")}, {"a2": "distance 0"})),
    )
    _run(
        lambda p: p | beam.Create(assets) | DedupNearDuplicates(DedupConfig(hash_input="image")),
        (_ids({"a1", "a2"}), _rejections({})),
    )
