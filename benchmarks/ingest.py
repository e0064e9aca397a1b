"""Ingest throughput of the curated phase vs a bare decode+resize+crop loop, and peak RSS.

Both sides use the same images (the demo's COCO photos, repeated under new asset ids),
the same number of worker processes and the same machine, in one run, so the printed
ratio is meaningful even on a noisy machine. Peak RSS is sampled over the whole process
tree (the Beam workers included) at N rows and at 10x N rows.

    python benchmarks/ingest.py [--rows 3000] [--workers 2] [--scale 10]
"""

from __future__ import annotations

import argparse
import io
import json
import math
import multiprocessing
import os
import tempfile
import threading
import time
from pathlib import Path

import psutil
from PIL import Image

from pipeline.config import AlignConfig, BeamConfig, CuratedConfig, DedupConfig, FetchConfig, RunConfig
from pipeline.run import run

ROOT = Path(__file__).resolve().parents[1]
IMAGES = ROOT / "manifests" / "demo" / "images"


def bare_decode(path: str, size: int = 256) -> int:
    """The floor: read, draft-decode, RGB, shorter-side resize + centre crop.

    The resize + crop is the same single resample of the centre square that the decode
    stage does (a full-frame resize followed by a crop costs ~40 % more per image), so the
    ratio measures the pipeline's overhead, not a difference in the image work.
    """
    with open(path, "rb") as handle:
        data = handle.read()
    img = Image.open(io.BytesIO(data))
    w, h = img.size
    short = min(w, h)
    img.draft("RGB", (math.ceil(w * size / short), math.ceil(h * size / short)))
    img = img.convert("RGB")
    w, h = img.size
    side = min(w, h)
    left, top = (w - side) / 2, (h - side) / 2
    img = img.resize((size, size), Image.Resampling.BICUBIC, box=(left, top, left + side, top + side), reducing_gap=3.0)
    return len(img.tobytes())


def make_manifest(folder: Path, rows: int) -> Path:
    files = sorted(IMAGES.glob("*.jpg"))
    path = folder / f"bench-{rows}.jsonl"
    with path.open("w") as handle:
        for i in range(rows):
            handle.write(json.dumps({
                "asset_id": f"bench-{i:08d}", "uri": str(files[i % len(files)]),
                "caption": f"benchmark photo number {i}", "license_id": "CC-BY-2.0",
                "allowed_uses": ["ml-training"],
            }) + "\n")
    return path


class PeakRss:
    """Samples the RSS of this process and all its children every 50 ms."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            total = 0
            for proc in [me, *me.children(recursive=True)]:
                try:
                    total += proc.memory_info().rss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)
            time.sleep(0.05)

    def __enter__(self) -> "PeakRss":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def pipeline_run(folder: Path, rows: int, workers: int) -> tuple[float, int, int]:
    manifest = make_manifest(folder, rows)
    policy = folder / "policy.yaml"
    policy.write_text("as_of: '2026-01-01'\nallowed_licenses: [CC-BY-2.0]\n")
    cfg = RunConfig(
        manifests=(str(manifest),), policy=str(policy), out=str(folder / f"out-{rows}"),
        fetch=FetchConfig(allowed_roots=(str(IMAGES),)), curated=CuratedConfig(samples_per_shard=1000),
        # rows reuse the same photos, so dedup would (rightly) drop them; CLIP is measured in clip.py
        dedup=DedupConfig(exact=False, near=False), align=AlignConfig(enabled=False),
        beam=BeamConfig(direct_num_workers=workers, direct_running_mode="multi_processing"),
    )
    with PeakRss() as rss:
        started = time.perf_counter()
        report = run(cfg, until="curated")
        seconds = time.perf_counter() - started
    return seconds, report.summary.kept, rss.peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=3000, help="manifest rows for the throughput run")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--scale", type=int, default=10, help="RSS check at rows * scale")
    parser.add_argument("--skip-scale", action="store_true", help="skip the large RSS run")
    args = parser.parse_args()

    files = sorted(str(p) for p in IMAGES.glob("*.jpg"))
    paths = [files[i % len(files)] for i in range(args.rows)]
    with multiprocessing.get_context("spawn").Pool(args.workers) as pool:
        pool.map(bare_decode, paths[: args.workers * 4])  # warm up the workers
        started = time.perf_counter()
        pool.map(bare_decode, paths, chunksize=16)
        bare_s = time.perf_counter() - started

    with tempfile.TemporaryDirectory() as tmp:
        pipe_s, kept, rss_small = pipeline_run(Path(tmp), args.rows, args.workers)
        assert kept == args.rows, f"expected every row kept, got {kept}"
        rss_big = big_s = None
        if not args.skip_scale:
            big_s, kept_big, rss_big = pipeline_run(Path(tmp), args.rows * args.scale, args.workers)
            assert kept_big == args.rows * args.scale

    bare_ips, pipe_ips = args.rows / bare_s, args.rows / pipe_s
    print(f"images: {args.rows}   workers: {args.workers}   cpu cores: {os.cpu_count()}")
    print(f"bare decode+resize+crop loop : {bare_ips:8.1f} images/s ({bare_s:.1f} s)")
    print(f"curated phase (Beam, end-to-end incl. startup, tar+Parquet+ledger writes): "
          f"{pipe_ips:8.1f} images/s ({pipe_s:.1f} s)")
    print(f"ratio pipeline / bare        : {pipe_ips / bare_ips:8.2f}   (target >= 0.7)")
    print(f"peak RSS at {args.rows:>7} rows  : {rss_small / 2**20:8.0f} MiB (process tree)")
    if big_s is not None:
        big = args.rows * args.scale
        print(f"curated phase at {big} rows  : {big / big_s:8.1f} images/s ({big_s:.1f} s); "
              f"ratio vs bare {big / big_s / bare_ips:.2f} (startup amortised)")
        # the cost of one more image: what the two runs differ by, over the rows they differ by
        marginal = (big - args.rows) / (big_s - pipe_s)
        print(f"marginal throughput           : {marginal:8.1f} images/s; ratio vs bare {marginal / bare_ips:.2f} "
              f"(fixed cost per run: {pipe_s - args.rows / marginal:.1f} s)")
    if rss_big is not None:
        print(f"peak RSS at {args.rows * args.scale:>7} rows  : {rss_big / 2**20:8.0f} MiB "
              f"(ratio {rss_big / rss_small:.2f} for {args.scale}x rows; flat = ~1)")


if __name__ == "__main__":
    main()
