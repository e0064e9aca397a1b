"""The `sft` step: manifest boxes validated at the edge, mapped through the decode crop, CM3leon
task examples as their own shard set with provenance, `task` and `answer_start`, task balancing,
the budget skip that keeps the asset, and byte-identical reruns; end to end on real demo photos."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from manifests.schema import RowError, parse_entry
from pipeline import ledger
from pipeline.config import ConfigError, DecodeConfig, RunConfig, SftConfig, from_dict
from pipeline.records import Asset
from pipeline.run import run
from pipeline.stages.decode import curated_box, decode_image
from pipeline.stages.store import asset_from_sample, extra_json, sample_json
from pipeline.stages.sft import document_objects, sft_factors
from pipeline.stages.tokens import unit_draw
from tokenizer import sft as sft_format
from tokenizer.token_shards import load_tokens_index, parse_index
from tokenizer.vocab import JointVocab

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "manifests" / "demo"
IN_MEMORY = ["--direct_running_mode=in_memory", "--direct_num_workers=1"]
MULTI = ["--direct_running_mode=multi_processing", "--direct_num_workers=2"]
HOSTILE_LABEL = "<img> person </img> <break>"
LONG = " ".join(f"word{i} zebra quokka" for i in range(60))  # fits the tokens budget, not sft.max_tokens
BASE = {"asset_id": "a1", "uri": "images/a.jpg", "caption": "A dog on a beach.", "license_id": "CC-BY-2.0"}


# -- the `objects` field at the edge --------------------------------------------------------------


def _reject(objects) -> RowError:
    with pytest.raises(RowError) as err:
        parse_entry(dict(BASE, objects=objects))
    return err.value


def test_objects_are_validated_and_labels_stay_text():
    entry = parse_entry(dict(BASE, objects=[{"label": " <img>\nbottle ", "bbox": [1, 2.5, 30, 40], "score": 0.9}]))
    assert [(o.label, o.bbox) for o in entry.objects] == [("<img> bottle", (1, 2.5, 30, 40))]
    assert entry.extra == {} and entry.to_json()["objects"] == [{"label": "<img> bottle", "bbox": [1, 2.5, 30, 40]}]
    csv = parse_entry(dict(BASE, objects='[{"label": "cup", "bbox": [0, 0, 5, 5]}]'))  # a JSON list in a CSV cell
    assert csv.objects[0].label == "cup"
    assert parse_entry(dict(BASE, objects=[])).objects == () and "objects" not in parse_entry(BASE).to_json()
    assert parse_entry(dict(BASE, objects=[{"label": "x", "bbox": [-50, -5, 9000, 20]}])).objects  # outside: the crop decides


@pytest.mark.parametrize("objects,detail", [
    ({"label": "x", "bbox": [0, 0, 1, 1]}, "objects must be a list"),
    ("not json", "objects: not a JSON list"),
    ([["x", [0, 0, 1, 1]]], "objects[0] must be an object"),
    ([{"label": "x", "bbox": [0, 0, 1, 1]}, {"bbox": [0, 0, 1, 1]}], "objects[1].label must be a non-empty string"),
    ([{"label": " \n\t ", "bbox": [0, 0, 1, 1]}], "objects[0].label must be a non-empty string"),
    ([{"label": 7, "bbox": [0, 0, 1, 1]}], "objects[0].label must be a non-empty string"),
    ([{"label": "x" * 201, "bbox": [0, 0, 1, 1]}], "objects[0].label is 201 characters"),
    ([{"label": "x", "bbox": [0, 0, 1]}], "objects[0].bbox must be 4 finite numbers"),
    ([{"label": "x", "bbox": [0, 0, "1", 1]}], "objects[0].bbox must be 4 finite numbers"),
    ([{"label": "x", "bbox": [0, 0, float("nan"), 1]}], "objects[0].bbox must be 4 finite numbers"),
    ([{"label": "x", "bbox": [0, True, 1, 1]}], "objects[0].bbox must be 4 finite numbers"),
    ([{"label": "x", "bbox": [5, 0, 5, 1]}], "needs x0 < x1 and y0 < y1"),
    ([{"label": "x", "bbox": [0, 0, 1, 1]}] * 257, "objects: 257 entries, at most 256"),
])
def test_malformed_objects_reject_the_row_naming_the_object(objects, detail):
    err = _reject(objects)
    assert err.reason == "BAD_FIELD_TYPE" and detail in err.detail and err.asset_id == "a1"


def test_curated_store_carries_objects_and_rows_without_keep_their_bytes():
    plain = Asset(entry=parse_entry(dict(BASE, shoot="w25")), manifest_uri="m", manifest_row=1)
    boxed = Asset(entry=parse_entry(dict(BASE, shoot="w25", objects=[{"label": "dog", "bbox": [1, 2, 3, 4]}])),
                  manifest_uri="m", manifest_row=1)
    assert extra_json(plain.entry) == json.dumps({"shoot": "w25"}, sort_keys=True)  # as before the field existed
    assert json.loads(extra_json(boxed.entry)) == {"shoot": "w25", "objects": [{"label": "dog", "bbox": [1, 2, 3, 4]}]}
    assert "objects" not in sample_json(plain, "k", 0)
    again = asset_from_sample(sample_json(boxed, "k", 0), b"")  # the prepared store is read back by align
    assert again.entry.objects == boxed.entry.objects and again.entry.extra == {"shoot": "w25"}


# -- box geometry: the decode crop ----------------------------------------------------------------


def test_boxes_follow_the_centre_crop_of_landscape_and_portrait_frames():
    # 640 x 480 landscape: the crop is x 80..560, scale 256 / 480
    assert curated_box((80, 0, 560, 480), 640, 480, 256) == (0, 0, 256, 256)
    assert curated_box((200, 120, 320, 240), 640, 480, 256) == (64, 64, 128, 128)
    # 480 x 640 portrait: the crop is y 80..560
    assert curated_box((120, 200, 240, 320), 480, 640, 256) == (64, 64, 128, 128)
    # 64 px frame, 500 x 334 source: left margin 83, scale 64 / 334
    assert curated_box((83, 0, 250, 167), 500, 334, 64) == (0, 0, 32, 32)


def test_boxes_partly_outside_are_clipped_and_nearly_outside_dropped():
    assert curated_box((0, 120, 320, 240), 640, 480, 256) == (0, 64, 128, 128)  # 75 % inside: clipped
    assert curated_box((-100, -100, 700, 600), 640, 480, 256) == (0, 0, 256, 256)  # larger than the frame
    assert curated_box((0, 0, 80, 480), 640, 480, 256) is None  # wholly in the cropped-off margin
    assert curated_box((0, 0, 100, 100), 640, 480, 256) is None  # 20 % inside (< 25 %)
    assert curated_box((40, 0, 120, 100), 640, 480, 256) == (0, 0, 21, 53)  # 50 % inside
    assert curated_box((559.5, 0, 561, 480), 640, 480, 256) is None  # under one curated pixel wide inside
    assert curated_box((700, 10, 800, 20), 640, 480, 256) is None


def test_box_corners_round_half_up_and_keep_a_pixel():
    # scale 256 / 480: source 80.9375 -> 0.5 -> 1; 81.875 -> 1.0 -> 1 ... 82.8125 -> 1.5 -> 2
    assert curated_box((80.9375, 80.9375, 82.8125, 82.8125), 640, 480, 256) == (1, 43, 2, 44)
    box = curated_box((81.0, 0, 82.9, 10), 640, 480, 256)  # ~1.01 px wide: rounding never collapses it
    assert box[2] - box[0] >= 1


def test_document_objects_from_a_metadata_row():
    objects = [{"label": "in", "bbox": [200, 120, 320, 240]}, {"label": "out", "bbox": [0, 0, 80, 480]},
               {"label": "half", "bbox": [40, 0, 120, 100]}, {"label": "third", "bbox": [300, 300, 400, 400]}]
    meta = {"source_width": 640, "source_height": 480, "extra_json": json.dumps({"shoot": "x", "objects": objects})}
    boxes, dropped = document_objects(meta, 256, max_objects=2)
    assert boxes == (("in", (64, 64, 128, 128)), ("half", (0, 0, 21, 53))) and dropped == 1
    assert document_objects({**meta, "extra_json": "{}"}, 256, 8) == ((), 0)
    bad = {**meta, "extra_json": json.dumps({"objects": [{"label": "x", "bbox": "?"}]})}  # an old, unvalidated store
    assert document_objects(bad, 256, 8) == ((), 0)


def test_decode_records_the_displayed_frame_the_boxes_refer_to(demo_dir):
    photo = Image.open(sorted((demo_dir / "images").glob("*.jpg"))[0]).convert("RGB").resize((400, 300))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 400 x 300, displayed 300 x 400
    buf = io.BytesIO()
    photo.save(buf, "JPEG", exif=exif.tobytes())
    decoded = decode_image(buf.getvalue(), DecodeConfig(resolution=64))
    assert (decoded.width, decoded.height) == (300, 400)


def test_bad_sft_config_is_one_clear_line():
    with pytest.raises(ConfigError, match="sft.tasks"):
        from_dict(RunConfig, {"sft": {"tasks": ["captioning", "vqa"]}})
    with pytest.raises(ConfigError, match="sft.task_weights names 'generation'"):
        from_dict(RunConfig, {"sft": {"tasks": ["captioning"], "task_weights": {"generation": 2}}})
    with pytest.raises(ConfigError, match="sft.min_downsample"):
        from_dict(RunConfig, {"sft": {"min_downsample": 1.5}})
    assert SftConfig().enabled is False


# -- end to end -----------------------------------------------------------------------------------


def _corpus(root: Path) -> tuple[Path, dict[str, str]]:
    """18 licensed COCO rows: boxes inside, partly outside, wholly cropped away and with a
    hostile label; one malformed box list; one caption too long for the SFT budget."""
    allowed = {"CC-BY-2.0", "CC-BY-SA-2.0", "CC-BY-NC-2.0", "CC-BY-NC-SA-2.0"}
    rows = [json.loads(line) for line in (DEMO / "coco.jsonl").read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r["license_id"] in allowed][:18]
    (root / "images").mkdir(parents=True)
    for r in rows:
        shutil.copy(DEMO / r["uri"], root / r["uri"])
    rows[0]["objects"] = [{"label": HOSTILE_LABEL, "bbox": [100, 50, 300, 400]}]  # 480 x 640: top clipped
    rows[2]["objects"] = [{"label": "thing", "bbox": [200, 100, 400, 300]}]  # 640 x 457: inside
    rows[3]["objects"] = [{"label": "gone", "bbox": [0, 0, 60, 100]}]  # 500 x 334: in the cropped margin
    rows[4]["objects"] = [{"label": "sliver", "bbox": [10, 10, 100, 100]},  # 640 x 449: 5 % inside, dropped
                          {"label": "table", "bbox": [300, 200, 500, 400]}]
    rows[5]["objects"] = [{"label": "dog", "bbox": [1, 2, 3]}]  # malformed: the row is rejected
    rows[1]["captions"] = [LONG]
    special = {"hostile": rows[0]["asset_id"], "long": rows[1]["asset_id"], "inside": rows[2]["asset_id"],
               "gone": rows[3]["asset_id"], "two": rows[4]["asset_id"], "malformed": rows[5]["asset_id"]}
    manifest = root / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return manifest, special


def _config(manifest: Path, out: Path, sft: bool) -> RunConfig:
    return from_dict(RunConfig, {
        "manifests": [str(manifest)], "policy": str(DEMO / "policy.yaml"), "out": str(out),
        "validate": {"max_caption_chars": 8000},
        "decode": {"resolution": 64},  # f4 -> 16 x 16 = 256 codes per image
        "clip_train": {"max_steps": 10, "batch_size": 16, "progress": False},
        "align": {"mode": "off"},
        "vq": {"model": "cpu-small", "train": {"max_steps": 6, "eval_every": 6, "checkpoint_every": 6,
                                               "num_threads": 1, "progress": False, "batch_size": 8}},
        "text": {"vocab_size": 1000},
        "tokens": {"k": 1, "max_tokens": 900, "sequences_per_shard": 10},
        "sft": {"enabled": sft, "max_tokens": 360, "sequences_per_shard": 12},
    })


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("sft")
    manifest, special = _corpus(root / "corpus")
    out = root / "out"
    plain = run(_config(manifest, out, sft=False), until="tokens", beam_flags=IN_MEMORY)
    before = {name: _digest(out / name) for name in ("curated", "tokens", "ledger", "codes", "_state")}
    before["sft written while disabled"] = (out / "sft").exists() or (out / "_state" / "sft.json").exists()
    report = run(_config(manifest, out, sft=True), until="tokens", beam_flags=IN_MEMORY)
    return {"root": root, "manifest": manifest, "out": out, "plain": plain, "report": report, "before": before,
            "special": special}


def _rows(out: Path) -> list[dict]:
    return pq.read_table(out / "sft" / "sequences.parquet").to_pylist()


def _tokens(out: Path, folder: str, rows: list[dict]) -> dict[str, np.ndarray]:
    result = {}
    for r in rows:
        prefix = out / folder / f"tokens-{r['shard']:06d}"
        idx = parse_index(prefix.with_suffix(".idx").read_bytes())
        data = np.memmap(prefix.with_suffix(".bin"), dtype=idx.dtype, mode="r")
        start = idx.pointers[r["index"]] // idx.dtype.itemsize
        result[r["key"]] = np.array(data[start : start + idx.lengths[r["index"]]])
    return result


def test_disabled_sft_writes_nothing_and_enabling_it_changes_nothing_else(sft_run):
    out = sft_run["out"]
    assert "sft" not in [s.name for s in sft_run["plain"].steps]
    assert [s.name for s in sft_run["report"].steps if not s.skipped] == ["sft"]  # upstream steps reused
    before = dict(sft_run["before"])
    assert before.pop("sft written while disabled") is False
    for name, digest in before.items():
        now = _digest(out / name)
        if name == "_state":
            now.pop("sft.json")
        assert now == digest, name


def test_sft_provenance_covers_only_kept_assets_with_their_licenses(sft_run):
    out, special = sft_run["out"], sft_run["special"]
    table = ledger.read_ledger(str(out)).to_pylist()
    by_id = {r["asset_id"]: r for r in table}
    kept = {a: r for a, r in by_id.items() if r["status"] == "kept"}
    bad = by_id[special["malformed"]]
    assert (bad["status"], bad["reason"]) == ("rejected", "BAD_FIELD_TYPE") and "objects[0].bbox" in bad["detail"]
    rows = _rows(out)
    assert {r["main_asset_id"] for r in rows} == set(kept) - {special["long"]}
    for r in rows:
        assert r["asset_ids"] == [r["main_asset_id"]] and r["roles"] == ["main"] and r["neighbour_scores"] == []
        assert r["license_ids"] == [kept[r["main_asset_id"]]["license_id"]]
        assert r["licensors"] == [kept[r["main_asset_id"]]["licensor"]]
        assert r["key"].startswith(kept[r["main_asset_id"]]["key"] + "-" + r["task"] + "-")
    long_row = by_id[special["long"]]  # skipped for the SFT budget, still kept for pretraining
    assert long_row["status"] == "kept"
    tokens_rows = pq.read_table(out / "tokens" / "sequences.parquet").to_pylist()
    assert special["long"] in {r["main_asset_id"] for r in tokens_rows}
    index, _ = load_tokens_index(str(out / "sft"))
    assert index["skipped_too_long"] == {"captioning": 1, "generation": 1, "grounded_generation": 0}
    info = {s.name: s.info for s in sft_run["report"].steps}["sft"]
    assert info["skipped_too_long"] == 2 and info["sequences"] == len(rows)


def _main_document(seq: np.ndarray, vocab) -> tuple[np.ndarray, np.ndarray]:
    """(caption ids, `<img> ... </img>`) of a tokens/ sequence's main document (the last one)."""
    breaks = np.flatnonzero(seq == vocab.break_id)
    doc = seq[(breaks[-1] if len(breaks) else 0) + 1 : -1]
    b, e = int(np.flatnonzero(doc == vocab.img_begin_id)[0]), int(np.flatnonzero(doc == vocab.img_end_id)[0])
    return np.concatenate([doc[:b], doc[e + 1 :]]), doc[b : e + 1]


