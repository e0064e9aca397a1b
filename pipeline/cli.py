"""`curate` command line. Library code never sees argparse objects: flags become a RunConfig."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from importlib import resources
from pathlib import Path
from typing import Sequence


def _beam_import_noise(record: logging.LogRecord) -> bool:
    """Beam's GCP module warns on import that an optional client (apitools) is missing."""
    return "apitools not found" not in record.getMessage()


logging.getLogger().addFilter(_beam_import_noise)  # before Beam is imported below

from pipeline.config import ConfigError, RunConfig, load_config  # noqa: E402
from pipeline.run import PHASES, NothingToDo, RunReport, WorkerDied, run  # noqa: E402 - after the filter above
from pipeline.rundir import OutputFolderError  # noqa: E402

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
    """The config file (load_config resolves its relative paths against its folder), then the
    command line's overrides (relative to the working directory)."""
    from dataclasses import replace

    cfg = load_config(args.config)
    cwd = Path.cwd()
    manifests = tuple(_resolve(m, cwd) for m in (args.manifest or cfg.manifests))
    policy = args.policy or cfg.policy
    return replace(cfg, manifests=manifests, policy=_resolve(policy, cwd) if policy else None,
                   out=_resolve(args.out or cfg.out, cwd))


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


def calibration_summary(align: dict) -> str | None:
    """One line on the calibrated filter: the model's power and what the filter decided."""
    cal = align.get("calibration")
    if not cal:
        return None
    where = (f"out of fold ({align['scored_out_of_fold']} folds)" if align.get("scored_out_of_fold")
             else "by the CLIP itself")
    power = f"AUC {cal['auc']:.3f}" if cal.get("auc") is not None else "AUC n/a"
    if cal["decision"] == "filter":
        verdict = (f"filter at clip_score < {cal['threshold']:.4f}: expected false rejects "
                   f"{cal['expected_false_reject']:.1%}, expected catch {cal['expected_catch']:.1%} "
                   f"(budget {cal['false_reject_budget']:.1%})")
    else:
        verdict = f"{cal['decision']}: {cal.get('reason') or 'nothing rejected'}"
    return f"alignment model: matched vs mismatched captions scored {where}, {power}; {verdict}"


def format_report(report: RunReport) -> str:
    s = report.summary
    lines = [
        f"outputs: {report.out}",
        f"  ledger:   {report.out}/ledger/   (one row per manifest row)",
        f"  curated:  {report.out}/curated/  (webdataset tar + metadata/embeddings Parquet)",
        f"  models:   {report.out}/models/   index: {report.out}/index/ (FAISS + neighbours)",
        f"  tokens:   {report.out}/tokens/   (Megatron .bin/.idx shards + sequences.parquet, docs/shards.md)",
        f"  run.json: {report.out}/run.json",
        f"  report:   {report.out}/report/index.html   lineage: {report.out}/lineage/ (OpenLineage events)",
        "",
        "steps: " + ", ".join(f"{r.name} ({'skipped, already complete' if r.skipped else f'{r.seconds:.1f}s'})"
                              for r in report.steps),
        f"rows in: {s.rows_in}   kept: {s.kept}   rejected: {s.rejected}   (invariant holds)",
    ]
    scores = score_summary(report.out)
    if scores:
        lines.append(scores)
    info = {r.name: r.info for r in report.steps}
    calibration = calibration_summary(info.get("align", {}))
    if calibration:
        lines.append(calibration)
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


DEMO_CAPTION = "A kitchen with a white refrigerator, a stove and wooden cabinets."
DEMO_IMAGE = "images/000000000802.jpg"  # a bundled demo photo (manifests/demo/)


