"""VQ encode throughput: the Beam `EncodeImages` stage vs a bare batched model loop, same run.

Both paths do the same work (read curated tar shards, JPEG decode, batch, encode, cast to uint16)
on the demo photos normalised to 256 px; the ratio stage/bare shows what Beam batching and per-worker model loading
cost (target >= 0.9). Prints images/s at 256 px on this machine's CPU for cpu-small (and
cm3leon-256 with --cm3leon).

    python benchmarks/vq.py [--model OUT/models/vq.safetensors] [--repeat 3] [--batch-size 16]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def write_inputs(n: int | None, repeat: int, out_dir: str) -> tuple[list[str], int]:
    """The demo photos, normalised by the pipeline's decode, written as curated tar shards."""
    from pipeline.config import DecodeConfig
    from pipeline.stages.decode import decode_image
    from tokenizer.shards import write_store

    paths = sorted((ROOT / "manifests" / "demo" / "images").glob("*.jpg"))[:n]
    base = [decode_image(p.read_bytes(), DecodeConfig(), hash_kind=None).jpeg for p in paths]
    samples = []
    for r in range(repeat):
        for p, data in zip(paths, base):
            key = hashlib.sha256(f"{r}:{p.name}".encode()).hexdigest()[:16]
            samples.append((key, data, {"asset_id": key, "key": key, "captions": [], "license_id": "x"}))
    return write_store(samples, out_dir, per_shard=128), len(samples)


def bare_loop(model, shards: list[str], batch_size: int) -> float:
    """The floor: read shards, decode, batch, encode, cast; no framework."""
    from tokenizer.shards import iter_samples

    t0 = time.perf_counter()
    n = 0
    batch: list[bytes] = []

    def flush() -> int:
        arrays = np.stack([np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in batch])
        return len(model.encode_codes(arrays).astype(np.uint16))

    for sample in iter_samples(shards):
        batch.append(sample.jpeg)
        if len(batch) == batch_size:
            n += flush()
            batch = []
    if batch:
        n += flush()
    return n / (time.perf_counter() - t0)


def _read(url: str):
    from tokenizer.shards import iter_shard

    for s in iter_shard(url):
        yield s.key, s.jpeg


def stage(model_path: str, shards: list[str], n_images: int, batch_size: int, threads: int | None) -> float:
    """The same work through Beam: shard URLs -> read -> EncodeImages, DirectRunner, one worker."""
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions

    from pipeline.stages.encode import EncodeConfig, EncodeImages

    t0 = time.perf_counter()
    with beam.Pipeline(options=PipelineOptions(["--direct_num_workers=1"])) as p:
        pairs = p | beam.Create(shards) | beam.FlatMap(_read)
        kept, _ = pairs | EncodeImages(EncodeConfig(model_path=model_path, batch_size=batch_size, num_threads=threads))
        kept | beam.combiners.Count.Globally()
    return n_images / (time.perf_counter() - t0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="vq.safetensors; default: a randomly initialised cpu-small (speed does not depend on weights)")
    ap.add_argument("--images", type=int, default=None, help="demo photos to use (default all)")
    ap.add_argument("--repeat", type=int, default=4, help="times each photo is encoded (amortises pipeline start-up)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1, help="torch threads for both paths (1 is fastest on a loaded machine)")
    ap.add_argument("--cm3leon", action="store_true", help="also time cm3leon-256 (slow on CPU)")
    args = ap.parse_args()

    import torch

    from tokenizer.vq.config import get_config
    from tokenizer.vq.model import VQModel, load_vq, save_vq

    if args.threads:
        torch.set_num_threads(args.threads)
    tmp = tempfile.mkdtemp(prefix="bench-vq-")
    model_path = args.model or save_vq(VQModel(get_config("cpu-small")).eval(), f"{tmp}/vq.safetensors")
    model = load_vq(model_path)
    shards, n_images = write_inputs(args.images, args.repeat, f"{tmp}/curated")
    print(f"model {model.cfg.name} (f{model.cfg.downsample_factor}, {model.cfg.codebook_size} codes), "
          f"{n_images} images at 256 px in {len(shards)} shards, batch {args.batch_size}, torch threads {torch.get_num_threads()}")
    bare_loop(model, shards[:1], args.batch_size)  # warm-up
    # interleave the two so drift in machine load hits both alike; keep the best of each
    bare, staged = [], []
    for _ in range(2):
        bare.append(bare_loop(model, shards, args.batch_size))
        staged.append(stage(model_path, shards, n_images, args.batch_size, args.threads))
    b, s = max(bare), max(staged)
    print(f"bare batched loop : {b:8.1f} images/s")
    print(f"EncodeImages stage: {s:8.1f} images/s  (includes pipeline start-up)")
    print(f"ratio stage / bare: {s / b:8.2f}   (target >= 0.90)")
    if args.cm3leon:
        big_path = save_vq(VQModel(get_config("cm3leon-256")).eval(), f"{tmp}/big/vq.safetensors")
        big = load_vq(big_path)
        bare_loop(big, shards[:1], 2)
        print(f"cm3leon-256 bare  : {bare_loop(big, shards[:1], args.batch_size):8.1f} images/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
