"""Semantic dedup quality with the run's own CLIP: recall per transform and distinct photos
merged, per `semantic_threshold`.

Trains the CLIP a demo run trains (cpu-tiny, `clip_train` of manifests/demo/demo.yaml: 200
steps, batch 64) on the 167 demo photos with their COCO captions (or loads `--weights
DIR/clip.safetensors`), embeds each photo and its edited copies (benchmarks/dedup_quality.py's
transforms, normalised by the pipeline's decode as the align step sees them), and runs the
semantic rule itself (`dedup_rules.semantic_decisions`, single linkage) per transform on one
delivery of originals + copies. Recall: copies put in their original's cluster. Photos merged:
distinct photos that share a cluster with another distinct photo (precision; 0 is the bar).

    python benchmarks/dedup_semantic.py [--weights DIR [--arch NAME]] [--thresholds 0.9,...] [--markdown]

With `--weights` (and `--arch` for another architecture than cpu-tiny, e.g. a pretrained
open_clip model's config) it measures the CLIP a user brings instead.
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from clip import _write_shard, demo_samples  # noqa: E402  (benchmarks/clip.py: the demo photos as the store)
from dedup_quality import TRANSFORMS, coco_photos  # noqa: E402

from pipeline import dedup_rules  # noqa: E402
from pipeline.config import ClipConfig, ClipTrainConfig, DecodeConfig  # noqa: E402
from pipeline.stages.decode import decode_image  # noqa: E402

SET = ("hflip", "crop_5pct", "crop_10pct", "rotate_5deg", "resize_50", "jpeg_q15", "caption_bar", "rotate_90")


def train(out: str, steps: int, seed: int) -> str:
    """The demo's CLIP: cpu-tiny trained on the demo photos; returns the weights' path."""
    from pipeline.clip import train_clip

    shard = _write_shard(f"{out}/store", demo_samples())
    summary = train_clip(ClipConfig(arch="cpu-tiny", device="cpu"),
                         ClipTrainConfig(max_steps=steps, batch_size=64, seed=seed, progress=False),
                         [shard], f"{out}/model")
    print(f"trained cpu-tiny: {summary['steps']} steps, loss {summary['first_loss']:.2f} -> "
          f"{summary['final_loss']:.2f}")
    return f"{out}/model/clip.safetensors"


def embeddings(weights: str, limit: int | None, arch: str = "cpu-tiny") -> tuple[np.ndarray, dict[str, dict[int, np.ndarray]]]:
    """Image embeddings of the originals and of each transform's copies (by original index)."""
    from pipeline.clip import ClipEmbedder

    emb = ClipEmbedder(ClipConfig(arch=arch, weights=weights, device="cpu"))
    cfg = DecodeConfig()
    originals, copies = [], {name: {} for name in SET}
    for k, path in enumerate(coco_photos(limit)):
        data = path.read_bytes()
        originals.append(decode_image(data, cfg).jpeg)
        with Image.open(io.BytesIO(data)) as im:
            im = im.convert("RGB")
            for name in SET:
                try:
                    copies[name][k] = decode_image(TRANSFORMS[name](im), cfg).jpeg
                except Exception:  # noqa: BLE001 - a decode reject is not a dedup question
                    continue
    out = {name: dict(zip(c, emb.embed_images(list(c.values())))) for name, c in copies.items()}
    return emb.embed_images(originals), out


def run_rule(originals: np.ndarray, copies: dict[int, np.ndarray], threshold: float) -> tuple[int, int]:
    """(copies in their original's cluster, distinct photos merged with another distinct photo)."""
    rows = [dedup_rules.Row(f"o{k:04d}", v, (0, 0, f"o{k:04d}")) for k, v in enumerate(originals)]
    rows += [dedup_rules.Row(f"c{k:04d}", v, (1, 0, f"c{k:04d}")) for k, v in copies.items()]
    cluster = {d.asset_id: d.cluster_id for d in dedup_rules.semantic_decisions(rows, threshold)}
    found = sum(1 for k in copies if cluster.get(f"c{k:04d}") is not None
                and cluster.get(f"c{k:04d}") == cluster.get(f"o{k:04d}"))
    photos: dict[str, set[int]] = {}
    for aid, cid in cluster.items():
        photos.setdefault(cid, set()).add(int(aid[1:]))
    return found, sum(len(p) for p in photos.values() if len(p) > 1)


def table(originals: np.ndarray, copies: dict[str, dict[int, np.ndarray]], thresholds: list[float],
          markdown: bool) -> str:
    head = ["transform", "n", "median cos"] + [f"R@{t}" for t in thresholds] + [f"merged@{t}" for t in thresholds]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] if markdown else ["  ".join(head)]
    for name, c in copies.items():
        cos = np.array([float(originals[k] @ v) for k, v in c.items()])
        results = [run_rule(originals, c, t) for t in thresholds]
        cells = [name, str(len(c)), f"{np.median(cos):.3f}"]
        cells += [f"{f / len(c):.2f}" for f, _ in results] + [str(m) for _, m in results]
        lines.append("| " + " | ".join(cells) + " |" if markdown else "  ".join(f"{x:>10}" for x in cells))
    sim = originals @ originals.T
    iu = np.triu_indices(len(originals), 1)
    top = np.sort(sim[iu])[::-1]
    lines += ["", f"distinct photos: {len(originals)} ({len(top)} pairs); highest cosines between distinct photos: "
              f"{[round(float(x), 3) for x in top[:6]]}; median {np.median(top):.3f}; "
              + ", ".join(f"pairs >= {t}: {int(np.sum(top >= t))}" for t in thresholds)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", default=None, help="a folder with clip.safetensors (else train the demo's)")
    parser.add_argument("--arch", default="cpu-tiny", help="with --weights: the CLIP's architecture (ClipConfig.arch)")
    parser.add_argument("--steps", type=int, default=200, help="training steps (the demo's clip_train.max_steps)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--limit", type=int, default=None, help="use only the first N COCO photos")
    parser.add_argument("--thresholds", default="0.9,0.95,0.97,0.98,0.99,0.995")
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args(argv)
    thresholds = [float(x) for x in args.thresholds.split(",")]
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        weights = f"{args.weights}/clip.safetensors" if args.weights else train(tmp, args.steps, args.seed)
        originals, copies = embeddings(weights, args.limit, args.arch if args.weights else "cpu-tiny")
    print(f"semantic rule: CLIP image cosine, {args.arch if args.weights else 'cpu-tiny'} "
          f"({args.weights or 'trained here'}), "
          f"{len(originals)} COCO photos ({time.perf_counter() - t0:.0f}s)")
    print(table(originals, copies, thresholds, args.markdown))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
