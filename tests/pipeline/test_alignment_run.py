"""The alignment filter through real runs (issue 16): rows scored out of fold by CLIPs the run
trains itself, the calibrated filter on a corpus a tiny CLIP can learn (power) and with a CLIP
that learned nothing (no power), and a duplicate group whose representative has the wrong
caption keeping its other member."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image

from manifests.shapes import shapes_corpus, swap_captions, write_shapes_corpus
from pipeline import ledger
from pipeline.summary import format_report
from pipeline.config import RunConfig, from_dict
from pipeline.run import run

ROOT = Path(__file__).resolve().parents[2]
POLICY = ROOT / "manifests" / "policies" / "commercial.yaml"  # allows CC0-1.0, the generated corpus's license
IN_MEMORY = ["--direct_running_mode=in_memory", "--direct_num_workers=1"]
TRAIN = {"max_steps": 100, "batch_size": 64, "warmup_steps": 10, "lr": 1e-3, "progress": False, "num_threads": 1}


def _config(manifest: Path, out: Path, clip_train: dict, dedup: dict | None = None) -> RunConfig:
    return from_dict(RunConfig, {
        "manifests": [str(manifest)], "policy": str(POLICY), "out": str(out),
        "decode": {"resolution": 64, "min_side": 64}, "clip_train": clip_train, "dedup": dedup or {"near": False},
        "align": {"mode": "calibrated", "folds": 2, "mismatch_draws": 5},
    })


def _same_pixels(image: bytes) -> bytes:
    """The same picture as a lossless PNG: other bytes, the same decoded pixels (an exact
    duplicate under `dedup.pixel_exact`)."""
    with Image.open(io.BytesIO(image)) as im:
        buf = io.BytesIO()
        im.convert("RGB").save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def power_run(tmp_path_factory):
    """720 generated rows, 10 % with the caption of another colour and shape, plus a duplicate
    of one good row with a wrong caption that wins the representative rule (same pixels as a
    PNG, and a smaller asset_id). Near dedup is off: a flat shape on a flat background is a
    near duplicate of many others under a perceptual hash, which is not what is tested here."""
    root = tmp_path_factory.mktemp("power")
    rows, swapped = swap_captions(shapes_corpus(720, seed=0), 0.1, seed=0)
    good = next(r for r in rows if r.asset_id not in swapped)
    wrong = next(r.caption for r in rows if r.colour != good.colour and r.shape != good.shape)
    copy = type(good)("a-copy-with-a-wrong-caption", good.colour, good.shape, good.background, wrong,
                      _same_pixels(good.image))
    manifest = write_shapes_corpus(root / "corpus", [*rows, copy])
    out = root / "out"
    report = run(_config(manifest, out, TRAIN, dedup={"near": False}), until="curated", beam_flags=IN_MEMORY)
    return {"report": report, "out": out, "swapped": swapped, "good": good.asset_id, "copy": copy.asset_id,
            "rows": len(rows) + 1}


@pytest.mark.slow
def test_out_of_fold_calibrated_filter_catches_swapped_captions_in_a_run(power_run):
    report, swapped = power_run["report"], power_run["swapped"]
    align = next(s.info for s in report.steps if s.name == "align")
    assert align["scored_out_of_fold"] == 2 and align["calibration"]["decision"] == "filter", align
    rows = {r["asset_id"]: r for r in ledger.read_ledger(str(power_run["out"])).to_pylist()}
    assert len(rows) == power_run["rows"]
    low = {a for a, r in rows.items() if r["reason"] == "LOW_ALIGNMENT"}
    good = set(rows) - swapped - {power_run["copy"]}
    caught = len(low & swapped) / len(swapped)
    false_rejects = len(low & good) / len(good)
    assert caught >= 0.9 and false_rejects <= 0.02, (caught, false_rejects, align["calibration"])
    assert all(r["clip_score"] is not None for r in rows.values())  # every score kept in the ledger
    summary = format_report(report)
    assert "out of fold (2 folds)" in summary and "filter at clip_score <" in summary


@pytest.mark.slow
def test_a_group_whose_representative_has_a_wrong_caption_keeps_its_other_member(power_run):
    rows = {r["asset_id"]: r for r in ledger.read_ledger(str(power_run["out"])).to_pylist()}
    copy, good = rows[power_run["copy"]], rows[power_run["good"]]
    assert (copy["status"], copy["reason"]) == ("rejected", "LOW_ALIGNMENT")  # the representative, wrong caption
    assert good["status"] == "kept" and good["cluster_id"] == copy["asset_id"]  # its group, kept by the other member
    kept = {a for a, r in rows.items() if r["status"] == "kept"}
    duplicates = [r for r in rows.values() if r["reason"] in ledger.DUPLICATE_REASONS]
    assert all(r["dup_of"] in kept for r in duplicates)
    counters = power_run["report"].counters
    assert counters["align/groups_kept_by_another_member"] >= 1


@pytest.mark.slow
def test_a_clip_that_learned_nothing_rejects_nothing_and_says_so(tmp_path):
    rows, _ = swap_captions(shapes_corpus(120, seed=1), 0.1, seed=1)
    manifest = write_shapes_corpus(tmp_path / "corpus", rows)
    untrained = {**TRAIN, "max_steps": 1, "warmup_steps": 1}
    report = run(_config(manifest, tmp_path / "out", untrained), until="curated", beam_flags=IN_MEMORY)
    calibration = next(s.info for s in report.steps if s.name == "align")["calibration"]
    assert calibration["decision"] == "too_weak" and calibration["threshold"] is None
    low = [r for r in ledger.read_ledger(str(tmp_path / "out")).to_pylist() if r["reason"] == "LOW_ALIGNMENT"]
    assert len(low) <= 0.01 * len(rows)
    assert "too_weak" in format_report(report)
