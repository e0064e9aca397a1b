"""Near-duplicate quality on real photos: precision and recall per transform and radius.

Builds edited copies of the demo COCO photos with Pillow (the edits stock deliveries make),
adds the imagededup/UKBench groups, hashes everything the way the prepare step does,
and prints, per transform, recall (edited copy within the radius of its original) and
precision (of all pairs within the radius, the share that are true copies). The distinct
photos are 177 real photos (COCO + UKBench distractors); pairs of them within the radius
are the false positives.

    python benchmarks/dedup_quality.py [--radii 6,8,10,12] [--kind phash] [--input image] [--markdown]
    python benchmarks/dedup_quality.py --rule [--radius 8] [--markdown]

`--rule` runs the near rule itself (`dedup_rules.near_decisions`, single linkage) on what a
run hashes (decode's full-frame pHash and, with `dedup.mirror`, the mirrored frame's), with
and without the mirror hash: per transform, the originals + their edited copies + the
UKBench distractors are one delivery; recall is the share of copies put in their original's
cluster, and "photos merged" counts distinct photos that share a cluster with another
distinct photo (precision: must be 0). A last row puts every copy of every transform in one
delivery.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFont

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from manifests.copies import watermark  # noqa: E402
from pipeline import dedup_rules  # noqa: E402
from pipeline.config import DecodeConfig  # noqa: E402
from pipeline.dedup_hash import hamming, hex_to_hash, image_hash_from_bytes  # noqa: E402
from pipeline.stages.decode import decode_image  # noqa: E402

COCO = ROOT / "manifests" / "demo" / "images"
NEARDUP = ROOT / "manifests" / "demo" / "neardup"


def _encode(img: Image.Image, fmt: str = "JPEG", **kw) -> bytes:
    buf = io.BytesIO()
    if fmt == "JPEG" and img.mode not in ("RGB", "L"):
        img = img.convert("RGB")
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _crop(img: Image.Image, frac: float) -> Image.Image:
    w, h = img.size
    dx, dy = int(w * frac), int(h * frac)
    return img.crop((dx, dy, w - dx, h - dy))


def _caption_bar(img: Image.Image) -> Image.Image:
    """Opaque text banner over the bottom ~12% (a burned-in caption)."""
    out = img.convert("RGB").copy()
    draw = ImageDraw.Draw(out)
    w, h = out.size
    bar = h // 8
    draw.rectangle((0, h - bar, w, h), fill=(0, 0, 0))
    draw.text((10, h - bar + 4), "Sample caption text 2024", font=ImageFont.load_default(size=bar // 2), fill=(255, 255, 255))
    return out


TRANSFORMS: dict[str, Callable[[Image.Image], bytes]] = {
    "resize_50": lambda im: _encode(im.resize((im.width // 2, im.height // 2), Image.LANCZOS), quality=90),
    "resize_25": lambda im: _encode(im.resize((im.width // 4, im.height // 4), Image.LANCZOS), quality=90),
    "resize_aspect_300x300": lambda im: _encode(im.resize((300, 300), Image.LANCZOS), quality=90),
    "jpeg_q15": lambda im: _encode(im, quality=15),
    "jpeg_q5": lambda im: _encode(im, quality=5),
    "png": lambda im: _encode(im, "PNG"),
    "webp_q50": lambda im: _encode(im, "WEBP", quality=50),
    "grayscale": lambda im: _encode(im.convert("L"), quality=90),
    "crop_2pct": lambda im: _encode(_crop(im, 0.02), quality=90),
    "crop_5pct": lambda im: _encode(_crop(im, 0.05), quality=90),
    "crop_10pct": lambda im: _encode(_crop(im, 0.10), quality=90),
    "brightness_+30pct": lambda im: _encode(ImageEnhance.Brightness(im).enhance(1.3), quality=90),
    "contrast_+30pct": lambda im: _encode(ImageEnhance.Contrast(im).enhance(1.3), quality=90),
    "watermark_text": lambda im: _encode(watermark(im), quality=90),
    "caption_bar": lambda im: _encode(_caption_bar(im), quality=90),
    "hflip": lambda im: _encode(im.transpose(Image.FLIP_LEFT_RIGHT), quality=90),
    "rotate_90": lambda im: _encode(im.transpose(Image.ROTATE_90), quality=90),
    "rotate_5deg": lambda im: _encode(im.rotate(5, resample=Image.BICUBIC, expand=False), quality=90),
}


def coco_photos(limit: int | None = None) -> list[Path]:
    return sorted(COCO.glob("*.jpg"))[:limit]


def neardup_manifest() -> list[dict]:
    return [json.loads(line) for line in (NEARDUP / "manifest.jsonl").read_text().splitlines() if line.strip()]


def hasher(kind: str, source: str) -> Callable[[bytes], int | None]:
    """What the prepare step hashes (hash_input=image): the normalised image that ingest's decode stage
    produces (centre square, 256 px; the default, since decode drops the source bytes) or
    the full source frame. None when decode rejects the file (e.g. TOO_SMALL)."""
    cfg = DecodeConfig()

    def run(data: bytes) -> int | None:
        if source == "source":
            return image_hash_from_bytes(data, kind)
        try:
            return image_hash_from_bytes(decode_image(data, cfg).jpeg, kind)
        except Exception:  # noqa: BLE001 - a decode reject is not a dedup question
            return None

    return run


def measure(kind: str, radii: list[int], limit: int | None = None, source: str = "image") -> dict:
    """Hash originals and every edited copy; return distances for the tables."""
    hash_of = hasher(kind, source)
    photos = coco_photos(limit)
    originals = []
    edited: dict[str, list[int | None]] = {name: [] for name in TRANSFORMS}
    for path in photos:
        data = path.read_bytes()
        originals.append(hash_of(data))
        with Image.open(io.BytesIO(data)) as im:
            im = im.convert("RGB")
            for name, edit in TRANSFORMS.items():
                edited[name].append(hash_of(edit(im)))
    # imagededup groups: original vs each variant; distractors join the distinct set
    rows = [r for r in neardup_manifest() if r["decodable"]]
    by_group: dict[str, int] = {}
    ukb_variants: dict[str, list[tuple[int, int]]] = {}
    distinct = list(originals)
    for r in rows:
        h = hash_of((NEARDUP / r["path"]).read_bytes())
        if r["relation"] == "original":
            by_group[r["group_id"]] = h
            distinct.append(h)
    for r in rows:
        if r["relation"] != "original":
            h = hash_of((NEARDUP / r["path"]).read_bytes())
            ukb_variants.setdefault("ukbench_" + r["relation"], []).append((by_group[r["group_id"]], h))
    o = np.asarray(originals, dtype=np.uint64)
    d_all = np.asarray(distinct, dtype=np.uint64)
    dd = hamming(d_all[:, None], d_all[None, :])
    iu = np.triu_indices(len(d_all), 1)
    distinct_d = dd[iu]
    results = {"kind": kind, "source": source, "n_originals": len(o), "n_distinct": len(d_all), "transforms": {}, "decode_rejected": {}}
    for name, hs in edited.items():
        ok = np.asarray([h is not None for h in hs])
        results["decode_rejected"][name] = int((~ok).sum())
        hs_ok = np.asarray([h for h in hs if h is not None], dtype=np.uint64)
        results["transforms"][name] = hamming(o[ok], hs_ok).tolist()
    for name, pairs in ukb_variants.items():
        a = np.asarray([p[0] for p in pairs], dtype=np.uint64)
        b = np.asarray([p[1] for p in pairs], dtype=np.uint64)
        results["transforms"][name] = hamming(a, b).tolist()
    results["distinct_pair_distances"] = distinct_d.tolist()
    return results


def table(results: dict, radii: list[int], markdown: bool) -> str:
    """Recall per transform at each radius; precision counts pairs of distinct photos as false."""
    distinct = np.asarray(results["distinct_pair_distances"])
    lines = []
    head = ["transform", "n", "median d", "max d"] + [f"R@{r}" for r in radii] + [f"P@{r}" for r in radii]
    if markdown:
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|" + "---|" * len(head))
    else:
        lines.append("  ".join(f"{h:>10}" for h in head))
    for name, ds in results["transforms"].items():
        d = np.asarray(ds)
        if len(d) == 0:  # every copy rejected by decode (e.g. TOO_SMALL)
            continue
        recall = [float(np.mean(d <= r)) for r in radii]
        # precision in a set of the originals + this transform's copies: true pairs found vs
        # all pairs within the radius (false ones are pairs of distinct photos)
        prec = []
        for r in radii:
            tp = int(np.sum(d <= r))
            fp = int(np.sum(distinct <= r))
            prec.append(tp / (tp + fp) if tp + fp else None)
        cells = [name, str(len(d)), f"{np.median(d):.0f}", str(int(d.max()))]
        cells += [f"{x:.2f}" for x in recall] + ["–" if x is None else f"{x:.2f}" for x in prec]
        if markdown:
            lines.append("| " + " | ".join(cells) + " |")
        else:
            lines.append("  ".join(f"{c:>10}" for c in cells))
    lines.append("")
    hist = {r: int(np.sum(distinct <= r)) for r in radii}
    lines.append(
        f"distinct photos: {results['n_distinct']} ({len(distinct)} pairs); pairs within radius: "
        + ", ".join(f"r={r}: {c}" for r, c in hist.items())
        + f"; closest distinct pairs: {sorted(distinct.tolist())[:8]}"
    )
    return "\n".join(lines)


# ------------------------------------------------------------------- the near rule, mirror on/off


def pipeline_hashes(data: bytes, kind: str = "phash") -> tuple[int, int] | None:
    """(hash, mirror hash) as a run takes them: decode's full EXIF-transposed frame. None when
    decode rejects the file (e.g. TOO_SMALL)."""
    try:
        d = decode_image(data, DecodeConfig(), kind, mirror=True)
    except Exception:  # noqa: BLE001 - a decode reject is not a dedup question
        return None
    return hex_to_hash(d.phash), hex_to_hash(d.phash_mirror)


def rule_hashes(kind: str = "phash", limit: int | None = None) -> dict:
    """Hashes of the originals (COCO photos, then the UKBench group originals and distractors)
    and of every edited copy, keyed by the original's index."""
    originals, copies = [], {name: {} for name in TRANSFORMS}
    for k, path in enumerate(coco_photos(limit)):
        data = path.read_bytes()
        originals.append(pipeline_hashes(data, kind))
        with Image.open(io.BytesIO(data)) as im:
            im = im.convert("RGB")
            for name, edit in TRANSFORMS.items():
                copies[name][k] = pipeline_hashes(edit(im), kind)
    rows = [r for r in neardup_manifest() if r["decodable"]]
    group_of: dict[str, int] = {}
    for r in rows:
        if r["relation"] == "original":
            group_of[r["group_id"]] = len(originals)
            originals.append(pipeline_hashes((NEARDUP / r["path"]).read_bytes(), kind))
    for r in rows:
        if r["relation"] not in ("original", "corrupt"):
            copies.setdefault("ukbench_" + r["relation"], {})[group_of[r["group_id"]]] = (
                pipeline_hashes((NEARDUP / r["path"]).read_bytes(), kind))
    return {"originals": originals, "copies": copies, "n_coco": len(coco_photos(limit))}


