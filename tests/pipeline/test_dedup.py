"""Dedup: the Beam-free rules (pipeline/dedup_rules.py) on real photos and the copies a stock
delivery makes of them, the per-row hash step, semantic dedup under Beam, and exact and near
dedup through a real run, against a previous run too."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that
from PIL import Image

from manifests.copies import watermark
from manifests.schema import ManifestEntry
from pipeline import dedup_hash, dedup_rules, ledger
from pipeline.config import DecodeConfig, DedupConfig, RunConfig, from_dict
from pipeline.records import Asset, Rejected, RejectReason
from pipeline.stages.base import REJECTED
from pipeline.stages.decode import decode_image
from pipeline.stages.dedup import DedupSemantic, HashImage

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "manifests" / "demo"
COCO = sorted((DEMO / "images").glob("*.jpg"))


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
        "wm-a4": make_asset("wm-a4", _encode(watermark(p["a4"]), quality=85), row=13),
        # mirrored: caught through the mirror hash (dedup.mirror), not by pHash alone
        "flip-a5": make_asset("flip-a5", _encode(p["a5"].transpose(Image.FLIP_LEFT_RIGHT), quality=90), row=14),
    }
    items.update(extra)
    return items


def _bad_asset() -> Asset:
    return make_asset("bad", b"not an image at all", row=99, decodable=False)


def _member(a: Asset, prefs: tuple[str, ...] = ()) -> dedup_rules.Member:
    return dedup_rules.Member(a.asset_id, a.sha256, a.pixel_sha256, dedup_rules.representative_rank(a, prefs))


def _exact(assets: list[Asset], cfg: DedupConfig, previous: dict[str, str] | None = None) -> dict[str, dedup_rules.Decision]:
    """The exact rule over a delivery, as the prepare step applies it: group, then decide."""
    groups: dict[str, list[Asset]] = {}
    for a in assets:
        groups.setdefault(dedup_rules.exact_key(a.sha256, a.pixel_sha256, a.asset_id, cfg.pixel_exact), []).append(a)
    return {d.asset_id: d for members in groups.values()
            for d in dedup_rules.exact_decisions([_member(a, cfg.license_preference) for a in members],
                                                 previous or {}, cfg.pixel_exact)}


def _phash(a: Asset) -> int:
    return dedup_hash.image_hash_from_bytes(a.image)


def _near(assets: list[Asset], cfg: DedupConfig, previous=()) -> dict[str, dedup_rules.Decision]:
    """The near rule as Decide applies it: each asset's hash and, with `mirror`, its mirror hash."""
    hashes = {a.asset_id: dedup_hash.image_hashes_from_bytes(a.image) for a in assets}
    rows = [dedup_rules.Row(a.asset_id, hashes[a.asset_id][0], dedup_rules.representative_rank(a, cfg.license_preference),
                            hashes[a.asset_id][1] if cfg.mirror else None) for a in assets]
    return {d.asset_id: d for d in dedup_rules.near_decisions(rows, list(previous), cfg.hamming_radius,
                                                              cfg.bucket_cap, cfg.engine, cfg.threads)}


def _dups(decisions: dict[str, dedup_rules.Decision]) -> dict[str, str]:
    return {aid: d.dup_of for aid, d in decisions.items() if d.dup_of is not None}


# --------------------------------------------------------------------------- the rules


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
    with pytest.raises(ValueError, match="mirror"):
        DedupConfig(mirror="yes")
    assert DedupConfig().mirror  # flip-invariant near dedup is on by default (measured: docs/dedup.md)
    with pytest.raises(ValueError):
        DedupConfig(license_preference="CC0-1.0")
    with pytest.raises(TypeError):
        DedupSemantic({"semantic": True}, None)
    assert DedupConfig(license_preference=["CC0-1.0"]).license_preference == ("CC0-1.0",)


def test_representative_rank_rule(corpus) -> None:
    """Larger resolution, then license preference, then smallest asset_id."""
    prefs = ("LicenseRef-vendor-b", "CC-BY-4.0")
    rank = dedup_rules.representative_rank
    a1, copy = corpus["a1"], corpus["z-copy-a1"]
    assert min([a1, copy], key=lambda a: rank(a)) is a1  # id breaks the tie
    assert min([a1, copy], key=lambda a: rank(a, prefs)) is copy  # license first
    small, big = corpus["small-a3"], corpus["a3"]
    assert min([small, big], key=lambda a: rank(a, prefs)) is big  # resolution first