def test_tasks_and_answer_start_are_right(sft_run):
    out, special = sft_run["out"], sft_run["special"]
    vocab = JointVocab.load(str(out / "sft" / "vocab.json"))
    rows = _rows(out)
    sft_tokens = _tokens(out, "sft", rows)
    tokens_rows = pq.read_table(out / "tokens" / "sequences.parquet").to_pylist()
    pretrain = _tokens(out, "tokens", tokens_rows)
    main_of = {r["main_asset_id"]: _main_document(pretrain[r["key"]], vocab) for r in tokens_rows}
    meta = {r["asset_id"]: r for p in sorted((out / "curated").glob("metadata-*.parquet"))
            for r in pq.read_table(p).to_pylist()}
    prompts = {}
    for r in rows:
        seq, start = sft_tokens[r["key"]], r["answer_start"]
        assert len(seq) == r["num_tokens"] <= 360 and seq[0] == vocab.bos_id and seq[-1] == vocab.eos_id
        assert seq[start - 1] == vocab.break_id and (seq == vocab.break_id).sum() == 1
        prompt, answer = seq[1 : start - 1], seq[start:-1]
        caption, image = main_of[r["main_asset_id"]]  # the same caption and codes as in pretraining
        assert (seq == vocab.img_begin_id).sum() == 1  # a label or caption spelling <img> stays text
        if r["task"] == "captioning":
            assert r["order"] == "image_first" and np.array_equal(prompt[: len(image)], image)
            assert vocab.ids_to_text(prompt[len(image) :]) == "Describe the given picture."
            assert np.array_equal(answer, caption)  # the loss starts exactly at the caption
        else:
            assert r["order"] == "text_first" and np.array_equal(answer, image)
            text = prompts[r["key"]] = vocab.ids_to_text(prompt)
            assert text.startswith('Generate high quality image of "' + vocab.ids_to_text(caption) + '"')
            if r["task"] == "grounded_generation":
                boxes, _ = document_objects(meta[r["main_asset_id"]], 64, 8)
                assert text.endswith('" ' + sft_format.box_phrase(boxes) + ".")
    grounded = {r["main_asset_id"]: prompts[r["key"]] for r in rows if r["task"] == "grounded_generation"}
    assert set(grounded) == {special["hostile"], special["inside"], special["two"]}  # "gone" lost its only box
    assert f"with {HOSTILE_LABEL} at (" in grounded[special["hostile"]]
    assert "with table at (" in grounded[special["two"]] and "sliver" not in grounded[special["two"]]
    hostile = meta[special["hostile"]]  # 480 x 640 portrait: the box's top lies in the cropped-off band
    assert document_objects(hostile, 64, 8)[0] == (
        (HOSTILE_LABEL, curated_box((100, 50, 300, 400), hostile["source_width"], hostile["source_height"], 64)),)
    assert f"with {HOSTILE_LABEL} at (13, 0) -> (40, 43)" in grounded[special["hostile"]]


