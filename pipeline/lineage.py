"""OpenLineage events for every step a run (or a takedown) runs, written to OUT/lineage/.

A `curate run` is one parent job (`cm3curate.run`); each step that runs is a child job
(`cm3curate.run.<step>`) whose events carry a ParentRunFacet pointing at the parent run. Each
emits START, then COMPLETE or FAIL (with the error message and stack trace, credentials masked).
Steps skipped because they were already complete emit nothing: the events are what ran. Inputs
and outputs are datasets named by OpenLineage's naming convention: namespace `file` and the
absolute path for a local folder, `s3://bucket` (etc.) and the key for an object store.

The events go through openlineage-python's own file transport, one JSON file per event (which
works on object stores too, where appending does not), so no lineage server is needed; a
collector (Marquez, DataHub, ...) can ingest the folder, or a user can forward the files.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import traceback
from dataclasses import dataclass, field
from importlib import metadata
from typing import Iterator, Sequence
from urllib.parse import urlsplit

from openlineage.client import OpenLineageClient
from openlineage.client.event_v2 import InputDataset, Job, OutputDataset, Run, RunEvent, RunState
from openlineage.client.facet_v2 import error_message_run, job_type_job, parent_run, processing_engine_run
from openlineage.client.transport.file import FileConfig, FileTransport
from openlineage.client.uuid import generate_new_uuid

from pipeline import storage

FOLDER = "lineage"
PRODUCER = "https://github.com/cm3curate/cm3curate"
NAMESPACE = os.environ.get("CM3CURATE_LINEAGE_NAMESPACE", "cm3curate")


def dataset_name(url: str) -> tuple[str, str]:
    """(namespace, name) of a file or folder, after OpenLineage's dataset naming spec."""
    if "://" in url and not url.startswith("file://"):
        parts = urlsplit(url)
        return f"{parts.scheme}://{parts.netloc}", parts.path.lstrip("/") or "/"
    path = url[len("file://"):] if url.startswith("file://") else url
    return "file", os.path.abspath(path)


def _inputs(urls: Sequence[str]) -> list[InputDataset]:
    return [InputDataset(*dataset_name(storage.redact_url(u) or u)) for u in urls]


def _outputs(urls: Sequence[str]) -> list[OutputDataset]:
    return [OutputDataset(*dataset_name(storage.redact_url(u) or u)) for u in urls]


def _version() -> str:
    try:
        return metadata.version("cm3curate")
    except metadata.PackageNotFoundError:
        return "unknown"


@dataclass
class Lineage:
    """`with Lineage(out).job("run", inputs, outputs) as run:` emits START, then COMPLETE or FAIL.

    Jobs opened inside an open one are its children (ParentRunFacet)."""

    out: str
    _client: OpenLineageClient | None = None
    _open: list[tuple[str, str]] = field(default_factory=list)  # (job name, run id), outermost first

    def __post_init__(self) -> None:
        transport = FileTransport(FileConfig(log_file_path=storage.join(self.out, FOLDER, "event")))
        self._client = OpenLineageClient(transport=transport)
        if "://" not in self.out or self.out.startswith("file://"):
            os.makedirs(storage.join(self.out, FOLDER).removeprefix("file://"), exist_ok=True)

    def _emit(self, state: RunState, name: str, run_id: str, inputs: Sequence[str], outputs: Sequence[str],
              error: BaseException | None = None) -> None:
        facets: dict = {"processing_engine": processing_engine_run.ProcessingEngineRunFacet(
            version=_version(), name="cm3curate", openlineageAdapterVersion=metadata.version("openlineage-python"))}
        parents = [o for o in self._open if o[1] != run_id]
        if parents:
            parent_name, parent_id = parents[-1]
            root_name, root_id = self._open[0]
            facets["parent"] = parent_run.ParentRunFacet(
                run=parent_run.Run(runId=parent_id), job=parent_run.Job(namespace=NAMESPACE, name=parent_name),
                root=parent_run.Root(run=parent_run.RootRun(runId=root_id),
                                     job=parent_run.RootJob(namespace=NAMESPACE, name=root_name)))
        if error is not None:
            facets["errorMessage"] = error_message_run.ErrorMessageRunFacet(
                message=storage.redact_text(f"{type(error).__name__}: {error}"), programmingLanguage="python",
                stackTrace=storage.redact_text("".join(traceback.format_exception(error))))
        job_facets = {"jobType": job_type_job.JobTypeJobFacet(
            processingType="BATCH", integration="CM3CURATE", jobType="JOB" if parents else "DAG")}
        self._client.emit(RunEvent(
            eventType=state, eventTime=dt.datetime.now(dt.timezone.utc).isoformat(), producer=PRODUCER,
            run=Run(runId=run_id, facets=facets), job=Job(namespace=NAMESPACE, name=name, facets=job_facets),
            inputs=_inputs(inputs), outputs=_outputs(outputs)))

    @contextlib.contextmanager
    def job(self, name: str, inputs: Sequence[str] = (), outputs: Sequence[str] = ()) -> Iterator[str]:
        """Emit START for job `cm3curate.<name>` (a child of the open job, if any), run the block,
        then emit COMPLETE, or FAIL and re-raise. Yields the run id."""
        full = f"{self._open[0][0]}.{name}" if self._open else f"cm3curate.{name}"  # cm3curate.run.prepare
        run_id = str(generate_new_uuid())
        self._open.append((full, run_id))
        try:
            self._emit(RunState.START, full, run_id, inputs, outputs)
            try:
                yield run_id
            except BaseException as exc:  # KeyboardInterrupt too: the run did not complete
                self._emit(RunState.FAIL, full, run_id, inputs, outputs, exc)
                raise
            self._emit(RunState.COMPLETE, full, run_id, inputs, outputs)
        finally:
            self._open.pop()


def read_events(out: str) -> list[dict]:
    """Every event under OUT/lineage/, in the order they were written."""
    events = [storage.read_json(url) for url in storage.list_files(storage.join(out, FOLDER), "event-*.json")]
    return sorted(events, key=lambda e: e["eventTime"])