def test_exact_rule(corpus) -> None:
    decisions = _exact(list(corpus.values()), DedupConfig())
    assert _dups(decisions) == {"z-copy-a1": "a1", "png-a2": "a2"}
    assert "same source bytes" in decisions["z-copy-a1"].detail
    assert "same decoded pixels" in decisions["png-a2"].detail
    assert decisions["a1"].cluster_id == "a1" == decisions["z-copy-a1"].cluster_id  # the group is named
    assert decisions["a3"].cluster_id is None  # a singleton is not a group


def test_exact_rule_license_preference_and_no_pixel_pass(corpus) -> None:
    """With the vendor license preferred, the copy is kept; without the pixel pass the PNG stays."""
    assets = [corpus["a1"], corpus["z-copy-a1"], corpus["a2"], corpus["png-a2"]]
    cfg = DedupConfig(pixel_exact=False, license_preference=("LicenseRef-vendor-b",))
    assert _dups(_exact(assets, cfg)) == {"a1": "z-copy-a1"}


def test_near_rule_on_real_photos(corpus) -> None:
    assets = [a for k, a in corpus.items() if k not in ("z-copy-a1", "png-a2")]
    decisions = _near(assets, DedupConfig(threads=2))
    assert _dups(decisions) == {"small-a3": "a3", "wm-a4": "a4", "flip-a5": "a5"}
    assert decisions["a3"].cluster_id == "a3" and decisions["a4"].cluster_id == "a4"
    assert decisions["a5"].cluster_id == decisions["flip-a5"].cluster_id == "a5"
    assert "a1" not in decisions  # a singleton gets no decision
    assert "Hamming distance" in decisions["small-a3"].detail and "radius 8" in decisions["wm-a4"].detail
    assert "mirrored" in decisions["flip-a5"].detail and "mirrored" not in decisions["small-a3"].detail
    # without the mirror hash, pHash alone misses the flip (distance ~32: an unrelated picture)
    assert _dups(_near(assets, DedupConfig(threads=2, mirror=False))) == {"small-a3": "a3", "wm-a4": "a4"}


def test_near_rule_mirror_rows_keep_the_bookkeeping() -> None:
    """Mirror hashes are extra rows of the same asset: an asset that matches only its own
    mirror (a symmetric picture) is no duplicate; a flipped copy joins its original's cluster
    with the mirrored distance; previous-run assets (hash only) match a new mirror."""
    rank = lambda aid: (0, 0, aid)  # noqa: E731
    h, m = 0x0F0F_0F0F_0F0F_0F0F, 0xF0F0_F0F0_F0F0_F0F0
    sym = dedup_rules.Row("sym", h, rank("sym"), h ^ 0b111)  # within the radius of its own mirror
    alone = dedup_rules.Row("alone", m ^ 0xFFFF, rank("alone"), m ^ 0xFFFF_0000)
    assert list(dedup_rules.near_decisions([sym, alone], [], 8, 256)) == []
    orig = dedup_rules.Row("b-orig", h, (-10, 0, "b-orig"), m)
    flip = dedup_rules.Row("a-flip", m ^ 0b1, (0, 0, "a-flip"), h ^ 0b11)  # the mirror image of b-orig
    got = {d.asset_id: d for d in dedup_rules.near_decisions([flip, orig], [], 8, 256)}
    assert got["a-flip"].dup_of == "b-orig" and got["b-orig"].dup_of is None and got["b-orig"].cluster_id == "b-orig"
    assert got["a-flip"].detail.startswith("pHash Hamming distance 1 to the cluster representative b-orig mirrored")
    prev = [dedup_rules.PreviousAsset("prev", None, None, dedup_hash.hash_to_hex(h))]
    got = {d.asset_id: d for d in dedup_rules.near_decisions([flip], prev, 8, 256)}
    assert got == {"a-flip": dedup_rules.Decision("a-flip", "prev", "prev", got["a-flip"].detail)}
    assert "previous-run asset prev mirrored" in got["a-flip"].detail


def _write_previous(path: Path, rows: list[dict]) -> None:
    path.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path / "metadata-000000.parquet")


