"""Running one Beam pipeline: options from the config and the command line, the local
runner's memory cap, and the counters a finished pipeline reports.

Every Beam step of a run goes through `run_beam` (pipeline/steps/), so runner settings,
the malloc cap and the counters are the same for all of them.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable, Sequence

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions

from pipeline.config import RunConfig

log = logging.getLogger(__name__)


def beam_options(cfg: RunConfig, extra_flags: Sequence[str] = ()) -> PipelineOptions:
    """Config runner settings first, then config `beam.options`, then CLI flags (last wins)."""
    flags = [f"--runner={cfg.beam.runner}"]
    if cfg.beam.runner in ("DirectRunner", "direct"):
        workers = cfg.beam.direct_num_workers or os.cpu_count() or 1
        flags += [f"--direct_num_workers={workers}", f"--direct_running_mode={cfg.beam.direct_running_mode}"]
    flags += list(cfg.beam.options) + list(extra_flags)
    return PipelineOptions(flags)


def beam_counters(result: Any) -> dict[str, int]:
    counters: dict[str, int] = {}
    try:
        for item in result.metrics().query()["counters"]:
            name = f"{item.key.metric.namespace}/{item.key.metric.name}"
            counters[name] = counters.get(name, 0) + int(item.committed or item.attempted or 0)
    except Exception as exc:  # noqa: BLE001 - some runners do not report metrics
        log.warning("could not read Beam metrics: %s", exc)
    return dict(sorted(counters.items()))


def limit_malloc_arenas(arenas: int = 2) -> None:
    """Cap glibc's malloc arenas for this process and the local Beam workers it starts.

    glibc gives each thread that allocates its own arena (up to 8 per core), and memory
    freed in one arena is not reused by another; with the SDK harness's thread pool and
    gRPC threads, the local runner's processes then grow with every bundle. Two arenas cut
    the growth measured by benchmarks/ingest.py (docs/benchmarks.md). A value the user set
    in MALLOC_ARENA_MAX wins; on a non-glibc system this does nothing.
    """
    if "MALLOC_ARENA_MAX" in os.environ:
        return
    os.environ["MALLOC_ARENA_MAX"] = str(arenas)  # inherited by the worker processes
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-8, arenas)  # M_ARENA_MAX, for this process
    except (OSError, AttributeError):
        pass


def run_beam(build: Callable[[beam.Pipeline], None], options: PipelineOptions) -> dict[str, int]:
    from apache_beam.options.pipeline_options import DirectOptions, StandardOptions

    if str(options.view_as(StandardOptions).runner or "DirectRunner") in ("DirectRunner", "direct"):
        if options.view_as(DirectOptions).direct_running_mode == "multi_processing":
            limit_malloc_arenas()
    pipeline = beam.Pipeline(options=options)
    build(pipeline)
    result = pipeline.run()
    result.wait_until_finish()
    return beam_counters(result)
