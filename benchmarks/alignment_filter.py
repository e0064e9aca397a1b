"""The calibrated alignment filter, measured (the numbers in docs/alignment.md).

    python benchmarks/alignment_filter.py simulate [--seeds 100]
        synthetic score mixtures (good and mismatched rows, normal scores): the realised
        false-reject rate of good rows and catch rate of mismatched rows of `calibrate`,
        over seeds, for separated, overlapping and no-power models.
    python benchmarks/alignment_filter.py power [--rows 720] [--steps 100] [--seeds 0,1,2]
        the out-of-fold experiment of tests/pipeline/test_alignment_power.py: a generated
        coloured-shapes corpus with 10 % swapped captions, K=2 cpu-tiny fold models, each row
        scored by the model that never saw it, then `calibrate`; one JSON line per seed with
        the realised rates and the CPU seconds it took.
"""

from __future__ import annotations

import argparse
import io
import json
import resource
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.alignment_filter import auc, calibrate, fold_of, mismatch_pairs  # noqa: E402

SCENARIOS = [  # (name, pi, good mean, good sd, mismatched mean, mismatched sd)
    ("separated", 0.1, 0.5, 0.05, 0.2, 0.05),
    ("overlapping tails", 0.1, 0.5, 0.1, 0.2, 0.1),
    ("weak (d' 1.9)", 0.1, 0.35, 0.08, 0.2, 0.08),
    ("30 % mismatched", 0.3, 0.5, 0.1, 0.2, 0.1),
    ("none mismatched", 0.0, 0.5, 0.1, 0.2, 0.1),
    ("no power", 0.1, 0.3, 0.1, 0.3, 0.1),
]


def simulate(seeds: int, budget: float = 0.02, draws: int = 5) -> None:
    print("| scenario | rows | filters | false rejects: mean / p95 / max | catch: mean |")
    print("|---|---|---|---|---|")
    for name, pi, gm, gs, mm, ms in SCENARIOS:
        for n in (300, 3000):
            frs, catches, filtered = [], [], 0
            for seed in range(seeds):
                rng = np.random.default_rng(seed)
                bad = rng.random(n) < pi
                scores = np.where(bad, rng.normal(mm, ms, n), rng.normal(gm, gs, n))
                cal = calibrate(scores, rng.normal(mm, ms, n * draws), budget)
                rejected = scores < cal.threshold if cal.threshold is not None else np.zeros(n, bool)
                filtered += cal.decision == "filter"
                frs.append(rejected[~bad].mean())
                catches.append(rejected[bad].mean() if bad.any() else np.nan)
            frs = np.array(frs)
            catch = f"{np.nanmean(catches):.2f}" if pi else "-"
            print(f"| {name} | {n} | {filtered / seeds:.0%} | {frs.mean():.3f} / {np.quantile(frs, 0.95):.3f} / "
                  f"{frs.max():.3f} | {catch} |")


def write_shard(url: str, rows) -> str:
    from pipeline import storage

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for key, row in sorted((storage.asset_key(r.asset_id), r) for r in rows):
            meta = json.dumps({"asset_id": row.asset_id, "key": key, "captions": [row.caption]}).encode()
            for name, data in ((f"{key}.jpg", row.image), (f"{key}.json", meta)):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    storage.write_bytes(url, buf.getvalue())
    return url


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def power(rows_n: int, steps: int, seed: int, folds: int = 2, draws: int = 5, budget: float = 0.02) -> dict:
    import torch

    from manifests.shapes import shapes_corpus, swap_captions
    from pipeline.clip import ClipEmbedder, train_clip
    from pipeline.config import ClipConfig, ClipTrainConfig

    torch.set_num_threads(1)
    start = cpu_seconds()
    rows, swapped = swap_captions(shapes_corpus(rows_n, seed), 0.1, seed)
    tmp = tempfile.mkdtemp()
    urls = [write_shard(f"{tmp}/images-000000.tar", rows)]
    matched, mismatched = np.zeros(rows_n), []
    for k in range(folds):
        out = f"{tmp}/clip-fold{k}"
        train_clip(ClipConfig(arch="cpu-tiny", device="cpu"),
                   ClipTrainConfig(max_steps=steps, batch_size=64, warmup_steps=10, lr=1e-3, checkpoint_every=10_000,
                                   progress=False, seed=seed, num_threads=1), urls, out, holdout=(k, folds))
        idx = [i for i, r in enumerate(rows) if fold_of(r.asset_id, folds) == k]
        emb = ClipEmbedder(ClipConfig(arch="cpu-tiny", weights=f"{out}/clip.safetensors", device="cpu"))
        images = emb.embed_images([rows[i].image for i in idx])
        texts = emb.embed_texts([rows[i].caption for i in idx])
        pairs = mismatch_pairs(len(idx), draws, seed * 1000 + k)
        matched[idx] = (images * texts).sum(1)
        mismatched.append((images[pairs[:, 0]] * texts[pairs[:, 1]]).sum(1))
    mismatched = np.concatenate(mismatched)
    bad = np.array([r.asset_id in swapped for r in rows])
    cal = calibrate(matched, mismatched, budget)
    rejected = np.array([cal.rejects(s) for s in matched])
    return {"rows": rows_n, "steps": steps, "seed": seed, "decision": cal.decision, "auc": round(cal.auc, 3),
            "auc_good_rows": round(auc(matched[~bad], mismatched), 3), "pi": round(cal.pi, 3),
            "catch": round(float(rejected[bad].mean()), 3), "false_reject": round(float(rejected[~bad].mean()), 4),
            "expected_false_reject": round(cal.expected_false_reject, 4), "expected_catch": round(cal.expected_catch, 3),
            "cpu_s": round(cpu_seconds() - start, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("simulate")
    s.add_argument("--seeds", type=int, default=100)
    p = sub.add_parser("power")
    p.add_argument("--rows", type=int, default=720)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--seeds", default="0,1,2")
    args = ap.parse_args()
    if args.cmd == "simulate":
        simulate(args.seeds)
    else:
        for seed in [int(x) for x in args.seeds.split(",")]:
            print(json.dumps(power(args.rows, args.steps, seed)), flush=True)


if __name__ == "__main__":
    main()