def demo_lm(cfg: RunConfig) -> str:
    """What `curate demo` does after the run: train the reference LM on the demo's token shards
    for the bounded budget in demo.yaml (`train_lm`), then write one generated PNG and one
    generated caption under OUT/samples/. Returns the summary lines."""
    import math

    from pipeline import storage
    from tokenizer.vocab import JointVocab
    from trainer.config import SampleConfig
    from trainer.sample import write_samples
    from trainer.train import CHECKPOINT, read_checkpoint, train_lm

    tokens, lm_dir = storage.join(cfg.out, "tokens"), storage.join(cfg.out, "models", "lm")
    checkpoint = storage.join(lm_dir, CHECKPOINT)
    if storage.exists(checkpoint):  # a rerun of the demo continues its LM, unless the shards changed
        from tokenizer.token_shards import load_tokens_index

        if read_checkpoint(checkpoint)[1]["reader"]["index_sha256"] != load_tokens_index(tokens)[1]:
            log.info("demo: the token shards changed since %s was trained; training it afresh", lm_dir)
            storage.remove_tree(lm_dir)
    result = train_lm(tokens, lm_dir, cfg.train_lm)
    vocab = JointVocab.load(storage.join(tokens, "vocab.json"), with_text=False)
    samples = write_samples(cfg.out, DEMO_CAPTION, str(demo_dir() / DEMO_IMAGE), SampleConfig(seed=cfg.seed))
    num = (lambda v, spec=".3f": "n/a" if v is None else format(v, spec))  # noqa: E731 - a finished run resumed: no step
    lines = [
        f"reference LM ({cfg.train_lm.model}, {result['steps']} steps, {result['train_minutes']:.1f} min, "
        f"{num(result['tokens_per_s'], '.0f')} tokens/s): loss {num(result['first_10pct_loss'])} (first 10 % of "
        f"steps) -> {num(result['last_10pct_loss'])} (last 10 %), held-out {num(result['eval_loss'])}, "
        f"ln(vocab) = {math.log(vocab.size):.3f}  ({result['out_dir']})",
        f"samples: {samples['image']['png']} (caption -> image, {samples['grid']} x {samples['grid']} codes), "
        f"{samples['caption']['txt']}: {samples['caption']['text']!r}  ({samples['out_dir']})",
    ]
    return "\n".join(lines)


def _add_run_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="run config YAML (any fsspec URL); built-in defaults without it")
    parser.add_argument("--manifest", action="append", help="manifest URL (repeatable); overrides the config")
    parser.add_argument("--policy", help="license policy YAML; overrides the config")
    parser.add_argument("--out", help="output folder or URL; overrides the config")
    parser.add_argument("--until", choices=PHASES, default=PHASES[-1], help="last phase to run")
    parser.add_argument("--force", action="store_true",
                        help="use an --out folder that is not empty and holds no run of ours (refused if it holds "
                             "any path a run writes: its files are never deleted)")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="debug logging, all of it on the console (without -v: a progress line per Beam step, "
                             "and Beam's own logs in OUT/_logs/<step>.log)")


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


TRAIN_LM_HELP = """\
Train the reference CM3 LM on the token shards -> OUT/models/lm/ (lm.safetensors + lm.json,
resumable lm-train.safetensors, train-log.jsonl). Settings: the run config's train_lm section,
then these flags. Rerunning on the same OUT resumes from its checkpoint. Several processes or
GPUs: torchrun --nproc_per_node N -m pipeline.cli train-lm ... (docs/training.md).
"""


def train_lm_command(args: argparse.Namespace, cfg: RunConfig) -> dict:
    """`curate train-lm`: the run config's `train_lm` section with the flags on top."""
    from dataclasses import replace

    from pipeline import storage
    from trainer.config import train_lm_overrides
    from trainer.train import train_lm

    try:
        train_cfg = replace(cfg.train_lm, **train_lm_overrides(args))
    except ValueError as exc:
        raise ConfigError(f"train_lm: {exc}") from None
    tokens = args.tokens or storage.join(cfg.out, "tokens")
    return train_lm(tokens, storage.join(cfg.out, "models", "lm"), train_cfg)


