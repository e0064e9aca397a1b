"""CLIP stage and retrieval index benchmarks, printed as ratios.

    python benchmarks/clip.py throughput [--n 512] [--batch 64] [--threads 2]
        ScoreAlignment (Beam DirectRunner, in-process) vs a bare batched open_clip loop doing
        the same work (decode, preprocess, image + caption embeddings, scores) on the same
        model, batch size and torch threads. Target: ratio >= 0.9.
    python benchmarks/clip.py index [--n 100000] [--dim 256] [--queries 2000]
        recall@10 of the approximate index `build_index` picks beyond exact_max_vectors
        (IVF-flat; HNSW too) vs exact inner-product search on generated clustered vectors,
        and queries/s of each, plus CM3leon neighbour selection queries/s.
    python benchmarks/clip.py auc [--minutes 4] [--holdout 0.2] [--weights DIR]
        trains cpu-tiny on the demo photos (or loads DIR/clip.safetensors) and prints the
        AUC of matched vs shuffled captions (the number in docs/alignment.md).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline import storage  # noqa: E402
from pipeline.clip import ClipEmbedder, train_clip  # noqa: E402
from pipeline.config import AlignConfig, ClipConfig, ClipTrainConfig  # noqa: E402

CAPTIONS = (REPO / "manifests/demo/coco.jsonl", Path("/work/shared/data/coco_mini_captions/manifest.jsonl"))


def demo_samples() -> list[tuple[str, bytes, list[str]]]:
    """(asset_id, 256² JPEG as the pipeline's decode normalises it, captions) for the demo photos."""
    from pipeline.config import DecodeConfig
    from pipeline.stages.decode import decode_image

    source = next(p for p in CAPTIONS if p.exists())
    out = []
    for line in source.read_text().splitlines():
        row = json.loads(line)
        path = REPO / "manifests/demo/images" / Path(row.get("uri") or row.get("path") or row["file_name"]).name
        if not path.exists() or not row.get("captions"):
            continue
        jpeg = decode_image(path.read_bytes(), DecodeConfig(), hash_kind=None).jpeg
        out.append((str(row.get("asset_id") or path.stem), jpeg, list(row["captions"])))
    return sorted(out)


# ------------------------------------------------------------------------------ throughput


def bare_loop(cfg: ClipConfig, samples) -> float:
    """The floor: load once, then batches of decode → preprocess → encode → score."""
    from pipeline.clip import caption_scores, document_embedding, reduce_scores, text_embedding

    start = time.perf_counter()
    emb = ClipEmbedder(cfg)
    for i in range(0, len(samples), cfg.batch_size):
        chunk = samples[i:i + cfg.batch_size]
        image_embs = emb.embed_pixels([emb.prepare_image(jpg) for _, jpg, _ in chunk])
        caption_embs = emb.embed_texts([c for _, _, caps in chunk for c in caps])
        offset = 0
        for (_, _, caps), image_emb in zip(chunk, image_embs):
            embs = caption_embs[offset:offset + len(caps)]
            offset += len(caps)
            reduce_scores(caption_scores(image_emb, embs), "max")
            document_embedding(image_emb, text_embedding(embs)).astype(np.float16)
    return time.perf_counter() - start


class _MakeAsset:
    """Builds the stage's input inside the pipeline, as an upstream stage would: `beam.Create`
    of 10 MB of assets would instead pickle and bz2 them into the job graph (seconds)."""

    def __init__(self, folder: str):
        self.folder = folder

    def __call__(self, i: int):
        from manifests.schema import ManifestEntry
        from pipeline.records import Asset

        meta = json.loads(Path(f"{self.folder}/{i}.json").read_text())
        caps = tuple(meta["captions"])
        return Asset(entry=ManifestEntry(asset_id=f"{meta['asset_id']}-{i}", uri="x", captions=caps, license_id="x"),
                     manifest_uri="m", manifest_row=i, image=Path(f"{self.folder}/{i}.jpg").read_bytes(), captions=caps)


def stage_run(cfg: ClipConfig, samples, folder: str) -> float:
    """ScoreAlignment on the in-process DirectRunner, end to end (graph, load, run)."""
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions

    from pipeline.stages.align import ScoreAlignment

    start = time.perf_counter()
    options = PipelineOptions(["--direct_running_mode=in_memory", "--direct_num_workers=1"])
    p = beam.Pipeline(options=options)
    _ = (p | beam.Create(range(len(samples)), reshuffle=False) | beam.Map(_MakeAsset(folder))
         | beam.BatchElements(min_batch_size=cfg.batch_size, max_batch_size=cfg.batch_size)
         | ScoreAlignment(AlignConfig(clip=cfg)))
    result = p.run()
    result.wait_until_finish()
    elapsed = time.perf_counter() - start
    kept = {c.key.metric.name: c.committed for c in result.metrics().query()["counters"]
            if c.key.metric.namespace == "clip"}
    assert kept.get("kept") == len(samples), kept
    return elapsed


def throughput(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    base = demo_samples()
    samples = [base[i % len(base)] for i in range(args.n)]
    cfg = ClipConfig(arch=args.arch, weights=args.weights, device=args.device, batch_size=args.batch,
                     num_threads=args.threads)
    bare, stage = [], []
    with tempfile.TemporaryDirectory() as folder:
        for i, (asset_id, jpg, caps) in enumerate(samples):
            Path(f"{folder}/{i}.jpg").write_bytes(jpg)
            Path(f"{folder}/{i}.json").write_text(json.dumps({"asset_id": asset_id, "captions": caps}))
        for _ in range(args.repeat):  # interleaved, best of: the machine is shared and noisy
            bare.append(bare_loop(cfg, samples))
            stage.append(stage_run(cfg, samples, folder))
    b, s = min(bare), min(stage)
    print(f"CLIP {args.arch}: {args.n} images x {len(samples[0][2])} captions, batch {args.batch}, "
          f"{args.threads} threads, device {args.device}")
    print(f"  bare open_clip loop : {args.n / b:8.1f} images/s  ({b:.2f} s)")
    print(f"  ScoreAlignment stage: {args.n / s:8.1f} images/s  ({s:.2f} s)")
    print(f"  ratio stage/bare    : {b / s:8.3f}  (target >= 0.9)")


# ----------------------------------------------------------------------------------- index


def clustered(n: int, dim: int, seed: int) -> np.ndarray:
    """Unit vectors around 1,000 centres: closer to real embeddings than uniform noise."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(1000, dim)).astype(np.float32)
    x = centres[rng.integers(0, 1000, n)] + rng.normal(scale=0.6, size=(n, dim)).astype(np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def index_bench(args) -> None:
    import faiss

    from pipeline.retrieval import IndexConfig, NeighbourConfig, build_index, load_index, select_neighbours

    faiss.omp_set_num_threads(args.threads)
    vecs = clustered(args.n, args.dim, 0)
    queries = clustered(args.queries, args.dim, 1)
    keys = [f"{i:016x}" for i in range(args.n)]
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        results = {}
        for name, cfg in (("flat (exact)", IndexConfig(kind="flat")),
                          ("auto", IndexConfig(exact_max_vectors=args.n // 2)),
                          ("hnsw", IndexConfig(kind="hnsw", deterministic=False))):
            t0 = time.perf_counter()
            info = build_index(vecs, keys, f"{tmp}/{name.split()[0]}", cfg)
            build_s = time.perf_counter() - t0
            loaded = load_index(f"{tmp}/{name.split()[0]}")
            loaded.index.search(queries[:10], 10)
            t0 = time.perf_counter()
            _, found = loaded.index.search(queries, 10)
            search_s = time.perf_counter() - t0
            results[name] = found
            rows[name] = (info["kind"], build_s, args.queries / search_s, info["index_bytes"])
            if name == "auto":
                t0 = time.perf_counter()
                select_neighbours(loaded, queries, [f"q{i}" for i in range(args.queries)], [None] * args.queries,
                                  NeighbourConfig(k=2))
                rows["neighbours"] = args.queries / (time.perf_counter() - t0)
    exact = results["flat (exact)"]
    print(f"index: {args.n} clustered vectors, dim {args.dim}, {args.queries} queries, {args.threads} threads")
    for name in ("flat (exact)", "auto", "hnsw"):
        kind, build_s, qps, nbytes = rows[name]
        recall = np.mean([len(set(exact[i]) & set(results[name][i])) / 10 for i in range(args.queries)])
        print(f"  {name:13s} {kind:9s} build {build_s:6.1f} s  {qps:9.0f} q/s  {nbytes / 2**20:7.1f} MiB  "
              f"recall@10 {recall:.3f}  speed-up vs exact {qps / rows['flat (exact)'][2]:.1f}x")
    print(f"  CM3leon neighbour selection (k=2, rules) on the auto index: {rows['neighbours']:.0f} q/s")


# ------------------------------------------------------------------------------------- auc


def auc(pos: np.ndarray, neg: np.ndarray) -> float:
    diff = pos[:, None] - neg[None, :]
    return float((diff > 0).mean() + 0.5 * (diff == 0).mean())


def evaluate(weights: str, samples, label: str) -> None:
    from pipeline.clip import caption_scores, reduce_scores

    emb = ClipEmbedder(ClipConfig(arch="cpu-tiny", weights=weights, device="cpu"))
    images = emb.embed_images([jpg for _, jpg, _ in samples])
    caps = [emb.embed_texts(c) for _, _, c in samples]
    n = len(samples)
    shift = n // 2  # every image gets the captions of a different image
    first_m = np.array([images[i] @ caps[i][0] for i in range(n)])
    first_s = np.array([images[i] @ caps[(i + shift) % n][0] for i in range(n)])
    max_m = np.array([reduce_scores(caption_scores(images[i], caps[i]), "max") for i in range(n)])
    max_s = np.array([reduce_scores(caption_scores(images[i], caps[(i + shift) % n]), "max") for i in range(n)])
    print(f"  {label:26s} n={n:3d}  AUC one caption {auc(first_m, first_s):.3f}   "
          f"AUC filter score (max of 5) {auc(max_m, max_s):.3f}   "
          f"mean score matched {max_m.mean():.3f} / shuffled {max_s.mean():.3f}")


def auc_bench(args) -> None:
    samples = demo_samples()
    with tempfile.TemporaryDirectory() as tmp:
        splits = [("in-sample (all photos)", samples, samples)]
        if args.holdout:
            cut = int(len(samples) * (1 - args.holdout))
            splits.append((f"held-out ({len(samples) - cut} photos)", samples[:cut], samples[cut:]))
        for label, train, test in splits:
            weights = args.weights and f"{args.weights}/clip.safetensors"
            if not weights or label.startswith("held"):
                shard = _write_shard(storage.join(tmp, label[:4]), train)
                out = storage.join(tmp, label[:4], "model")
                summary = train_clip(ClipConfig(arch="cpu-tiny", device=args.device),
                                     ClipTrainConfig(max_steps=args.steps, max_minutes=args.minutes, lr=1e-3,
                                                     num_threads=args.threads, progress=True),
                                     [shard], out)
                print(f"  trained on {len(train)} photos: {summary['steps']} steps in {summary['seconds']} s, "
                      f"loss {summary['first_loss']:.2f} -> {summary['final_loss']:.2f}")
                weights = f"{out}/clip.safetensors"
            evaluate(weights, test, label)


def _write_shard(folder: str, samples) -> str:
    """(asset_id, jpeg, captions) as the curated store `folder` (one shard), through the store's
    writer; returns the shard's URL."""
    from tokenizer.shards import write_store

    keyed = [(storage.asset_key(asset_id), jpg, {"asset_id": asset_id, "captions": caps, "license_id": "x",
                                                 "cluster_id": None}) for asset_id, jpg, caps in samples]
    return write_store(keyed, folder, per_shard=len(keyed))[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    t = sub.add_parser("throughput")
    t.add_argument("--n", type=int, default=512)
    t.add_argument("--batch", type=int, default=64)
    t.add_argument("--threads", type=int, default=2)
    t.add_argument("--arch", default="cpu-tiny")
    t.add_argument("--weights", default=None)
    t.add_argument("--device", default="cpu")
    t.add_argument("--repeat", type=int, default=3)
    i = sub.add_parser("index")
    i.add_argument("--n", type=int, default=100_000)
    i.add_argument("--dim", type=int, default=256)
    i.add_argument("--queries", type=int, default=2000)
    i.add_argument("--threads", type=int, default=2)
    a = sub.add_parser("auc")
    a.add_argument("--minutes", type=float, default=4.0)
    a.add_argument("--steps", type=int, default=1000)
    a.add_argument("--holdout", type=float, default=0.2)
    a.add_argument("--weights", default=None, help="folder with clip.safetensors (skips in-sample training)")
    a.add_argument("--threads", type=int, default=2)
    a.add_argument("--device", default="cpu")
    args = parser.parse_args()
    {"throughput": throughput, "index": index_bench, "auc": auc_bench}[args.what](args)


if __name__ == "__main__":
    main()
