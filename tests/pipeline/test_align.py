"""ScoreAlignment / FilterAlignment / WriteEmbeddings on the real demo photos, with the
cpu-tiny CLIP trained on them and captions of other photos injected as bad cases."""

from __future__ import annotations


import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam.testing.test_pipeline import TestPipeline

from pipeline import storage
from pipeline.config import AlignConfig, ClipConfig
from pipeline.records import Asset, RejectReason
from pipeline.retrieval import read_embeddings
from pipeline.stages.align import FilterAlignment, KeptEmbeddings, ScoreAlignment, WriteEmbeddings
from manifests.schema import ManifestEntry

try:  # helpers shared with test_clip.py (tests/ may or may not be a package)
    from tests.pipeline.test_clip import demo_corpus, trained_clip_dir
except ImportError:  # pragma: no cover
    from test_clip import demo_corpus, trained_clip_dir

N_BAD = 12


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    urls, samples = demo_corpus(tmp_path_factory.getbasetemp() / "demo-curated")
    return trained_clip_dir(tmp_path_factory.getbasetemp(), urls), samples


def make_asset(asset_id: str, jpg: bytes | None, captions: list[str], row: int) -> Asset:
    entry = ManifestEntry(asset_id=asset_id, uri=f"images/{asset_id}.jpg", captions=tuple(captions),
                          license_id="CC-BY-4.0")
    return Asset(entry=entry, manifest_uri="memory://manifest.jsonl", manifest_row=row, image=jpg,
                 captions=tuple(captions))