SAMPLE_HELP = """\
Sample from the run's reference LM (OUT/models/lm, or --lm) and write OUT/samples/:
  --caption TEXT   caption -> image: grid x grid image codes (only image ids allowed), guided
                   against the unconditional prompt `[bos] <mask:0> <img>`, decoded by the run's
                   VQ (OUT/models/vq) to a PNG
  --image FILE     image -> caption: the image normalised like the curated store, encoded by the
                   run's VQ, then text ids until <eos> -> a .txt
Each sample also gets a JSON record (prompt, settings, LM sha256). Same seed, same sample.
See docs/training.md#sampling.
"""


def sample_command(args: argparse.Namespace) -> int:
    """`curate sample`: flags -> SampleConfig, optional retrieval, `trainer.sample.write_samples`."""
    import json

    from trainer.config import SampleConfig
    from trainer.sample import write_samples

    try:
        cfg = SampleConfig(temperature=args.temperature, top_p=args.top_p, cfg_scale=args.cfg_scale,
                           max_caption_tokens=args.max_caption_tokens, seed=args.seed)
        neighbours = []
        if args.retrieve:
            if args.caption is None:
                raise ValueError("--retrieve needs --caption: it retrieves documents for the caption prompt")
            from pipeline.sample_retrieval import retrieve_neighbours

            neighbours = retrieve_neighbours(args.out, args.caption, args.retrieve, device=args.device)
        result = write_samples(args.out, args.caption, args.image, cfg, args.samples, lm=args.lm,
                               neighbours=neighbours, device=args.device, num_threads=args.threads)
    except (FileNotFoundError, ValueError) as exc:
        print(f"curate sample: {exc}", file=sys.stderr)
        return 2
    summary = {"lm_sha256": result["lm_sha256"], "grid": result["grid"],
               "neighbours": [n.key for n in neighbours]}
    for kind in ("image", "caption"):
        if kind in result:
            summary[kind] = {k: v for k, v in result[kind].items() if isinstance(v, (str, int, float))}
    print(json.dumps(summary, indent=2, ensure_ascii=False))
    return 0


def add_sample_parser(sub: argparse._SubParsersAction) -> None:
    from trainer.config import SampleConfig  # no torch import just to build the parser

    d = SampleConfig()
    p = sub.add_parser("sample", help="sample from the reference LM: caption -> PNG or image -> caption",
                       description=SAMPLE_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, metavar="RUN_OUT", help="the run's output folder (models, run.json, index, tokens)")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--caption", metavar="TEXT", help="caption -> image: write a PNG")
    what.add_argument("--image", metavar="FILE", help="image file or URL -> caption: write a .txt")
    p.add_argument("--lm", metavar="PATH", help="LM checkpoint folder or lm.safetensors (default: OUT/models/lm)")
    p.add_argument("--cfg-scale", type=float, default=d.cfg_scale, metavar="S",
                   help=f"classifier-free guidance scale, caption -> image; 1 turns it off (default {d.cfg_scale})")
    p.add_argument("--temperature", type=float, default=d.temperature, metavar="T",
                   help=f"softmax temperature; 0 is greedy (default {d.temperature})")
    p.add_argument("--top-p", type=float, default=d.top_p, metavar="P",
                   help=f"nucleus sampling: smallest set of ids holding this probability; 1 keeps all (default {d.top_p})")
    p.add_argument("--seed", type=int, default=d.seed, metavar="N", help=f"sampling seed: same seed, same sample (default {d.seed})")
    p.add_argument("--max-caption-tokens", type=int, default=d.max_caption_tokens, metavar="N",
                   help=f"image -> caption: stop after this many tokens without <eos> (default {d.max_caption_tokens})")
    p.add_argument("--retrieve", type=int, default=0, metavar="K",
                   help="caption -> image: prepend the documents of K neighbours retrieved from OUT/index with "
                        "the run's CLIP (default 0: none)")
    p.add_argument("--samples", metavar="DIR", help="where to write (default: OUT/samples)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"), help="default cpu")
    p.add_argument("--threads", type=int, default=1, metavar="N",
                   help="torch CPU threads while sampling (default 1: faster for small models; 0 leaves torch's)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")


