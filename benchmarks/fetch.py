"""HTTP ingest side by side with img2dataset: images/s, the ratio, and peak RSS, in one run.

Both tools fetch the same N rows from the same loopback HTTP server (tests/loopback.py,
in a process of its own, keep-alive on) serving the demo's COCO photos, with 0 ms and 50 ms
added per request (50 ms is a typical object-store first-byte latency), 2 processes each,
and write 256 px centre crops at JPEG quality 95. img2dataset is installed into a venv of
its own (under the temp folder, reused across runs) from the package registry if missing.

Our side is `curate run --until curated` with alignment and dedup off (as the issue's
baseline), doing the rest of its ingest work: manifest validation, the license gate, sha256,
the opt-out (TDM) scan, decode + normalise, the staged records, the store and the ledger.
img2dataset's side: its downloader with default threads (256 per process), sha256 on.

    python benchmarks/fetch.py [--rows 10000] [--latency-ms 0 50] [--workers 2]

Each tool runs as a CLI subprocess; peak RSS is sampled over its process tree.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
IMAGES = ROOT / "manifests" / "demo" / "images"
sys.path.insert(0, str(ROOT / "tests"))  # the loopback server the fetch tests use

from loopback import serve_forever  # noqa: E402

I2D_VENV = Path(tempfile.gettempdir()) / "cm3curate-bench-img2dataset"


def img2dataset_bin() -> Path:
    exe = I2D_VENV / "bin" / "img2dataset"
    if not exe.exists():
        print(f"installing img2dataset into {I2D_VENV} (once)", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(I2D_VENV)], check=True)
        subprocess.run([str(I2D_VENV / "bin" / "pip"), "install", "-q", "img2dataset"], check=True)
    return exe


class TreeRss:
    """Peak RSS of a process and its descendants, sampled every 50 ms."""

    def __init__(self, pid: int):
        self.root = psutil.Process(pid)
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(0.05):
            try:
                procs = [self.root, *self.root.children(recursive=True)]
            except psutil.NoSuchProcess:
                return
            total = 0
            for proc in procs:
                try:
                    total += proc.memory_info().rss
                except psutil.NoSuchProcess:
                    pass
            self.peak = max(self.peak, total)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def timed(cmd: list[str], cwd: Path, log: Path) -> tuple[float, int, float]:
    """(wall seconds, peak RSS of the tree, CPU seconds of the tree) of one CLI run."""
    with log.open("w") as handle:
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=handle, stderr=subprocess.STDOUT)
        rss = TreeRss(proc.pid)
        _, status, usage = os.wait4(proc.pid, 0)  # usage includes the children it waited for
        proc.returncode = os.waitstatus_to_exitcode(status)
        seconds = time.perf_counter() - started
        peak = rss.stop()
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[0]} failed ({proc.returncode}); see {log}")
    return seconds, peak, usage.ru_utime + usage.ru_stime


def write_inputs(folder: Path, base_url: str, rows: int) -> tuple[Path, Path]:
    files = sorted(IMAGES.glob("*.jpg"))
    manifest, urls = folder / "manifest.jsonl", folder / "urls.csv"
    with manifest.open("w") as m, urls.open("w") as u:
        u.write("url,caption\n")
        for i in range(rows):
            url = f"{base_url}/{files[i % len(files)].name}?row={i}"  # every row its own URL
            caption = f"benchmark photo number {i}"
            m.write(json.dumps({"asset_id": f"bench-{i:08d}", "uri": url, "caption": caption,
                                "license_id": "CC-BY-2.0", "allowed_uses": ["ml-training"]}) + "\n")
            u.write(f"{url},{caption}\n")
    return manifest, urls


def run_ours(folder: Path, manifest: Path, base_url: str, workers: int) -> tuple[float, int, float, int]:
    config = folder / "ours.yaml"
    config.write_text(json.dumps({
        "manifests": [str(manifest)], "policy": str(ROOT / "manifests" / "demo" / "policy.yaml"),
        "fetch": {"allowed_roots": [base_url + "/"]},
        "decode": {"resolution": 256, "jpeg_quality": 95},
        "dedup": {"exact": False, "near": False}, "align": {"enabled": False},
        "beam": {"direct_num_workers": workers, "direct_running_mode": "multi_processing"},
    }))
    out = folder / "ours-out"
    seconds, peak, cpu = timed([str(Path(sys.executable).parent / "curate"), "run", "--config", str(config),
                                "--out", str(out), "--until", "curated"], folder, folder / "ours.log")
    kept = sum(s == "kept" for s in pq.read_table(out / "ledger", columns=["status"]).column("status").to_pylist())
    return seconds, peak, cpu, kept


def run_img2dataset(folder: Path, urls: Path, workers: int) -> tuple[float, int, float, int]:
    out = folder / "i2d-out"
    seconds, peak, cpu = timed([str(img2dataset_bin()), "--url_list", str(urls), "--input_format", "csv",
                           "--url_col", "url", "--caption_col", "caption", "--output_folder", str(out),
                           "--output_format", "webdataset", "--processes_count", str(workers),
                           "--image_size", "256", "--resize_mode", "center_crop", "--encode_quality", "95",
                           "--distributor", "multiprocessing", "--enable_wandb", "False",
                           "--number_sample_per_shard", "1000"], folder, folder / "i2d.log")
    ok = sum(json.loads(p.read_text())["successes"] for p in out.glob("*_stats.json"))
    return seconds, peak, cpu, ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--latency-ms", type=float, nargs="+", default=[0.0, 50.0])
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    img2dataset_bin()
    ctx = multiprocessing.get_context("spawn")
    print(f"{args.rows} rows, {args.workers} processes each, 256 px centre crop, q95")
    print(f"{'latency':>8} {'img2dataset img/s':>18} {'ours img/s':>11} {'ratio':>6} "
          f"{'i2d RSS MiB':>12} {'ours RSS MiB':>13} {'i2d CPU ms/img':>15} {'ours CPU ms/img':>16} "
          f"{'i2d ok':>7} {'ours kept':>9}")
    for latency in args.latency_ms:
        ports = ctx.Queue()
        with tempfile.TemporaryDirectory(prefix="bench-fetch-") as tmp:
            server = ctx.Process(target=serve_forever, args=(str(IMAGES), latency / 1000, ports), daemon=True)
            server.start()
            try:
                base_url = f"http://127.0.0.1:{ports.get(timeout=30)}"
                folder = Path(tmp)
                manifest, urls = write_inputs(folder, base_url, args.rows)
                i2d_s, i2d_rss, i2d_cpu, i2d_ok = run_img2dataset(folder, urls, args.workers)
                our_s, our_rss, our_cpu, our_kept = run_ours(folder, manifest, base_url, args.workers)
            finally:
                server.terminate()
        i2d_rate, our_rate = i2d_ok / i2d_s, our_kept / our_s
        print(f"{latency:>6.0f}ms {i2d_rate:>18.1f} {our_rate:>11.1f} {our_rate / i2d_rate:>5.2f}x "
              f"{i2d_rss / 2**20:>12.0f} {our_rss / 2**20:>13.0f} {1000 * i2d_cpu / i2d_ok:>15.2f} "
              f"{1000 * our_cpu / our_kept:>16.2f} {i2d_ok:>7} {our_kept:>9}", flush=True)


if __name__ == "__main__":
    main()