def test_tasks_are_balanced_by_the_seeded_rule(sft_run):
    out, special = sft_run["out"], sft_run["special"]
    index, _ = load_tokens_index(str(out / "sft"))
    rows = _rows(out)
    cfg = _config(sft_run["manifest"], out, sft=True)
    key_of = {r["asset_id"]: r["key"] for r in ledger.read_ledger(str(out)).to_pylist() if r["status"] == "kept"}
    candidates = index["task_candidates"]  # counted before the budget: the long caption is one
    assert candidates == {"captioning": 17, "generation": 17, "grounded_generation": 3}
    factors = sft_factors(cfg.sft, candidates)
    assert factors["grounded_generation"] == 3.0  # natural share 3/37, target 1/3: capped at 3x
    assert factors["captioning"] == pytest.approx((1 / 3) / (17 / 37))
    assert index["task_factors"] == {t: round(f, 6) for t, f in factors.items()}
    served = {"captioning": set(key_of) - {special["long"]}, "generation": set(key_of) - {special["long"]},
              "grounded_generation": {special["hostile"], special["inside"], special["two"]}}
    expected = {task: sum(sft_format.copies(factors[task], unit_draw(cfg.seed, f"sft:{task}", key_of[a])) for a in assets)
                for task, assets in served.items()}
    counts = {t: sum(r["task"] == t for r in rows) for t in sft_format.TASKS}
    assert counts == expected == index["sequences_per_task"]
    assert counts["grounded_generation"] == 9  # every grounded example three times, keys -0, -1, -2
    assert 0 < counts["captioning"] < 16  # downsampled


