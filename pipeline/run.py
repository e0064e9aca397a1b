"""Run assembly: build each phase's Beam graph, skip phases already done, record the run.

A phase is done when `OUT/_state/<phase>.json` exists with the same config hash; an
interrupted phase has no state file, so a rerun clears that phase's outputs and runs it
again: outputs are deterministic, so the result equals an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import logging
import os
import platform
import time
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, Callable, Sequence

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions

from manifests.policy import LicensePolicy, load_policy
from pipeline import ledger, storage
from pipeline.config import ConfigError, RunConfig
from pipeline.stages.base import apply_stage
from pipeline.stages.decode import DecodeImages
from pipeline.stages.dedup import Dedup
from pipeline.stages.fetch import FetchImages
from pipeline.stages.ingest import ReadManifests, ValidateManifestRows, count_manifest_rows
from pipeline.stages.licenses import VerifyLicenses
from pipeline.stages.store import StageImages, WriteCuratedStore

log = logging.getLogger(__name__)

PHASES = ("curated",)
PACKAGES = ("apache-beam", "pyarrow", "pillow", "numpy", "torch", "torchvision", "open-clip-torch",
            "faiss-cpu", "tokenizers", "safetensors", "webdataset", "imagehash", "fsspec")


@dataclass
class PhaseResult:
    name: str
    skipped: bool
    seconds: float
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class RunReport:
    out: str
    phases: list[PhaseResult]
    summary: ledger.LedgerSummary
    counters: dict[str, int]


def beam_options(cfg: RunConfig, extra_flags: Sequence[str] = ()) -> PipelineOptions:
    """Config runner settings first, then config `beam.options`, then CLI flags (last wins)."""
    flags = [f"--runner={cfg.beam.runner}"]
    if cfg.beam.runner in ("DirectRunner", "direct"):
        workers = cfg.beam.direct_num_workers or os.cpu_count() or 1
        flags += [f"--direct_num_workers={workers}", f"--direct_running_mode={cfg.beam.direct_running_mode}"]
    flags += list(cfg.beam.options) + list(extra_flags)
    return PipelineOptions(flags)


def build_curated_graph(p: beam.Pipeline, cfg: RunConfig, policy: LicensePolicy) -> None:
    """Phase A–C: manifests -> validated, licensed, fetched, decoded assets -> curated store + ledger."""
    rows = p | "ReadManifests" >> ReadManifests(cfg.manifests)
    assets, rejected_rows = rows | "ValidateRows" >> ValidateManifestRows(cfg.validate)
    assets, rejected_license = apply_stage(assets, "VerifyLicenses", VerifyLicenses(policy))
    assets, rejected_fetch = apply_stage(assets, "FetchImages", FetchImages(cfg.fetch))
    hash_kind = cfg.dedup.hash_kind if cfg.dedup.near else None
    assets, rejected_decode = apply_stage(assets, "DecodeImages", DecodeImages(cfg.decode, hash_kind))
    assets = assets | "StageImages" >> beam.ParDo(StageImages(staging_dir(cfg.out)))
    rejections = [rejected_rows, rejected_license, rejected_fetch, rejected_decode]
    if cfg.dedup.exact or cfg.dedup.near:
        # semantic dedup needs CLIP embeddings: it runs in the alignment step
        assets, rejected_dup = assets | "Dedup" >> Dedup(dataclasses.replace(cfg.dedup, semantic=False))
        rejections.append(rejected_dup)

    _ = assets | "WriteCuratedStore" >> WriteCuratedStore(
        storage.join(cfg.out, "curated"), cfg.curated.samples_per_shard)
    kept_rows = assets | "KeptRows" >> beam.Map(ledger.kept_row)
    rejected_rows_all = (
        tuple(rejections) | "FlattenRejected" >> beam.Flatten() | "RejectedRows" >> beam.Map(ledger.rejected_row)
    )
    _ = (kept_rows, rejected_rows_all) | "AllLedgerRows" >> beam.Flatten() | "WriteLedger" >> ledger.WriteLedger(cfg.out)


def staging_dir(out: str) -> str:
    return storage.join(out, "_work", "staging")


def _counters(result: Any) -> dict[str, int]:
    counters: dict[str, int] = {}
    try:
        for item in result.metrics().query()["counters"]:
            name = f"{item.key.metric.namespace}/{item.key.metric.name}"
            counters[name] = counters.get(name, 0) + int(item.committed or item.attempted or 0)
    except Exception as exc:  # noqa: BLE001 - some runners do not report metrics
        log.warning("could not read Beam metrics: %s", exc)
    return dict(sorted(counters.items()))


def run_beam(build: Callable[[beam.Pipeline], None], options: PipelineOptions) -> dict[str, int]:
    pipeline = beam.Pipeline(options=options)
    build(pipeline)
    result = pipeline.run()
    result.wait_until_finish()
    return _counters(result)


def _state_url(out: str, phase: str) -> str:
    return storage.join(out, "_state", f"{phase}.json")


PHASE_OUTPUTS = {"curated": ("curated", "ledger", "_work/staging")}
PHASE_SECTIONS = {"curated": ("validate", "fetch", "decode", "curated", "dedup")}


def _phase_done(out: str, phase: str, config_hash: str) -> dict[str, Any] | None:
    url = _state_url(out, phase)
    if not storage.exists(url):
        return None
    state = storage.read_json(url)
    return state if state.get("config_hash") == config_hash else None


def _manifest_digests(urls: Sequence[str]) -> dict[str, str]:
    return {url: storage.file_sha256(url) for url in urls}


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def run(cfg: RunConfig, until: str = PHASES[-1], beam_flags: Sequence[str] = ()) -> RunReport:
    """Run phases up to `until`, skipping those already complete for this config."""
    if not cfg.manifests:
        raise ConfigError("no manifests: pass --manifest URL or set `manifests` in the config")
    if not cfg.policy:
        raise ConfigError("no license policy: pass --policy FILE or set `policy` in the config")
    if until not in PHASES:
        raise ConfigError(f"--until must be one of {PHASES}, got {until!r}")
    policy = load_policy(cfg.policy)
    digests = _manifest_digests(cfg.manifests)
    options = beam_options(cfg, beam_flags)
    phases: list[PhaseResult] = []
    counters: dict[str, int] = {}
    policy_digest = hashlib.sha256(repr(sorted(policy.to_json().items())).encode()).hexdigest()[:16]

    for phase in PHASES[: PHASES.index(until) + 1]:
        config_hash = hashlib.sha256(
            (cfg.phase_hash(*PHASE_SECTIONS[phase]) + policy_digest + repr(sorted(digests.items()))).encode()
        ).hexdigest()[:16]
        started = time.monotonic()
        state = _phase_done(cfg.out, phase, config_hash)
        if state is not None:
            log.info("phase %s: already complete for config %s, skipping", phase, config_hash)
            counters.update(state.get("counters", {}))
            phases.append(PhaseResult(phase, True, 0.0, state.get("info", {})))
            continue
        log.info("phase %s: running (config %s)", phase, config_hash)
        for name in PHASE_OUTPUTS[phase]:
            storage.remove_tree(storage.join(cfg.out, name))
        info: dict[str, Any] = {}
        if phase == "curated":
            phase_counters = run_beam(lambda p: build_curated_graph(p, cfg, policy), options)
        if phase == "curated":
            storage.remove_tree(staging_dir(cfg.out))
        counters.update(phase_counters)
        seconds = time.monotonic() - started
        storage.write_json(_state_url(cfg.out, phase), {
            "phase": phase, "config_hash": config_hash, "seconds": round(seconds, 3),
            "finished_at": dt.datetime.now(dt.timezone.utc).isoformat(), "counters": phase_counters, "info": info,
        })
        phases.append(PhaseResult(phase, False, seconds, info))

    rows_in = sum(count_manifest_rows(url) for url in cfg.manifests)
    summary = ledger.check_invariant(cfg.out, rows_in)
    storage.write_json(storage.join(cfg.out, "run.json"), {
        "config": cfg.to_json(),
        "policy": policy.to_json(),
        "manifests": digests,
        "packages": package_versions(),
        "phases": [{"name": p.name, "skipped": p.skipped, "seconds": round(p.seconds, 3), "info": p.info}
                   for p in phases],
        "counters": counters,
        "ledger": summary.to_json(),
    })
    return RunReport(cfg.out, phases, summary, counters)