def run_rule(originals: list, copies: list[tuple[int, tuple[int, int]]], radius: int, mirror: bool) -> tuple[int, int]:
    """The near rule over one delivery (originals + copies): (copies in their original's
    cluster, distinct photos merged with another distinct photo)."""
    rows = [dedup_rules.Row(f"o{k:04d}", h[0], (0, 0, f"o{k:04d}"), h[1] if mirror else None)
            for k, h in enumerate(originals) if h is not None]
    rows += [dedup_rules.Row(f"c{n:05d}", h[0], (1, 0, f"c{n:05d}"), h[1] if mirror else None)
             for n, (_, h) in enumerate(copies)]
    cluster = {d.asset_id: d.cluster_id for d in dedup_rules.near_decisions(rows, [], radius, 256)}
    photo = {f"o{k:04d}": k for k in range(len(originals))} | {f"c{n:05d}": k for n, (k, _) in enumerate(copies)}
    found = sum(1 for n, (k, _) in enumerate(copies)
                if cluster.get(f"c{n:05d}") is not None and cluster.get(f"c{n:05d}") == cluster.get(f"o{k:04d}"))
    photos_in: dict[str, set[int]] = {}
    for aid, cid in cluster.items():
        photos_in.setdefault(cid, set()).add(photo[aid])
    merged = sum(len(p) for p in photos_in.values() if len(p) > 1)
    return found, merged


