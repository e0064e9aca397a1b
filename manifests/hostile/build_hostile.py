"""Build the hostile-delivery corpus: what a careless vendor or an attacker sends.

    python manifests/hostile/build_hostile.py OUT_FOLDER

writes, under OUT_FOLDER/delivery/, manifests (JSONL with a BOM, CSV with a BOM, a JSONL of
hostile rows), the files they point at (good photos, a JPEG whose header claims 7,900 x 7,900
with a 2.6 KB body, a FIFO, a directory named like an image, symlinks out of the delivery,
and the demo's bad images kept as regressions), plus OUT_FOLDER/expected.json: for every
manifest row, the ledger status and reason a run must give it. tests/pipeline/test_hostile.py
runs the whole corpus through `curate run`. Everything is generated from files in this
repository (manifests/demo/), so the corpus needs nothing from outside it.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import struct
from pathlib import Path

from PIL import Image

DEMO = Path(__file__).resolve().parents[1] / "demo"
ROW = {"license_id": "CC-BY-2.0", "allowed_uses": ["ml-training"], "licensor": "hostile corpus"}
CAPTIONS = ["A man riding a bicycle down a city street.", "Two dogs playing with a ball on the grass.",
            "A plate of food with broccoli and rice.", "A red bus parked beside the road.",
            "A kitchen with white cabinets and a window.", "A cat sleeping on a wooden bench."]


def _photos() -> list[Path]:
    rows = [json.loads(line) for line in (DEMO / "coco.jsonl").read_text().splitlines() if line.strip()]
    return [DEMO / r["uri"] for r in rows if r["license_id"] == "CC-BY-2.0"]


def huge_claim_jpeg(side: int = 7900) -> bytes:
    """A real 64 x 64 JPEG whose frame header (SOF0) claims side x side: libjpeg pads the
    missing body with grey and only warns, so without a check it decodes to a flat image."""
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (120, 80, 40)).save(buf, "JPEG", quality=90)
    data = bytearray(buf.getvalue())
    sof = data.find(b"\xff\xc0")
    struct.pack_into(">HH", data, sof + 5, side, side)  # marker, length(2), precision(1), height, width
    return bytes(data[:2600]) if len(data) > 2600 else bytes(data)


def build(folder: Path) -> dict[str, dict[str, str]]:
    """Write the corpus under `folder`; returns {manifest name: {row number: "status/REASON"}}."""
    delivery = folder / "delivery"
    if delivery.exists():
        shutil.rmtree(delivery)
    (delivery / "img").mkdir(parents=True)
    photos = _photos()
    for i, photo in enumerate(photos[:8]):
        shutil.copyfile(photo, delivery / "img" / f"good-{i}.jpg")
    for name in ("bomb.png", "truncated.jpg", "random-bytes.jpg", "empty.jpg", "tdm-prohibited.jpg", "tiny.jpg"):
        shutil.copyfile(DEMO / "bad" / name, delivery / "img" / name)
    (delivery / "img" / "huge-claim.jpg").write_bytes(huge_claim_jpeg())
    os.mkfifo(delivery / "img" / "fifo.jpg")
    (delivery / "img" / "folder.jpg").mkdir()
    (folder / "outside.jpg").write_bytes(photos[0].read_bytes())
    os.symlink(folder / "outside.jpg", delivery / "img" / "link-out.jpg")
    expected: dict[str, dict[str, str]] = {}

    # 1. hostile.jsonl: one row per class, written as raw bytes (some are not valid JSON/UTF-8)
    lines: list[tuple[bytes, str]] = []

    def add(row: dict | bytes, outcome: str) -> None:
        raw = row if isinstance(row, bytes) else json.dumps({**ROW, **row}).encode()
        lines.append((raw, outcome))

    add({"asset_id": "good-0", "uri": "img/good-0.jpg", "caption": CAPTIONS[0]}, "kept")
    add(b'{"asset_id": "huge-int", "uri": "img/good-1.jpg", "caption": "x", "n": ' + b"9" * 5000 + b"}",
        "rejected/MALFORMED_ROW")
    add(b'{"asset_id": "deep", "n": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "rejected/MALFORMED_ROW")
    add(json.dumps({**ROW, "asset_id": "id-X", "uri": "img/good-2.jpg", "caption": CAPTIONS[2]}).encode()
        .replace(b"id-X", b"id-\xff"), "rejected/MALFORMED_ROW")  # invalid UTF-8 in the id
    add({"asset_id": "id-\ufffd", "uri": "img/good-3.jpg", "caption": CAPTIONS[3]}, "kept")  # what \xff became before
    add(b'{"asset_id": "nan-extra", "uri": "img/good-4.jpg", "caption": "' + CAPTIONS[4].encode()
        + b'", "license_id": "CC-BY-2.0", "allowed_uses": ["ml-training"], "score": NaN, "weight": Infinity}', "kept")
    add({"asset_id": "control-caption", "uri": "img/good-5.jpg",
         "caption": "A <img> dog [bos] on a <break> beach </img> <mask:0>"}, "kept")
    add({"asset_id": "huge-claim", "uri": "img/huge-claim.jpg", "caption": CAPTIONS[1]}, "rejected/TRUNCATED_IMAGE")
    add({"asset_id": "fifo", "uri": "img/fifo.jpg", "caption": CAPTIONS[1]}, "rejected/NOT_A_FILE")
    add({"asset_id": "folder", "uri": "img/folder.jpg", "caption": CAPTIONS[1]}, "rejected/NOT_A_FILE")
    add({"asset_id": "symlink-out", "uri": "img/link-out.jpg", "caption": CAPTIONS[1]}, "rejected/URI_NOT_ALLOWED")
    add({"asset_id": "dotdot", "uri": "../outside.jpg", "caption": CAPTIONS[1]}, "rejected/URI_NOT_ALLOWED")
    add({"asset_id": "absolute", "uri": "/etc/passwd", "caption": CAPTIONS[1]}, "rejected/URI_NOT_ALLOWED")
    add({"asset_id": "file-url", "uri": "file:///etc/hostname", "caption": CAPTIONS[1]}, "rejected/URI_NOT_ALLOWED")
    add({"asset_id": "bomb", "uri": "img/bomb.png", "caption": CAPTIONS[1]}, "rejected/DECOMPRESSION_BOMB")
    add({"asset_id": "truncated", "uri": "img/truncated.jpg", "caption": CAPTIONS[1]}, "rejected/TRUNCATED_IMAGE")
    add({"asset_id": "random", "uri": "img/random-bytes.jpg", "caption": CAPTIONS[1]}, "rejected/NOT_AN_IMAGE")
    add({"asset_id": "empty", "uri": "img/empty.jpg", "caption": CAPTIONS[1]}, "rejected/EMPTY_FILE")
    add({"asset_id": "tdm", "uri": "img/tdm-prohibited.jpg", "caption": CAPTIONS[1]}, "rejected/TDM_OPT_OUT")
    add({"asset_id": "tiny", "uri": "img/tiny.jpg", "caption": CAPTIONS[1]}, "rejected/TOO_SMALL")
    add(b"[1, 2, 3]", "rejected/MALFORMED_ROW")
    add(b"{not json", "rejected/MALFORMED_ROW")
    (delivery / "hostile.jsonl").write_bytes(b"".join(raw + b"\n" for raw, _ in lines))
    expected["hostile.jsonl"] = {str(i + 1): outcome for i, (_, outcome) in enumerate(lines)}

    # 2. a JSONL that starts with a byte-order mark: row 1 must not be lost
    bom = [{**ROW, "asset_id": "bom-jsonl-1", "uri": "img/good-6.jpg", "caption": CAPTIONS[5]}]
    (delivery / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + b"".join(json.dumps(r).encode() + b"\n" for r in bom))
    expected["bom.jsonl"] = {"1": "kept"}

    # 3. Excel's "CSV UTF-8": a BOM before the header; a blank line is not a row
    csv_text = ("asset_id,uri,caption,license_id,allowed_uses\n"
                f"bom-csv-1,img/good-7.jpg,{CAPTIONS[0]},CC-BY-2.0,ml-training\n"
                "\n"
                f"bom-csv-2,img/good-7.jpg,{CAPTIONS[1]},CC-BY-2.0,ml-training\n")
    (delivery / "excel.csv").write_bytes(b"\xef\xbb\xbf" + csv_text.encode())
    expected["excel.csv"] = {"1": "kept", "2": "rejected/EXACT_DUPLICATE"}
    (folder / "expected.json").write_text(json.dumps(expected, indent=2, sort_keys=True))
    return expected


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="folder to write the corpus into")
    args = parser.parse_args()
    expected = build(args.out)
    print(f"{sum(len(v) for v in expected.values())} rows in {len(expected)} manifests under {args.out / 'delivery'}")


if __name__ == "__main__":
    main()
