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
from pipeline.run import PHASES, NothingToDo, WorkerDied, run  # noqa: E402 - after the filter above
from pipeline.commands import add_audit_parser, add_sample_parser, audit_command, sample_command  # noqa: E402
from pipeline.rundir import OutputFolderError  # noqa: E402
from pipeline.summary import format_report  # noqa: E402

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