def test_rules_against_a_previous_run(tmp_path, corpus) -> None:
    """A new delivery re-sends a curated asset (same bytes, new id and license) and a
    recompressed copy of another: both are duplicates of the previous asset, which is never
    judged again."""
    a1, a3 = corpus["a1"], corpus["a3"]
    _write_previous(tmp_path / "curated", [
        {"asset_id": "prev-a1", "sha256": a1.sha256, "phash": dedup_hash.hash_to_hex(_phash(a1))},
        {"asset_id": "prev-a3", "sha256": "0" * 64, "phash": dedup_hash.hash_to_hex(_phash(a3))},
    ])
    previous = dedup_rules.load_previous_hashes(str(tmp_path / "curated" / "metadata-*.parquet"))
    assert [p.asset_id for p in previous] == ["prev-a1", "prev-a3"]
    new1 = make_asset("new-1", COCO[11].read_bytes(), license_id="LicenseRef-other", row=0)
    new3 = make_asset("new-3", _small_copy(_photo(3)), row=1)
    cfg = DedupConfig()
    exact = _exact([new1, corpus["a6"], corpus["a2"], corpus["png-a2"]], cfg, dedup_rules.previous_exact_keys(previous))
    assert _dups(exact) == {"new-1": "prev-a1", "png-a2": "a2"}
    assert "previous run" in exact["new-1"].detail
    near = _near([new3, corpus["a6"], corpus["a2"]], cfg, previous)
    assert _dups(near) == {"new-3": "prev-a3"} and "previous-run asset" in near["new-3"].detail
    assert "prev-a3" not in near


# --------------------------------------------------------------------------- the hash step


def _hash_step(asset: Asset, cfg: DedupConfig) -> tuple[Asset | None, Rejected | None]:
    step = HashImage(cfg)
    step.setup()
    out = list(step.process(asset))[0]  # under Beam: the asset, or its rejection on the tagged output
    return (None, out.value) if isinstance(out, beam.pvalue.TaggedOutput) and out.tag == REJECTED else (out, None)


def test_hash_step_trusts_an_upstream_full_frame_phash_and_rejects_what_it_cannot_hash(corpus) -> None:
    """hash_input="auto": a pHash set upstream (decode, from the full frame) is used as is;
    "image" recomputes it from the normalised image; an undecodable image is an ERROR row."""
    a1 = corpus["a1"]
    upstream = "0123456789abcdef"
    assert _hash_step(a1.replace(phash=upstream), DedupConfig())[0].phash == upstream
    recomputed = _hash_step(a1.replace(phash=upstream), DedupConfig(hash_input="image"))[0]
    assert recomputed.phash == dedup_hash.hash_to_hex(_phash(a1)) != upstream
    mirrored = Image.open(io.BytesIO(a1.image)).transpose(Image.FLIP_LEFT_RIGHT)
    assert recomputed.phash_mirror == dedup_hash.hash_to_hex(dedup_hash.image_hash(mirrored))  # the mirrored frame's
    assert _hash_step(a1, DedupConfig(hash_input="image", mirror=False))[0].phash_mirror is None
    kept, rejected = _hash_step(_bad_asset(), DedupConfig())
    assert kept is None and rejected.reason is RejectReason.ERROR and rejected.stage == "dedup_near"


# --------------------------------------------------------------------------- semantic, under Beam


def _check_and_run(p: TestPipeline, **checks) -> dict[str, int]:
    """Attach `assert_that(pcoll, check)` for each label=(pcoll, check), run, return the counters."""
    for label, (pcoll, check) in checks.items():
        assert_that(pcoll, check, label=label)
    result = p.run()
    result.wait_until_finish()
    return {f"{c.key.metric.namespace}/{c.key.metric.name}": c.committed
            for c in result.metrics().query(MetricsFilter())["counters"]}


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

    def check_kept(actual: list[Asset]) -> None:
        assert sorted(a.asset_id for a in actual) == ["a1", "a2", "a3", "a4"]
        assert {a.asset_id: a.cluster_id for a in actual}["a1"] == "a1"

    def check_rejected(actual: list[Rejected]) -> None:
        assert [(r.asset_id, r.reason, r.dup_of, r.cluster_id) for r in actual] == [
            ("flip-a5", RejectReason.SEMANTIC_DUPLICATE, "a1", "a1")]
        assert "cosine similarity 0.99" in actual[0].detail

    p = TestPipeline()
    emb = p | "Emb" >> beam.Create(list(e.items()))
    kept, rejected = p | "Assets" >> beam.Create(assets) | DedupSemantic(cfg, emb)
    counters = _check_and_run(p, check_kept=(kept, check_kept), check_rejected=(rejected, check_rejected))
    assert counters["dedup_semantic/in"] == 5
    assert counters["dedup_semantic/kept"] == 4
    assert counters["dedup_semantic/rejected/SEMANTIC_DUPLICATE"] == 1