AUDIT_HELP = """Answer an auditor's questions from a run's own tables (DuckDB over its Parquet files).

  trace KEY      every asset in a sequence (main and neighbours), or one asset, with its
                 license, licensor, manifest URI and row, and the curation decisions
  asset ID       every sequence and shard holding the asset (main or neighbour), or why it
                 was rejected
  license ID     the kept assets under a license, and the sequences and tokens they account for
  sql "QUERY"    your own SQL over the views ledger, curated, sequences, neighbours, takedowns

A readable table by default; --json for tools. See docs/audit.md."""


def add_audit_parser(sub: argparse._SubParsersAction) -> None:
    audit = sub.add_parser("audit", help="trace tokens to licenses; query the run's tables (DuckDB)",
                           description=AUDIT_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    questions = audit.add_subparsers(dest="question", required=True)
    for name, arg, text in (("trace", "KEY", "a sequence key, a curated key or an asset_id"),
                            ("asset", "ID", "an asset_id"), ("license", "ID", "a license id, e.g. CC-BY-2.0"),
                            ("sql", "QUERY", "SQL over ledger, curated, sequences, neighbours, takedowns")):
        q = questions.add_parser(name, help=text, description=text)
        q.add_argument("value", metavar=arg, help=text)
        q.add_argument("--out", required=True, metavar="RUN_OUT", help="the run's output folder or URL")
        q.add_argument("--json", action="store_true", help="JSON instead of a table")
        q.add_argument("-v", "--verbose", action="store_true")
    text = ("remove assets from every output of a run (ledger: TAKEN_DOWN; store, codes, index, neighbours; "
            "only the token/SFT shards that hold them are rewritten) and record them so no later run brings "
            "them back; a killed takedown is completed by running it again")
    td = questions.add_parser("takedown", help=text, description=text)
    td.add_argument("value", metavar="ID", nargs="*", help="asset ids")
    td.add_argument("--license", metavar="L", help="every kept asset under this license id")
    td.add_argument("--licensor", metavar="X", help="every kept asset of this licensor")
    td.add_argument("--reason", required=True, help="why (recorded with every asset)")
    td.add_argument("--out", required=True, metavar="RUN_OUT", help="the run's output folder or URL")
    td.add_argument("--json", action="store_true", help="the report as JSON (default: a summary)")
    td.add_argument("-v", "--verbose", action="store_true")


def audit_command(args: argparse.Namespace) -> int:
    from pipeline import audit

    ask = {"trace": audit.trace, "asset": audit.asset, "license": audit.license_report, "sql": audit.sql}
    if args.question == "takedown":
        import json

        from pipeline.rundir import RunLock
        from pipeline.takedown import takedown

        try:
            with RunLock(args.out, command="curate audit takedown"):
                report = takedown(args.out, args.value, args.license, args.licensor, args.reason)
        except (audit.AuditError, OutputFolderError) as exc:
            print(f"curate audit takedown: {exc}", file=sys.stderr)
            return 2
        if args.json:
            print(json.dumps(report, indent=2))
        else:
            print(f"taken down: {len(report['assets'])} asset(s) "
                  f"({sum(a['match'] != 'requested' for a in report['assets'])} exact copies); token shards "
                  f"rewritten {report['token_shards_rewritten']}, sequences changed {len(report['sequences_changed'])}, "
                  f"dropped {len(report['sequences_dropped'])}; curated shards rewritten "
                  f"{len(report['curated_shards_rewritten'])}; models trained with them: "
                  f"{', '.join(m['model'] for m in report['models_trained_with_these_assets']) or 'none'} "
                  f"(retrain to remove their influence); report: {args.out}/takedowns/")
        return 0
    try:
        answer = ask[args.question](args.out, args.value)
    except audit.AuditError as exc:
        print(f"curate audit {args.question}: {exc}", file=sys.stderr)
        return 2
    print(audit.render(answer, args.json))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="curate", description="Licensed image-text corpus -> curated store -> CM3 token shards.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run every phase on the bundled demo corpus, train the reference LM for two "
                                       "minutes and write one sample image and caption",
                          epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    demo.add_argument("--out", default="demo-out", help="output folder (default: demo-out)")
    demo.add_argument("--until", choices=PHASES, default=PHASES[-1], help="last phase to run")
    demo.add_argument("-v", "--verbose", action="store_true",
                      help="debug logging on the console (without -v: Beam's logs go to OUT/_logs/)")
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
    from trainer.config import add_train_lm_flags

    lm = sub.add_parser("train-lm", help="train the reference CM3 LM on the token shards -> OUT/models/lm/",
                        description=TRAIN_LM_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    lm.add_argument("--config", help="run config YAML (section train_lm); built-in defaults without it")
    lm.add_argument("--out", help="the run's output folder (the model goes to OUT/models/lm)")
    lm.add_argument("--tokens", help="token shard folder, any fsspec URL (default: OUT/tokens)")
    add_train_lm_flags(lm)
    lm.add_argument("-v", "--verbose", action="store_true")
    lm.set_defaults(manifest=None, policy=None, until=None)
    add_sample_parser(sub)
    add_audit_parser(sub)
    text = ("write the run report OUT/report/index.html again: static HTML with plots of the funnel, the license "
            "mix, the CLIP scores, duplicate groups, the VQ tokenizer, the sequences and the takedowns (every run "
            "and takedown writes it too; see docs/report.md)")
    rep = sub.add_parser("report", help="write the run's HTML report (OUT/report/index.html)", description=text)
    rep.add_argument("--out", required=True, metavar="RUN_OUT", help="the run's output folder or URL")
    rep.add_argument("-v", "--verbose", action="store_true")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, beam_flags = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("apache_beam", "urllib3", "fsspec", "faiss"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if args.verbose else logging.ERROR)
    try:
        if args.command == "audit":
            if beam_flags:
                raise ConfigError(f"audit does not know {beam_flags} (see curate audit --help)")
            return audit_command(args)
        if args.command == "report":
            from pipeline import audit
            from pipeline.report import write_report

            if beam_flags:
                raise ConfigError(f"report does not know {beam_flags} (see curate report --help)")
            try:
                print(write_report(args.out))
            except audit.AuditError as exc:
                print(f"curate report: {exc}", file=sys.stderr)
                return 2
            return 0
        if args.command == "sample":
            if beam_flags:
                raise ConfigError(f"sample does not know {beam_flags} (see curate sample --help)")
            return sample_command(args)
        if args.command == "demo":
            args.config = str(demo_dir() / "demo.yaml")
            args.manifest = None
            args.policy = None
        cfg = config_from_args(args)
        if args.command == "train-lm":
            import json

            if beam_flags:
                raise ConfigError(f"train-lm does not know {beam_flags} (see curate train-lm --help)")
            try:
                result = train_lm_command(args, cfg)
            except ValueError as exc:  # e.g. a checkpoint from other shards: one line, not a traceback
                print(f"curate train-lm: {exc}", file=sys.stderr)
                return 2
            if int(os.environ.get("RANK", "0")) == 0:  # one summary under torchrun
                print(json.dumps(result, indent=2))
            return 0
        if args.command.startswith("train-"):
            import json

            result = train_model(args.command.split("-", 1)[1], cfg, training_shards(args, cfg.out))
            print(json.dumps({k: v for k, v in result.items() if isinstance(v, (int, float, str, bool))}, indent=2))
            return 0
        report = run(cfg, until=args.until, beam_flags=beam_flags, progress=True, logs_to_file=not args.verbose,
                     force=getattr(args, "force", False))
        extra = demo_lm(cfg) if args.command == "demo" and args.until == PHASES[-1] else None
    except OutputFolderError as exc:
        print(f"curate: {exc}", file=sys.stderr)
        return 2
    except ConfigError as exc:
        print(f"curate: configuration error: {exc}", file=sys.stderr)
        return 2
    except (NothingToDo, WorkerDied) as exc:
        print(f"curate: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("curate: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    print(format_report(report))
    if extra:
        print(extra)
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
