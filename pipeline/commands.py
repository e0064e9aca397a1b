"""The `curate sample` and `curate audit …` subcommands: their parsers and what they run
(`curate run`, `demo` and `train-*` are in pipeline/cli.py, which wires these in)."""

from __future__ import annotations

import argparse
import sys

from pipeline.rundir import OutputFolderError


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
