"""Run assembly: the steps of a run in order, and the run around them.

Steps run in order; each belongs to a user-facing phase (`--until`), and lives in the
module of its phase (pipeline/steps/):

    curated  prepare (A–B: ingest, license gate, fetch, decode, exact/near dedup)
             clip    (train the licensed-lineage CLIP, unless weights are configured)
             align   (C: CLIP scores, alignment filter, semantic dedup, curated store, ledger)
    models   vq      (D: train the VQ image tokenizer, unless weights are configured)
             text    (D: byte-level BPE on the captions + the joint vocabulary)
             encode  (apply the VQ tokenizer to every curated image: codes Parquet)
    index    index   (E: FAISS index over document embeddings + neighbour table)
    tokens   tokens  (F: CM3 sequences -> Megatron .bin/.idx shards + provenance; ledger
                      rejects documents too long for tokens.max_tokens)
             sft     (only with sft.enabled: CM3leon-style task examples -> `sft/`, a shard
                      set of its own; the ledger is not touched)

`run` checks the inputs, claims and locks the output folder, skips the steps already done
(pipeline/resume.py), runs the others (each a lineage job, pipeline/lineage.py), then checks
the ledger invariant and writes the run record: run.json, the attribution list, the report
and the Croissant card.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import platform
import time
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, Sequence

from manifests.policy import LicensePolicy, load_policy
from pipeline import ledger, resume, rundir, storage
from pipeline.card import write_attribution, write_card
from pipeline.config import ConfigError, RunConfig, describe_yaml_error, missing_backend, url_scheme
from pipeline.lineage import Lineage
from pipeline.report import write_report
from pipeline.runner import beam_options
from pipeline.stages.ingest import count_manifest_rows
from pipeline.steps.context import (DECISIONS, MANIFESTS, PREPARED, SLICES, STAGING, TOO_LONG, NothingToDo,
                                    RunContext, Step, WorkerDied)
from pipeline.steps.curated import step_align, step_clip, step_prepare
from pipeline.steps.index import step_index
from pipeline.steps.models import step_encode, step_text, step_vq
from pipeline.steps.tokens import step_sft, step_tokens

log = logging.getLogger(__name__)

__all__ = ["PHASES", "STEPS", "NothingToDo", "RunReport", "WorkerDied", "run"]

PHASES = ("curated", "models", "index", "tokens")
PACKAGES = ("apache-beam", "pyarrow", "pillow", "numpy", "torch", "torchvision", "open-clip-torch",
            "faiss-cpu", "tokenizers", "safetensors", "webdataset", "imagehash", "fsspec")


@dataclass
class StepResult:
    name: str
    phase: str
    skipped: bool
    seconds: float
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class RunReport:
    out: str
    steps: list[StepResult]
    summary: ledger.LedgerSummary
    counters: dict[str, int]


STEPS: tuple[Step, ...] = (
    Step("prepare", "curated", ("validate", "fetch", "decode", "curated", "dedup"), (PREPARED, STAGING, SLICES, DECISIONS),
         step_prepare, reads=(MANIFESTS,)),
    Step("clip", "curated", ("align", "clip_train"), ("models/clip",), step_clip, reads=(PREPARED,)),
    Step("align", "curated", ("align", "dedup", "curated"), ("curated", "ledger", STAGING), step_align,
         reads=(PREPARED, DECISIONS, "models/clip")),
    Step("vq", "models", ("vq",), ("models/vq",), step_vq, reads=("curated",)),
    Step("text", "models", ("text",), ("models/text-bpe.json", "models/vocab.json"), step_text, reads=("curated",)),
    Step("encode", "models", ("vq",), ("codes",), step_encode, reads=("curated", "models/vq")),
    Step("index", "index", ("index", "neighbours"), ("index",), step_index, reads=("curated",)),
    Step("tokens", "tokens", ("tokens",), ("tokens", TOO_LONG), step_tokens,
         reads=("curated", "codes", "index", "models/text-bpe.json", "models/vocab.json")),
    Step("sft", "tokens", ("sft",), ("sft",), step_sft, gate="sft",
         reads=("curated", "codes", "models/text-bpe.json", "models/vocab.json")),
)


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def _policy(url: str) -> LicensePolicy:
    """The policy, or one line naming the file and the problem."""
    import yaml

    from manifests.policy import PolicyError

    if not storage.exists(url):
        raise ConfigError(f"policy {url}: not found")
    try:
        return load_policy(url)
    except (PolicyError, ConfigError) as exc:
        raise ConfigError(f"policy {url}: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"policy {url}: {describe_yaml_error(exc)}") from None
    except (OSError, UnicodeDecodeError, TypeError, ValueError) as exc:
        raise ConfigError(f"policy {url}: {type(exc).__name__}: {exc}") from None


def _check_manifests(manifests: Sequence[str]) -> int:
    """Each manifest exists, has a known format, is listed once (a repeat would put every row in
    the ledger twice) and reads to its end (a truncated .gz or a corrupt Parquet file is one
    line here, not a traceback mid-run); returns the number of rows, for the ledger invariant."""
    from pipeline.stages.ingest import manifest_format

    seen: dict[str, str] = {}
    for url in manifests:
        same = os.path.realpath(url) if "://" not in url else url.rstrip("/")
        if same in seen:
            raise ConfigError(f"manifest {url} is listed twice (as {seen[same]}): list each manifest once")
        seen[same] = url
        try:
            manifest_format(url)
        except ValueError as exc:
            raise ConfigError(f"manifest {exc}") from None
        if not storage.exists(url):
            raise ConfigError(f"manifest {url}: not found")
    total = 0
    for url in manifests:
        try:
            total += count_manifest_rows(url)
        except Exception as exc:  # noqa: BLE001 - any reader error: the file is unreadable as a whole
            message = str(exc).splitlines()[0] if str(exc) else ""
            raise ConfigError(f"manifest {url}: cannot be read to its end ({type(exc).__name__}: {message[:200]})") \
                from None
    return total


def run(cfg: RunConfig, until: str = PHASES[-1], beam_flags: Sequence[str] = (), progress: bool = False,
        logs_to_file: bool = False, force: bool = False) -> RunReport:
    """Run the steps of every phase up to `until`, skipping those already complete. With
    `progress`, each Beam step draws a live bar (rows done / total, rate, ETA) on stderr; with
    `logs_to_file`, Beam's logs go to OUT/_logs/<step>.log (the CLI does both, unless -v).

    The output folder must be empty, new or a run folder of ours (`force`: a foreign folder
    whose files do not collide with ours), and is locked for the run (pipeline/rundir.py)."""
    if not cfg.manifests:
        raise ConfigError("no manifests: pass --manifest URL or set `manifests` in the config")
    if not cfg.policy:
        raise ConfigError("no license policy: pass --policy FILE or set `policy` in the config")
    if until not in PHASES:
        raise ConfigError(f"--until must be one of {PHASES}, got {until!r}")
    if PHASES.index(until) >= PHASES.index("index") and not cfg.align.enabled:
        raise ConfigError("the retrieval index needs CLIP embeddings: set align.enabled or run --until curated")
    if cfg.tokens.k > cfg.neighbours.k:
        raise ConfigError(f"tokens.k is {cfg.tokens.k} but the neighbour table holds neighbours.k = "
                          f"{cfg.neighbours.k} per document: raise neighbours.k or lower tokens.k")
    for what, url in [*(("manifest", m) for m in cfg.manifests), ("policy", cfg.policy), ("out", cfg.out)]:
        why = missing_backend(url_scheme(url))
        if why:  # before any row is read, not a failure per row
            raise ConfigError(f"{what} {url}: {why}")
    rows_in = _check_manifests(cfg.manifests)
    policy = _policy(cfg.policy)
    rundir.claim(cfg.out, force)
    with rundir.RunLock(cfg.out):
        events = Lineage(cfg.out)
        with events.job("run", inputs=[*cfg.manifests, cfg.policy], outputs=[cfg.out]):
            return _run_steps(cfg, policy, until, beam_flags, progress, logs_to_file, rows_in, events)


def _run_steps(cfg: RunConfig, policy: LicensePolicy, until: str, beam_flags: Sequence[str], progress: bool,
               logs_to_file: bool, rows_in: int, events: Lineage) -> RunReport:
    digests = {url: storage.file_sha256(url) for url in cfg.manifests}
    ctx = RunContext(cfg, policy, beam_options(cfg, beam_flags), show_progress=progress, logs_to_file=logs_to_file,
                     rows_in=rows_in)
    steps = [s for s in STEPS if PHASES.index(s.phase) <= PHASES.index(until)
             and not (s.gate and not getattr(cfg, s.gate).enabled)]  # a gated-off step: not run, not recorded
    hashes = resume.config_hashes(policy.to_json(), digests, cfg.seed, cfg.to_json(),
                                  [(s.name, s.sections) for s in steps])
    results: list[StepResult] = []
    counters: dict[str, int] = {}
    upstream_ran = False
    for step in steps:
        chain = hashes[step.name]
        started = time.monotonic()
        state = None if upstream_ran else resume.completed(cfg.out, step.name, chain)
        if state is not None:
            log.info("step %s: already complete (config %s), skipping", step.name, chain)
            counters.update(state.get("counters", {}))
            results.append(StepResult(step.name, step.phase, True, 0.0, state.get("info", {})))
            continue
        log.info("step %s: running (config %s)", step.name, chain)
        storage.remove_tree(resume.state_url(cfg.out, step.name))
        for name in step.outputs:
            storage.remove_tree(ctx.path(name))
        upstream_ran = True  # a rerun step's outputs are rewritten: everything after it reruns too
        reads = [u for r in step.reads for u in ([*cfg.manifests, cfg.policy] if r == MANIFESTS else [ctx.path(r)])]
        with events.job(step.name, inputs=reads, outputs=[ctx.path(o) for o in step.outputs]):
            step_counters, info = step.action(dataclasses.replace(ctx, config_hash=chain))
        counters.update(step_counters)
        seconds = time.monotonic() - started
        resume.record(cfg.out, step.name, step.phase, chain, seconds, step_counters, info)
        results.append(StepResult(step.name, step.phase, False, seconds, info))

    summary = ledger.check_invariant(cfg.out, rows_in)
    storage.write_json(storage.join(cfg.out, "run.json"), {
        "config": cfg.to_json(),
        "policy": policy.to_json(),
        "manifests": digests,
        "packages": package_versions(),
        "steps": [dataclasses.asdict(r) | {"seconds": round(r.seconds, 3)} for r in results],
        "counters": counters,
        "ledger": summary.to_json(),
    })
    write_attribution(cfg.out, policy.attribution_required)
    write_report(cfg.out)
    write_card(cfg.out, cfg, policy, summary.to_json())  # last: it lists every output file with its sha256
    return RunReport(cfg.out, results, summary, counters)
