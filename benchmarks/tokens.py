"""Throughput of the `tokens` step (Beam) vs building the same sequences in a bare loop.

Both sides start from the same synthetic run folder (curated metadata with real demo captions,
random VQ codes at 32 x 32 per image, a neighbour table with k = 2, a BPE trained on the
captions) and write the same shards; the bare loop is one process reading the Parquet files
with pyarrow and calling the step's own pure functions, which is the floor for this work.
Same machine, same run, so the printed ratio (target >= 0.7) is meaningful on a noisy box.

    python benchmarks/tokens.py [--docs 20000] [--small 5000] [--workers 2]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import ledger, storage
from pipeline.config import BeamConfig, RunConfig, TokensConfig
from pipeline.runner import beam_options
from pipeline.steps.context import RunContext
from pipeline.steps.tokens import step_tokens
from pipeline.stages.tokens import assemble, fit_neighbours, make_document, provenance_row, sequence_order
from tokenizer import token_shards
from tokenizer.text import train_bpe
from tokenizer.vocab import JointVocab

ROOT = Path(__file__).resolve().parents[1]
CODES, GRID = 1024, 32


def make_run(out: Path, docs: int, seed: int = 0) -> None:
    captions = [c for line in (ROOT / "manifests" / "demo" / "coco.jsonl").read_text().splitlines() if line.strip()
                for c in json.loads(line)["captions"]]
    models = out / "models"
    for folder in (models / "vq", out / "curated", out / "codes", out / "index"):
        folder.mkdir(parents=True)
    train_bpe(captions, vocab_size=4096, out_path=str(models / "text-bpe.json"))
    (models / "vq" / "vq.safetensors").write_bytes(b"synthetic")
    JointVocab.from_components(str(models / "text-bpe.json"), CODES, 56_320).save(str(models / "vocab.json"))
    rng = np.random.default_rng(seed)
    keys = sorted(hashlib.blake2b(f"a{i}".encode(), digest_size=8).hexdigest() for i in range(docs))
    per_file = 5000
    for part, start in enumerate(range(0, docs, per_file)):
        chunk = keys[start : start + per_file]
        meta = pa.table({
            "key": chunk, "asset_id": [f"asset-{k}" for k in chunk],
            "captions": [[captions[rng.integers(len(captions))]] for _ in chunk],
            "license_id": ["CC-BY-2.0"] * len(chunk), "licensor": ["vendor"] * len(chunk)})
        pq.write_table(meta, out / "curated" / f"metadata-{part:06d}.parquet")
        codes = pa.table({"key": chunk, "asset_id": [f"asset-{k}" for k in chunk],
                          "codes": pa.array(list(rng.integers(0, CODES, (len(chunk), GRID * GRID), dtype=np.uint16)),
                                            pa.list_(pa.uint16())),
                          "h": [GRID] * len(chunk), "w": [GRID] * len(chunk)})
        pq.write_table(codes, out / "codes" / f"codes-{part:06d}.parquet")
        neighbours = pa.table({
            "key": chunk,
            "neighbour_keys": [[keys[j] for j in rng.choice(docs, 2, replace=False)] for _ in chunk],
            "scores": pa.array([[0.8, 0.7]] * len(chunk), pa.list_(pa.float32()))})
        pq.write_table(neighbours, out / "index" / f"neighbours-{part:06d}.parquet")
    storage.write_json(str(out / "curated" / "index.json"), {"samples": docs, "shards": []})
    rows = [{"manifest_uri": "bench.jsonl", "manifest_row": i, "asset_id": f"asset-{k}", "status": "kept",
             "stage": "curated", "key": k} for i, k in enumerate(keys)]
    ledger.write_ledger_file(ledger.ledger_file(str(out), 0), rows)  # the step checks: one sequence per kept asset


def bare_loop(run_dir: Path, out: Path, cfg: TokensConfig, seed: int = 0) -> int:
    """Read everything with pyarrow in one process and build + write the same shards."""
    vocab = JointVocab.load(str(run_dir / "models" / "vocab.json"))
    read = lambda folder, pattern, cols: pa.concat_tables(  # noqa: E731
        [pq.read_table(p, columns=cols) for p in sorted((run_dir / folder).glob(pattern))]).to_pylist()
    meta = {r["key"]: r for r in read("curated", "metadata-*.parquet", ["key", "asset_id", "captions", "license_id", "licensor"])}
    codes = {r["key"]: r["codes"] for r in read("codes", "codes-*.parquet", ["key", "codes"])}
    docs = {k: make_document(vocab, m, codes[k], seed) for k, m in meta.items()}
    n_shards = max(1, -(-len(docs) // cfg.sequences_per_shard))
    shards: dict[int, list] = {}
    for row in read("index", "neighbours-*.parquet", None):
        main = docs[row["key"]]
        chosen = fit_neighbours(main, [docs[k] for k in row["neighbour_keys"][: cfg.k]], cfg.k, cfg.max_tokens)
        order = sequence_order(cfg, seed, main.key)
        tokens = assemble(vocab, main, chosen, order)
        prov = provenance_row(main, chosen, row["scores"][: len(chosen)], order)
        shards.setdefault(storage.stable_bucket(main.key, n_shards), []).append((main.key, tokens, prov))
    for shard, items in shards.items():
        items.sort(key=lambda t: t[0])
        files, _ = token_shards.encode_shard(shard, [t[1] for t in items], [t[2] for t in items], vocab.dtype)
        for name, data in files.items():
            storage.write_bytes(str(out / name), data)
    return len(docs)


def measure(docs: int, workers: int, cfg: TokensConfig) -> tuple[float, float, bool]:
    """(bare seconds, Beam seconds, identical shard bytes) for one synthetic run of `docs`."""
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        make_run(run_dir, docs)
        run_cfg = RunConfig(out=str(run_dir), tokens=cfg, beam=BeamConfig(direct_num_workers=workers))
        ctx = RunContext(run_cfg, policy=None, options=beam_options(run_cfg))  # type: ignore[arg-type]
        started = time.perf_counter()
        bare_loop(run_dir, Path(tmp) / "bare", cfg)
        bare_s = time.perf_counter() - started
        started = time.perf_counter()
        step_tokens(ctx)
        beam_s = time.perf_counter() - started
        same = all((Path(tmp) / "bare" / f"{s['name']}.bin").read_bytes() == (run_dir / "tokens" / f"{s['name']}.bin").read_bytes()
                   for s in storage.read_json(str(run_dir / "tokens" / "index.json"))["shards"])
    return bare_s, beam_s, same


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docs", type=int, default=20_000)
    ap.add_argument("--small", type=int, default=5_000, help="a second, smaller run: the difference is the marginal rate")
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    cfg = TokensConfig(k=2, max_tokens=4096, sequences_per_shard=5000)
    results = {n: measure(n, args.workers, cfg) for n in (args.small, args.docs)}
    print(f"tokens step (k=2, 1,024 codes per image), {args.workers} Beam workers vs one bare process")
    for n, (bare_s, beam_s, same) in results.items():
        print(f"  {n:6d} documents: bare {n / bare_s:7.1f} seq/s ({bare_s:.1f} s), tokens step {n / beam_s:7.1f} seq/s "
              f"({beam_s:.1f} s), ratio {bare_s / beam_s:.2f}, identical shard bytes: {same}")
    (b0, s0, _), (b1, s1, _) = results[args.small], results[args.docs]
    print(f"  marginal ({args.docs - args.small} documents between the two runs): ratio {(b1 - b0) / (s1 - s0):.2f}   "
          f"(target >= 0.7; the rest is Beam's fixed cost per run, {s0 - args.small * (s1 - s0) / (args.docs - args.small):.1f} s)")


if __name__ == "__main__":
    main()