def rule_table(h: dict, radius: int, markdown: bool) -> str:
    """Recall and photos merged per transform, with and without the mirror hash."""
    head = ["transform", "n", f"recall r={radius}, no mirror", "with mirror", "photos merged, no mirror", "with mirror"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] if markdown else ["  ".join(head)]
    sets = {name: [(k, c) for k, c in sorted(cs.items()) if c is not None] for name, cs in h["copies"].items()}
    sets["all transforms, one delivery"] = [kc for name in TRANSFORMS for kc in sets[name]]
    for name, copies in sets.items():
        if not copies:
            continue
        (f0, m0), (f1, m1) = (run_rule(h["originals"], copies, radius, mirror) for mirror in (False, True))
        cells = [name, str(len(copies)), f"{f0 / len(copies):.2f}", f"{f1 / len(copies):.2f}", str(m0), str(m1)]
        lines.append("| " + " | ".join(cells) + " |" if markdown else "  ".join(f"{c:>12}" for c in cells))
    o = np.asarray([x for x in h["originals"] if x is not None], dtype=np.uint64)
    plain = hamming(o[:, None, 0], o[None, :, 0])
    either = np.minimum.reduce([plain, hamming(o[:, None, 0], o[None, :, 1]), hamming(o[:, None, 1], o[None, :, 0]),
                                hamming(o[:, None, 1], o[None, :, 1])])
    iu = np.triu_indices(len(o), 1)
    self_mirror = hamming(o[:, 0], o[:, 1])
    lines += ["", f"distinct photos: {len(o)} ({len(iu[0])} pairs); closest distinct pairs, plain: "
              f"{sorted(plain[iu].tolist())[:6]}; with the mirror hash: {sorted(either[iu].tolist())[:6]}; "
              f"photos within the radius of their own mirror (symmetric): {int(np.sum(self_mirror <= radius))}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--radii", default="6,8,10,12")
    parser.add_argument("--kind", default="phash", choices=["phash", "dhash"])
    parser.add_argument("--limit", type=int, default=None, help="use only the first N COCO photos")
    parser.add_argument("--input", default="image", choices=["image", "source"], help="normalised image (pipeline default) or source frame")
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--rule", action="store_true", help="the near rule on decode's hashes, mirror on and off")
    parser.add_argument("--radius", type=int, default=8, help="with --rule")
    args = parser.parse_args(argv)
    if args.rule:
        t0 = time.perf_counter()
        h = rule_hashes(args.kind, args.limit)
        print(f"near rule: hash={args.kind} of decode's full frame, radius {args.radius}, {h['n_coco']} COCO photos "
              f"+ UKBench ({time.perf_counter() - t0:.1f}s)")
        print(rule_table(h, args.radius, args.markdown))
        return 0
    radii = [int(x) for x in args.radii.split(",")]
    t0 = time.perf_counter()
    results = measure(args.kind, radii, args.limit, args.input)
    print(f"hash={args.kind}  input={args.input}  originals={results['n_originals']}  ({time.perf_counter() - t0:.1f}s)")
    rejected = {k: v for k, v in results["decode_rejected"].items() if v}
    if rejected:
        print(f"copies rejected by decode before dedup (not counted): {rejected}")
    print(table(results, radii, args.markdown))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