def corpus_with_mismatches(samples) -> tuple[list[Asset], set[str]]:
    """The demo photos with their own captions, plus N_BAD photos re-listed with the
    captions of a photo 50 rows away (the 'caption that does not match its image' case)."""
    assets = [make_asset(a, jpg, caps, i) for i, (a, jpg, caps) in enumerate(samples)]
    bad = set()
    for j in range(N_BAD):
        i = j * (len(samples) // N_BAD)
        other = samples[(i + 50) % len(samples)]
        asset_id = f"mismatch-{j:02d}"
        assets.append(make_asset(asset_id, samples[i][1], other[2], len(assets)))
        bad.add(asset_id)
    return assets, bad


_SINK: dict[str, list] = {}


def _sink(x, name: str) -> None:
    """Module-level, so Beam pickles it by reference and the in-process runner fills _SINK."""
    _SINK.setdefault(name, []).append(x)


def collect(name: str):
    return beam.Map(_sink, name)


def run_align(assets: list[Asset], cfg: AlignConfig, out_dir: str | None = None):
    """Run score + filter; return (kept, rejected, embedding rows, counters)."""
    _SINK.clear()

    pipeline = TestPipeline()
    bs = cfg.clip.batch_size
    batches = [assets[i:i + bs] for i in range(0, len(assets), bs)]
    scored = pipeline | beam.Create(batches, reshuffle=False) | ScoreAlignment(cfg)
    filtered = scored.kept | FilterAlignment(cfg, scored.mismatched)
    _ = filtered.kept | "k" >> collect("kept")
    _ = (scored.rejected, filtered.rejected) | beam.Flatten() | "r" >> collect("rejected")
    _ = scored.embeddings | "e" >> collect("emb")
    if out_dir:
        _ = scored.embeddings | KeptEmbeddings(filtered.kept) | WriteEmbeddings(out_dir, num_shards=2)
    result = pipeline.run()
    result.wait_until_finish()
    counters = {f"{c.key.metric.namespace}/{c.key.metric.name}": c.committed if c.committed is not None else c.attempted
                for c in result.metrics().query()["counters"]}
    got = dict(_SINK)
    return got.get("kept", []), got.get("rejected", []), got.get("emb", []), counters


@pytest.mark.slow
def test_mismatched_captions_are_rejected_with_their_score(trained, tmp_path):
    model_dir, samples = trained
    assets, bad = corpus_with_mismatches(samples)
    cfg = AlignConfig(clip=ClipConfig(arch="cpu-tiny", weights=str(model_dir / "clip.safetensors"),
                                      device="cpu", batch_size=32),
                      mode="top_fraction", keep_fraction=1 - N_BAD / len(assets))
    kept, rejected, emb, counters = run_align(assets, cfg, out_dir=str(tmp_path / "curated"))

    # every row accounted for, every row scored (kept and rejected alike)
    assert len(kept) + len(rejected) == len(assets)
    assert all(a.clip_score is not None for a in kept)
    assert all(r.reason is RejectReason.LOW_ALIGNMENT and r.clip_score is not None for r in rejected)
    assert all(f"clip_score {r.clip_score:.4f} <" in r.detail for r in rejected)
    rejected_ids = {r.asset_id for r in rejected}
    assert len(rejected_ids & bad) >= 0.7 * N_BAD, (rejected_ids & bad, rejected_ids - bad)
    assert abs(len(rejected) - N_BAD) <= 2  # the global quantile cut removes ~the requested fraction
    scores = {a.asset_id: a.clip_score for a in kept} | {r.asset_id: r.clip_score for r in rejected}
    good = [s for a, s in scores.items() if a not in bad]
    assert np.mean([scores[a] for a in bad]) < np.mean(good) - 0.1

    assert counters["clip/in"] == len(assets) and counters["clip/kept"] == len(assets)
    assert counters["align/in"] == len(assets)
    assert counters["align/rejected/LOW_ALIGNMENT"] == len(rejected)
    assert counters["align/kept"] == len(kept)

    # embeddings: one row per scored asset; the store keeps those of kept assets only,
    # round-tripped as float16
    assert sorted(r["asset_id"] for r in emb) == sorted(a.asset_id for a in assets)
    files = storage.list_files(str(tmp_path / "curated"), "embeddings-*.parquet")
    table = read_embeddings(files)
    assert sorted(table.asset_ids) == sorted(a.asset_id for a in kept)
    assert table.keys == sorted(table.keys)
    raw = pq.read_table(files[0])
    assert pa.types.is_float16(raw.schema.field("doc_emb").type.value_type)
    for name in ("image_emb", "text_emb", "doc_emb"):
        norms = np.linalg.norm(getattr(table, name), axis=1)
        np.testing.assert_allclose(norms, 1.0, atol=2e-3)
    expected_doc = table.image_emb + table.text_emb
    expected_doc /= np.linalg.norm(expected_doc, axis=1, keepdims=True)
    np.testing.assert_allclose(table.doc_emb, expected_doc, atol=3e-3)


@pytest.mark.slow
def test_threshold_and_off_modes_and_bad_images(trained):
    model_dir, samples = trained
    clip = ClipConfig(arch="cpu-tiny", weights=str(model_dir / "clip.safetensors"), device="cpu", batch_size=8)
    assets = [make_asset(a, jpg, caps, i) for i, (a, jpg, caps) in enumerate(samples[:10])]
    assets.append(make_asset("corrupt", b"\xff\xd8 not a jpeg", ["a photo"], 10))
    assets.append(make_asset("no-image", None, ["a photo"], 11))

    kept, rejected, _, _ = run_align(assets, AlignConfig(clip=clip, mode="off"))
    assert {r.asset_id: r.reason for r in rejected} == {"corrupt": RejectReason.ERROR, "no-image": RejectReason.ERROR}
    assert len(kept) == 10
    scores = sorted(a.clip_score for a in kept)
    cut = (scores[2] + scores[3]) / 2  # between the 3rd and 4th lowest

    kept, rejected, _, _ = run_align(assets, AlignConfig(clip=clip, mode="threshold", threshold=cut))
    low = [r for r in rejected if r.reason is RejectReason.LOW_ALIGNMENT]
    assert len(low) == 3 and all(r.clip_score < cut for r in low)
    assert len(kept) == 7 and all(a.clip_score >= cut for a in kept)


def test_config_is_validated():
    with pytest.raises(ValueError):
        AlignConfig(mode="median")
    with pytest.raises(ValueError):
        AlignConfig(reduce="min")
    with pytest.raises(ValueError):
        AlignConfig(keep_fraction=0.0)
