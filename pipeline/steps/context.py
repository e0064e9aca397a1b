"""What every step of a run shares: the run context, the step record, the work paths, and
the two ways a step stops a run with one line (NothingToDo, WorkerDied)."""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import fsspec
from apache_beam.options.pipeline_options import PipelineOptions

from manifests.policy import LicensePolicy
from pipeline import storage
from pipeline.config import RunConfig
from pipeline.progress import Monitor, Progress, stderr_to_log

WORK = "_work"
LOGS = "_logs"
PREPARED = "_work/prepared"
STANDBY = "_work/prepared/standby"  # the duplicates of kept assets, re-decided after alignment
CALIBRATION = "_work/alignment-calibration.json"  # the calibrated filter's measurements, for run.json
STAGING = "_work/staging"
SLICES = "_work/slices"
DECISIONS = "_work/decisions"
TOO_LONG = "_work/tokens-too-long.jsonl"  # the tokens step's rejections, for the ledger (ledger.apply_changes)
ENCODE_REJECTED = "_work/encode-rejected.jsonl"  # the encode step's rejections, for the ledger
NEIGHBOUR_ERRORS = "_work/neighbour-errors.jsonl"  # documents the index step found no neighbours for, by error
MANIFESTS = "@manifests"  # in Step.reads: the manifests and the license policy


class NothingToDo(RuntimeError):
    """A step has no input left (every row was rejected): the run stops with this one line."""


class WorkerDied(RuntimeError):
    """A worker process died (a native crash, an out-of-memory kill) in the prepare step."""


@dataclass(frozen=True)
class RunContext:
    cfg: RunConfig
    policy: LicensePolicy
    options: PipelineOptions
    config_hash: str = ""  # the running step's chained config hash (recorded in its outputs)
    show_progress: bool = False  # a live bar per Beam step on stderr (pipeline/progress.py)
    logs_to_file: bool = False  # Beam's own logs to OUT/_logs/<step>.log instead of the console
    rows_in: int | None = None  # rows in all manifests (the ledger invariant's left side)

    @property
    def out(self) -> str:
        return self.cfg.out

    def path(self, *parts: str) -> str:
        return storage.join(self.cfg.out, *parts)

    @contextlib.contextmanager
    def beam_step(self, step: str, total: int | None, unit: str = "rows") -> Iterator[Progress | None]:
        """While a Beam step runs: its log in OUT/_logs/<step>.log (with `logs_to_file`), and the
        `Progress` its workers tick, drawn as a bar on the console (with `show_progress`)."""
        with contextlib.ExitStack() as stack:
            console = stack.enter_context(stderr_to_log(self.path(LOGS, f"{step}.log"))) if self.logs_to_file else None
            if self.show_progress:
                yield stack.enter_context(Monitor(step, total, unit, stream=console)).progress
            else:
                yield None


@dataclass(frozen=True)
class Step:
    name: str
    phase: str
    sections: tuple[str, ...]  # config sections that change this step's outputs
    outputs: tuple[str, ...]  # folders under OUT owned (and cleared) by this step
    action: Callable[[RunContext], tuple[dict[str, int], dict[str, Any]]]
    gate: str | None = None  # a config section with `enabled`: when false the step is left out entirely
    reads: tuple[str, ...] = ()  # what it reads, for lineage: paths under OUT, or MANIFESTS


def clip_config(ctx: RunContext):
    """The CLIP the align/index steps use: the configured weights, or the one trained here."""
    clip = ctx.cfg.align.clip
    if clip.weights:
        return clip
    return dataclasses.replace(clip, weights=ctx.path("models", "clip", "clip.safetensors"))


def copy_file(src: str, dst: str) -> None:
    with fsspec.open(src, "rb") as handle:
        storage.write_bytes(dst, handle.read())