# --------------------------------------------------------------------------- through a real run


def _delivery(folder: Path, files: dict[str, bytes]) -> Path:
    """A manifest of `files` (asset_id -> image bytes), licensed under the demo policy."""
    (folder / "images").mkdir(parents=True)
    rows = []
    for aid, data in files.items():
        (folder / "images" / f"{aid}.img").write_bytes(data)
        rows.append({"asset_id": aid, "uri": f"images/{aid}.img", "captions": [f"a photograph, number {aid}"],
                     "license_id": "CC-BY-2.0", "licensor": "a photographer",
                     "allowed_uses": ["ml-training"], "sha256": hashlib.sha256(data).hexdigest()})
    manifest = folder / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return manifest


def test_exact_and_near_dedup_in_a_run_and_against_the_previous_run(tmp_path) -> None:
    """Run 1 curates six photos; run 2 (dedup.previous_run = run 1's store) gets a re-sent copy
    of one under a new id, a recompressed copy of another, a new photo with its PNG and a
    watermarked copy, a mirrored copy of a previous photo and one of a new photo. The ledger
    says which were kept and why not."""
    from pipeline.run import run

    photos = {f"p{k}": COCO[k * 11].read_bytes() for k in range(1, 7)}
    flags = ["--direct_running_mode=in_memory", "--direct_num_workers=1"]

    def config(manifest: Path, out: Path, **dedup) -> RunConfig:
        return from_dict(RunConfig, {"manifests": [str(manifest)], "policy": str(DEMO / "policy.yaml"),
                                     "out": str(out), "align": {"enabled": False}, "dedup": dedup})

    first = tmp_path / "run1"
    run(config(_delivery(tmp_path / "d1", photos), first), until="curated", beam_flags=flags)
    assert {r["asset_id"] for r in ledger.read_ledger(str(first)).to_pylist() if r["status"] == "kept"} == set(photos)
    b7, b8 = _photo(7), _photo(8)
    second = {
        "again-p1": photos["p1"],  # the same bytes under a new id
        "small-p3": _small_copy(_photo(3)),  # recompressed, half size
        "b7": COCO[77].read_bytes(), "png-b7": _encode(b7, "PNG"),  # the same pixels, other bytes
        "b8": COCO[88].read_bytes(), "wm-b8": _encode(watermark(b8), quality=85),
        "flip-p5": _encode(_photo(5).transpose(Image.FLIP_LEFT_RIGHT), quality=90),  # vs the previous run
        "flip-b8": _encode(b8.transpose(Image.FLIP_LEFT_RIGHT), quality=90),  # vs this delivery
    }
    out = tmp_path / "run2"
    report = run(config(_delivery(tmp_path / "d2", second), out, previous_run=str(first / "curated")),
                 until="curated", beam_flags=flags)
    rows = {r["asset_id"]: r for r in ledger.read_ledger(str(out)).to_pylist()}
    assert {a for a, r in rows.items() if r["status"] == "kept"} == {"b7", "b8"}
    assert {a: (r["stage"], r["reason"], r["dup_of"]) for a, r in rows.items() if r["status"] != "kept"} == {
        "again-p1": ("dedup_exact", "EXACT_DUPLICATE", "p1"),
        "png-b7": ("dedup_exact", "EXACT_DUPLICATE", "b7"),
        "small-p3": ("dedup_near", "NEAR_DUPLICATE", "p3"),
        "wm-b8": ("dedup_near", "NEAR_DUPLICATE", "b8"),
        "flip-p5": ("dedup_near", "NEAR_DUPLICATE", "p5"),  # the previous store has no mirror hash: ours matched
        "flip-b8": ("dedup_near", "NEAR_DUPLICATE", "b8"),
    }
    assert "previous run" in rows["again-p1"]["detail"] and "previous-run asset" in rows["small-p3"]["detail"]
    assert "previous-run asset p5 mirrored" in rows["flip-p5"]["detail"]
    assert "representative b8 mirrored" in rows["flip-b8"]["detail"] and "mirrored" not in rows["wm-b8"]["detail"]
    assert rows["b7"]["cluster_id"] == "b7" and rows["b8"]["cluster_id"] == "b8"
    counters = report.counters
    assert counters["dedup_exact/in"] == 8 and counters["dedup_exact/rejected/EXACT_DUPLICATE"] == 2
    assert counters["dedup_near/in"] == 6 and counters["dedup_near/rejected/NEAR_DUPLICATE"] == 4

    # mirror off: both flipped copies are kept (pHash alone is not flip invariant)
    off = tmp_path / "run3"
    run(config(_delivery(tmp_path / "d3", second), off, previous_run=str(first / "curated"), mirror=False),
        until="curated", beam_flags=flags)
    kept = {r["asset_id"] for r in ledger.read_ledger(str(off)).to_pylist() if r["status"] == "kept"}
    assert kept == {"b7", "b8", "flip-p5", "flip-b8"}


