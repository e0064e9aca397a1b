"""Rebuild the demo corpus manifests and generated bad cases (deterministic).

Inputs: the COCO photos in `images/` (byte-for-byte copies of shared/data/coco_mini_captions,
with their per-image Flickr licenses) and that folder's manifest.jsonl. Outputs:

- `coco.jsonl`      one row per COCO photo, in this project's manifest schema;
- `bad-cases.jsonl` rows that exercise every reject reason, several of them pointing at
                    files generated into `bad/` from CC-BY-2.0 photos (adaptations allowed
                    with attribution; each row names the photo it was derived from).

Run: python manifests/demo/build_demo.py [--source-manifest PATH]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
DEFAULT_SOURCE = HERE.parents[2] / "shared" / "data" / "coco_mini_captions" / "manifest.jsonl"
ALLOWED_USES = ["ml-training", "research", "redistribution-with-attribution"]
PROVENANCE_KEYS = (
    "image_id", "coco_split", "source_url", "flickr_url", "coco_url", "author_note",
    "date_captured", "source_repo", "source_commit", "source_path",
    "caption_source_repo", "caption_source_commit", "caption_source_path",
)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def coco_row(src: dict) -> dict:
    """Map a shared COCO manifest row to this project's manifest schema."""
    row = {
        "asset_id": f"coco-{src['image_id']:012d}",
        "uri": f"images/{src['file_name']}",
        "captions": src["captions"],
        "license_id": src["license_spdx"],
        "license_name": src["license_name"],
        "license_url": src["license_url"],
        "licensor": "Flickr photographer (not recorded by MS-COCO; see flickr_url)",
        "allowed_uses": ALLOWED_USES,
        "license_start": None,
        "license_expiry": None,
        "sha256": src["sha256"],
        "width": src["width"],
        "height": src["height"],
        "caption_license": "CC-BY-4.0 (COCO Consortium)",
    }
    row.update({k: src.get(k) for k in PROVENANCE_KEYS})
    return row


def save_jpeg(img: Image.Image, quality: int = 90, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality, **kw)
    return buf.getvalue()


def xmp_packet(data_mining: str) -> bytes:
    return (
        '<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>'
        '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
        '<rdf:Description rdf:about="" xmlns:plus="http://ns.useplus.org/ldf/xmp/1.0/">'
        f"<plus:DataMining>http://ns.useplus.org/ldf/vocab/{data_mining}</plus:DataMining>"
        "</rdf:Description></rdf:RDF></x:xmpmeta>"
        '<?xpacket end="w"?>'
    ).encode("utf-8")


