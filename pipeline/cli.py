"""`curate` command line. Library code never sees argparse objects: flags become a RunConfig."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from importlib import resources
from pathlib import Path
from typing import Sequence

from pipeline.config import ConfigError, RunConfig, load_config
from pipeline.run import PHASES, RunReport, run

log = logging.getLogger("curate")

EPILOG = """\
Any flag curate does not know is passed to Beam's PipelineOptions, e.g.
  --direct_num_workers=4 --direct_running_mode=multi_processing   (local, default)
  --runner=DataflowRunner --project=P --region=R --temp_location=gs://B/tmp
  --runner=FlinkRunner --flink_master=HOST:8081 --environment_type=DOCKER
  --runner=SparkRunner --spark_master_url=spark://HOST:7077
See docs/runners.md. Outputs are described in docs/outputs.md.
"""


def demo_dir() -> Path:
    return Path(str(resources.files("manifests") / "demo"))


def _resolve(path: str, base: Path) -> str:
    if "://" in path or os.path.isabs(path):
        return path
    return str((base / path).resolve())


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """Config file (relative paths resolved against its folder), then CLI overrides."""
    base = Path(args.config).resolve().parent if args.config and "://" not in args.config else Path.cwd()
    cfg = load_config(args.config)
    manifests = tuple(_resolve(m, base) for m in cfg.manifests)
    policy = _resolve(cfg.policy, base) if cfg.policy else None
    if args.manifest:
        manifests = tuple(_resolve(m, Path.cwd()) for m in args.manifest)
    if args.policy:
        policy = _resolve(args.policy, Path.cwd())
    out = args.out or cfg.out
    out = _resolve(out, Path.cwd()) if args.out else (_resolve(out, base) if args.config else _resolve(out, Path.cwd()))
    from dataclasses import replace

    align = cfg.align
    if align.clip.weights:
        align = replace(align, clip=replace(align.clip, weights=_resolve(align.clip.weights, base)))
    return replace(cfg, manifests=manifests, policy=policy, out=out, align=align)


def score_summary(out: str) -> str | None:
    """One line on the CLIP alignment scores in the ledger (None before alignment ran)."""
    import numpy as np

    from pipeline.ledger import read_ledger

    table = read_ledger(out)
    scores = np.array([v for v in table.column("clip_score").to_pylist() if v is not None], dtype=np.float64)
    if scores.size == 0:
        return None
    removed = sum(1 for r in table.column("reason").to_pylist() if r == "LOW_ALIGNMENT")
    q = np.quantile(scores, [0.0, 0.1, 0.5, 0.9, 1.0])
    return (f"alignment: {scores.size} rows scored, {removed} removed (LOW_ALIGNMENT); clip_score "
            f"min {q[0]:.3f}  p10 {q[1]:.3f}  median {q[2]:.3f}  p90 {q[3]:.3f}  max {q[4]:.3f}")


def format_report(report: RunReport) -> str:
    s = report.summary
    lines = [
        f"outputs: {report.out}",
        f"  ledger:   {report.out}/ledger/   (one row per manifest row)",
        f"  curated:  {report.out}/curated/  (webdataset tar + metadata/embeddings Parquet)",
        f"  models:   {report.out}/models/   index: {report.out}/index/ (FAISS + neighbours)",
        f"  tokens:   {report.out}/tokens/   (Megatron .bin/.idx shards + sequences.parquet, docs/shards.md)",
        f"  run.json: {report.out}/run.json",
        "",
        "steps: " + ", ".join(f"{r.name} ({'skipped, already complete' if r.skipped else f'{r.seconds:.1f}s'})"
                              for r in report.steps),
        f"rows in: {s.rows_in}   kept: {s.kept}   rejected: {s.rejected}   (invariant holds)",
    ]
    scores = score_summary(report.out)
    if scores:
        lines.append(scores)
    info = {r.name: r.info for r in report.steps}
    vq = info.get("vq", {})
    if "psnr_db" in vq:
        lines.append(f"vq tokenizer ({vq.get('model')}, held-out {vq.get('images')} images at {vq.get('resolution_px', '?')} px): "
                     f"PSNR {vq['psnr_db']:.2f} dB  SSIM {vq['ssim']:.3f}  codebook usage "
                     f"{vq['codebook_usage_pct']:.1f}%  perplexity {vq['perplexity']:.0f}  (grid: models/vq/vq-recon.png)")
    text = info.get("text", {})
    if "vocab_size" in text:
        lines.append(f"joint vocabulary: {text['text_ids']} text ids (BPE learned {text['bpe_tokens']}), image codes at "
                     f"offset {text['image_offset']}, {text['vocab_size']} ids, {text['dtype']} (models/vocab.json)")
    tokens = info.get("tokens", {})
    if "sequences" in tokens:
        nb = ", ".join(f"{c} with {n}" for n, c in sorted(tokens.get("sequences_with_neighbours", {}).items()))
        lines.append(f"token shards: {tokens['shards']} shards, {tokens['sequences']} sequences, {tokens['tokens']} tokens "
                     f"({tokens['dtype']}); neighbours per sequence: {nb or 'none'}; "
                     f"{tokens['too_long']} documents too long (tokens/index.json)")
    lines += ["", f"{'stage/reason':<40} {'rows':>6}"]
    for name, count in sorted(s.by_stage_reason.items(), key=lambda kv: (-kv[1], kv[0])):
        lines.append(f"{name:<40} {count:>6}")
    stage_counts = {k: v for k, v in report.counters.items() if k.endswith("/in") or k.endswith("/kept")}
    if stage_counts:
        lines += ["", "stage counters:"] + [f"  {k:<38} {v:>6}" for k, v in stage_counts.items()]
    return "\n".join(lines)


def _add_run_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="run config YAML (any fsspec URL); built-in defaults without it")
    parser.add_argument("--manifest", action="append", help="manifest URL (repeatable); overrides the config")
    parser.add_argument("--policy", help="license policy YAML; overrides the config")
    parser.add_argument("--out", help="output folder or URL; overrides the config")
    parser.add_argument("--until", choices=PHASES, default=PHASES[-1], help="last phase to run")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def training_shards(args: argparse.Namespace, out: str) -> list[str]:
    """`--shards` (a folder or a glob), else the run's curated store, else its prepared store."""
    from pipeline import storage

    if args.shards:
        if any(ch in args.shards for ch in "*?["):
            folder, pattern = args.shards.rsplit("/", 1)
            return storage.list_files(folder, pattern)
        return storage.list_files(args.shards, "images-*.tar")
    for folder in (storage.join(out, "curated"), storage.join(out, "_work", "prepared")):
        found = storage.list_files(folder, "images-*.tar")
        if found:
            return found
    raise ConfigError(f"no curated shards under {out}: run `curate run --until curated` first or pass --shards")