# --------------------------------------------------------------------------- after alignment


def test_regroup_keeps_a_member_that_passed_unless_every_member_failed() -> None:
    def m(aid, passed, standby, area=100):
        return dedup_rules.GroupMember(aid, passed, dedup_rules.rank_key(area, None, aid), standby)

    rep_passes = [m("rep", True, False), m("b", True, True), m("c", False, True)]
    assert dedup_rules.regroup(rep_passes) == "rep"
    rep_fails = [m("rep", False, False), m("small", True, True, area=10), m("big", True, True, area=50),
                 m("bad", False, True)]
    assert dedup_rules.regroup(rep_fails) == "big"  # the representative rule among those that passed
    assert dedup_rules.regroup([m("rep", False, False), m("b", False, True)]) is None  # every member failed
    assert dedup_rules.regroup([m("b", True, True)]) is None  # the representative was taken down


def test_regroup_stage_rewrites_only_the_groups_whose_representative_failed(corpus) -> None:
    """Under Beam: a3's group (a3 failed, small-a3 passed, a5 failed) keeps small-a3, and the
    ledger rows of small-a3 and a5 (now a duplicate of small-a3) are replaced; in a4's group (a4
    passed) wm-a4 stays a duplicate of a4, its row now with its score; a1's group (both failed) is
    lost, each member for its own alignment; a singleton passes through."""
    from pipeline.stages.dedup import RegroupAfterAlignment

    def member(key, group):
        return corpus[key].replace(cluster_id=group)

    passed = [member("small-a3", "a3"), member("a4", "a4"), member("wm-a4", "a4"), corpus["a6"]]
    failed = [member(k, g).reject("align", RejectReason.LOW_ALIGNMENT, "clip_score low")
              for k, g in (("a3", "a3"), ("a5", "a3"), ("a1", "a1"), ("z-copy-a1", "a1"))]
    standby = {"small-a3": ("dedup_near", "NEAR_DUPLICATE", "pHash Hamming distance 4 to a3"),
               "a5": ("dedup_near", "NEAR_DUPLICATE", "pHash Hamming distance 6 to a3"),
               "wm-a4": ("dedup_near", "NEAR_DUPLICATE", "pHash Hamming distance 3 to a4"),
               "z-copy-a1": ("dedup_exact", "EXACT_DUPLICATE", "same source bytes (sha256) as a1")}

    def check_kept(actual: list[Asset]) -> None:
        assert sorted((a.asset_id, a.cluster_id) for a in actual) == [("a4", "a4"), ("a6", None), ("small-a3", "a3")]

    def check_rejected(actual: list[Rejected]) -> None:
        got = sorted((r.asset_id, r.stage, r.reason.value, r.dup_of) for r in actual)
        assert got == [("a1", "align", "LOW_ALIGNMENT", None), ("a3", "align", "LOW_ALIGNMENT", None),
                       ("a5", "dedup_near", "NEAR_DUPLICATE", "small-a3"),  # points at the member kept instead
                       ("wm-a4", "dedup_near", "NEAR_DUPLICATE", "a4"),  # its row again, with its score
                       ("z-copy-a1", "align", "LOW_ALIGNMENT", None)]
        detail = {r.asset_id: r.detail for r in actual}
        assert "kept instead: small-a3" in detail["a5"] and detail["wm-a4"] == "pHash Hamming distance 3 to a4"

    def check_replaced(actual: list[str]) -> None:
        assert sorted(actual) == ["a5", "small-a3", "wm-a4", "z-copy-a1"]  # every duplicate scored

    p = TestPipeline()
    kept, rejected, replaced = ((p | "Passed" >> beam.Create(passed), p | "Failed" >> beam.Create(failed))
                                | RegroupAfterAlignment(standby))
    counters = _check_and_run(p, check_kept=(kept, check_kept), check_rejected=(rejected, check_rejected),
                              check_replaced=(replaced, check_replaced))
    assert counters["align/groups_kept_by_another_member"] == 1
    assert counters["align/groups_lost_every_member_failed"] == 1