def bomb_png(side: int) -> bytes:
    """A valid 1-bit PNG of side x side pixels: tiny on disk, huge when decoded."""
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return (len(payload).to_bytes(4, "big") + kind + payload
                + zlib.crc32(kind + payload).to_bytes(4, "big"))
    header = side.to_bytes(4, "big") * 2 + bytes([1, 0, 0, 0, 0])
    row = b"\x00" + b"\x00" * ((side + 7) // 8)
    comp = zlib.compressobj(9)
    body = b"".join(comp.compress(row) for _ in range(side)) + comp.flush()
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


def build(source_manifest: Path) -> None:
    src_rows = [json.loads(line) for line in source_manifest.read_text().splitlines() if line.strip()]
    src_rows.sort(key=lambda r: r["image_id"])
    rows = [coco_row(r) for r in src_rows]
    (HERE / "coco.jsonl").write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))

    by_license = [r for r in rows if r["license_id"] == "CC-BY-2.0"]
    bad_dir = HERE / "bad"
    bad_dir.mkdir(exist_ok=True)
    files: dict[str, bytes] = {}

    def derived(base: dict, asset_id: str, uri: str, note: str, **fields) -> dict:
        row = {k: v for k, v in base.items() if k not in ("sha256", "width", "height")}
        row.update(asset_id=asset_id, uri=uri, derived_from=base["asset_id"], demo_case=note)
        row.update(fields)
        return row

    def open_img(row: dict) -> Image.Image:
        return Image.open(HERE / row["uri"]).convert("RGB")

    a, b, c, d, e, f, g, h = by_license[:8]
    img_a = open_img(a)
    raw_a = (HERE / a["uri"]).read_bytes()

    files["random-bytes.jpg"] = np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    files["truncated.jpg"] = raw_a[: len(raw_a) * 2 // 5]
    files["empty.jpg"] = b""
    files["bomb.png"] = bomb_png(12_000)
    files["tdm-prohibited.jpg"] = save_jpeg(open_img(b), xmp=xmp_packet("DMI-PROHIBITED-AIMLTRAINING"))
    files["tiny.jpg"] = save_jpeg(img_a.resize((64, 48)))
    wide = img_a.resize((1000, 1000 * img_a.height // img_a.width))
    files["panorama.jpg"] = save_jpeg(wide.crop((0, 0, 1000, 200)))
    small = open_img(c)
    files["near-duplicate.jpg"] = save_jpeg(small.resize((small.width * 7 // 10, small.height * 7 // 10)), quality=40)
    mirrored = by_license[8:11]
    for i, row in enumerate(mirrored):
        files[f"mirrored-{i}.jpg"] = save_jpeg(open_img(row).transpose(Image.Transpose.FLIP_LEFT_RIGHT), quality=92)
    for name, data in files.items():
        (bad_dir / name).write_bytes(data)

    bad: list[dict | str] = [
        derived(a, "bad-random-bytes", "bad/random-bytes.jpg", "not an image: random bytes named .jpg"),
        derived(a, "bad-truncated", "bad/truncated.jpg", "first 40% of a JPEG"),
        derived(a, "bad-empty", "bad/empty.jpg", "zero-byte file"),
        derived(a, "bad-bomb", "bad/bomb.png", "12000x12000 PNG, 20 KB on disk (decompression bomb)"),
        derived(a, "bad-missing", "images/does-not-exist.jpg", "file missing from the delivery"),
        derived(a, "bad-escape", "../../../../etc/hostname", "uri escapes the manifest's folder"),
        derived(a, "bad-other-host", "https://example.invalid/photo.jpg", "uri on a host outside the allowed roots"),
        derived(b, "bad-tdm", "bad/tdm-prohibited.jpg", "XMP plus:DataMining = DMI-PROHIBITED-AIMLTRAINING"),
        derived(a, "bad-tiny", "bad/tiny.jpg", "64x48 thumbnail"),
        derived(a, "bad-panorama", "bad/panorama.jpg", "5:1 strip"),
        derived(c, "bad-checksum", c["uri"], "declared sha256 does not match the bytes",
                sha256="0" * 64),
        derived(d, "bad-expired", d["uri"], "vendor license expired before the policy's as_of",
                license_id="LicenseRef-demo-stock-2019", license_name="Demo stock agreement 2019",
                license_expiry="2021-12-31"),
        derived(d, "bad-not-yet-valid", d["uri"], "vendor license starts after as_of",
                license_id="LicenseRef-demo-stock-2019", license_name="Demo stock agreement 2019",
                license_start="2031-01-01"),
        derived(e, "bad-unknown-license", e["uri"], "license id the policy does not know",
                license_id="LicenseRef-acme-unsigned"),
        derived(e, "bad-editorial-only", e["uri"], "license grants editorial use only",
                allowed_uses=["editorial"]),
        derived(f, "bad-caption-empty", f["uri"], "only blank captions", captions=["   ", ""]),
        derived(f, "bad-caption-long", f["uri"], "caption over the length limit", captions=["a photo " * 300]),
        derived(f, "bad-caption-not-text", f["uri"], "caption is a file name and numbers",
                captions=["IMG_0042.JPG 1234-5678 ####"]),
        derived(g, "bad-bad-date", g["uri"], "expiry not an ISO date", license_expiry="31/12/2030"),
        derived(g, "bad-type", g["uri"], "captions is a number", captions=5),
        {"asset_id": "bad-no-uri", "captions": ["a row without a uri"], "license_id": "CC-BY-2.0",
         "demo_case": "missing required field"},
        dict(rows[0], demo_case="asset_id repeated from coco.jsonl"),
        "{\"asset_id\": \"bad-json\", \"uri\": ",  # a malformed line
        derived(h, "dup-exact", h["uri"], "same bytes as its source photo under a new id"),
        derived(c, "dup-near", "bad/near-duplicate.jpg", "70% resize + JPEG q40 of its source photo"),
    ]
    for i, row in enumerate(mirrored):  # distinct pixels (a mirror image), captions of another photo
        other = rows[-1 - i]
        bad.append(derived(row, f"mismatch-caption-{i}", f"bad/mirrored-{i}.jpg",
                           f"mirrored copy of {row['asset_id']} with the captions of {other['asset_id']}",
                           captions=other["captions"]))
    lines = [r if isinstance(r, str) else json.dumps(r, sort_keys=True) for r in bad]
    (HERE / "bad-cases.jsonl").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source-manifest", type=Path, default=DEFAULT_SOURCE)
    build(parser.parse_args().source_manifest)


if __name__ == "__main__":
    main()