def test_megatron_files_parse_and_index_json_matches(sft_run):
    out = sft_run["out"]
    index, _ = load_tokens_index(str(out / "sft"))
    rows = _rows(out)
    assert index["sequences"] == len(rows) and index["tokens"] == sum(r["num_tokens"] for r in rows)
    assert sorted(p.stem for p in (out / "sft").glob("*.bin")) == [s["name"] for s in index["shards"]]
    assert len(index["shards"]) > 1 and index["layout"] == "[bos] prompt <break> answer [eos]"
    for shard in index["shards"]:
        prefix = out / "sft" / shard["name"]
        idx = parse_index(prefix.with_suffix(".idx").read_bytes())
        mine = sorted((r for r in rows if r["shard"] == shard["shard"]), key=lambda r: r["index"])
        assert idx.lengths.tolist() == [r["num_tokens"] for r in mine] and idx.document_indices.tolist() == list(range(len(mine) + 1))
        assert [r["key"] for r in mine] == sorted(r["key"] for r in mine)
        assert hashlib.sha256(prefix.with_suffix(".bin").read_bytes()).hexdigest() == shard["bin_sha256"]
        assert hashlib.sha256(prefix.with_suffix(".idx").read_bytes()).hexdigest() == shard["idx_sha256"]
    schema = pq.read_schema(next((out / "sft" / "sequences.parquet").glob("*.parquet")))
    assert str(schema.field("task").type) == "string" and str(schema.field("answer_start").type) == "int32"
    assert "task" not in pq.read_schema(next((out / "tokens" / "sequences.parquet").glob("*.parquet"))).names
    assert (out / "sft" / "vocab.json").read_bytes() == (out / "models" / "vocab.json").read_bytes()
    state = json.loads((out / "_state" / "sft.json").read_text())
    assert index["config_hash"] == state["config_hash"]


def test_rerun_after_a_crash_is_byte_identical(sft_run):
    out = sft_run["out"]
    before = _digest(out / "sft")
    (out / "_state" / "sft.json").unlink()
    shard = next((out / "sft").glob("tokens-*.bin"))
    shard.write_bytes(shard.read_bytes()[:50])
    (out / "sft" / "index.json").unlink()
    report = run(_config(sft_run["manifest"], out, sft=True), until="tokens", beam_flags=MULTI)
    assert [s.name for s in report.steps if not s.skipped] == ["sft"]
    assert _digest(out / "sft") == before