def train_model(what: str, cfg: RunConfig, shards: list[str]) -> dict:
    """`curate train-clip | train-vq | train-text` on existing curated shards."""
    from pipeline import storage

    models = storage.join(cfg.out, "models")
    if what == "clip":
        from pipeline.clip import train_clip

        return train_clip(cfg.align.clip, cfg.clip_train, shards, storage.join(models, "clip"))
    if what == "vq":
        from tokenizer.vq.config import get_config
        from tokenizer.vq.train import train_vq

        return train_vq(get_config(cfg.vq.model), cfg.vq.train, shards, storage.join(models, "vq"))
    from tokenizer.text import captions_from_shards, train_bpe
    from tokenizer.vocab import write_vocab

    target = storage.join(models, "text-bpe.json")
    tok = train_bpe(captions_from_shards(shards), cfg.text.vocab_size, target,
                    num_mask_sentinels=cfg.text.num_mask_sentinels, min_frequency=cfg.text.min_frequency)
    result = {"tokenizer": target, "bpe_tokens": tok.get_vocab_size()}
    if storage.exists(storage.join(models, "vq", "vq.json")):
        vocab = write_vocab(models, text_vocab_size=cfg.text.vocab_size, vq_name="vq/vq.json")
        result.update(vocab=storage.join(models, "vocab.json"), vocab_size=vocab.size)
    return result


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="curate", description="Licensed image-text corpus -> curated store -> CM3 token shards.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run every phase on the bundled demo corpus",
                          epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    demo.add_argument("--out", default="demo-out", help="output folder (default: demo-out)")
    demo.add_argument("--until", choices=PHASES, default=PHASES[-1], help="last phase to run")
    demo.add_argument("-v", "--verbose", action="store_true")
    run_p = sub.add_parser("run", help="run the pipeline on manifests",
                           epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_run_flags(run_p)
    for what, text in (("clip", "train the licensed-lineage CLIP (config: align.clip, clip_train) -> OUT/models/clip/"),
                       ("vq", "train the VQ image tokenizer (config: vq) -> OUT/models/vq/"),
                       ("text", "train the byte-level BPE (config: text) -> OUT/models/text-bpe.json (+ vocab.json)")):
        train = sub.add_parser(f"train-{what}", help=text, description=text)
        train.add_argument("--config", help="run config YAML; built-in defaults without it")
        train.add_argument("--out", help="the run's output folder (models go under OUT/models)")
        train.add_argument("--shards", help="curated shards: a folder of images-*.tar or a glob (default: OUT/curated)")
        train.add_argument("-v", "--verbose", action="store_true")
        train.set_defaults(manifest=None, policy=None, until=None)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, beam_flags = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("apache_beam", "urllib3", "fsspec", "faiss"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if args.verbose else logging.ERROR)
    try:
        if args.command == "demo":
            args.config = str(demo_dir() / "demo.yaml")
            args.manifest = None
            args.policy = None
        cfg = config_from_args(args)
        if args.command.startswith("train-"):
            import json

            result = train_model(args.command.split("-", 1)[1], cfg, training_shards(args, cfg.out))
            print(json.dumps({k: v for k, v in result.items() if isinstance(v, (int, float, str, bool))}, indent=2))
            return 0
        report = run(cfg, until=args.until, beam_flags=beam_flags)
    except ConfigError as exc:
        print(f"curate: configuration error: {exc}", file=sys.stderr)
        return 2
    print(format_report(report))
    return 0


def entry() -> None:
    """Console-script entry point: run `main`, flush, and leave without interpreter teardown.

    Every output is written atomically and flushed before `main` returns. What is left at
    exit are native thread pools (torch intra-op, OpenMP from FAISS, gRPC from Beam's
    runner); tearing those down in static destructors raced now and then and aborted a
    finished run with "terminate called without an active exception" (exit -6) after its
    summary was printed. Exiting here skips that teardown; `main` stays a plain function
    for callers that embed it.
    """
    try:
        code = main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    try:
        sys.stdout.flush()
        sys.stderr.flush()
        logging.shutdown()
    finally:
        os._exit(int(code or 0))


if __name__ == "__main__":
    entry()
