"""What a Beam step shows on the console: live progress (rows done / total, rows per second,
ETA), and nothing else: Beam's own logs go to a file (`stderr_to_log`).

Beam reports its counters only when a pipeline finishes (the local runner included), so a
step's workers count for themselves: each DoFn instance that holds a `Progress` ticks a
`Ticker`, which rewrites one tiny file (its running count) in a local folder at most once a
second. The driver's `Monitor` sums those files every half second and draws a tqdm bar (a
line every 10 s when the console is not a terminal). This works in the driver's process and
in the local runner's worker processes, which share the machine. On a remote cluster the
folder does not exist on the workers, so they count nothing and the runner's own UI shows
progress (docs/runners.md).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Iterator, TextIO

import apache_beam as beam

from pipeline import storage


@dataclass(frozen=True)
class Progress:
    """Where a step's workers count (picklable: it travels inside the DoFns)."""

    folder: str
    step: str

    def ticker(self) -> "Ticker":
        return Ticker(os.path.join(self.folder, self.step))


class Ticker:
    """One worker's running count for one step."""

    def __init__(self, folder: str, every_s: float = 1.0):
        self.enabled = os.path.isdir(folder)  # absent on a remote worker: count nothing
        self.path = os.path.join(folder, f"{os.getpid()}-{uuid.uuid4().hex[:8]}.n")
        self.count = 0
        self.every_s = every_s
        self._written = 0.0

    def add(self, n: int = 1) -> None:
        self.count += n
        if self.enabled and time.monotonic() - self._written >= self.every_s:
            self.flush()

    def flush(self) -> None:
        if not self.enabled:
            return
        try:
            storage.write_bytes(self.path, str(self.count).encode())
        except OSError:
            self.enabled = False  # progress is a courtesy: never fail a step for it
        self._written = time.monotonic()


class Monitor:
    """Shows one step's progress while the `with` block runs; `done` is the final count."""

    def __init__(self, step: str, total: int | None, unit: str = "rows", stream: TextIO | None = None,
                 root: str | None = None):
        self.root = root or tempfile.mkdtemp(prefix="cm3curate-progress-")
        self.progress = Progress(self.root, step)
        os.makedirs(os.path.join(self.root, step), exist_ok=True)
        self.step, self.total, self.unit = step, total, unit
        self.stream = stream if stream is not None else sys.stderr
        self.done = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._bar = None

    def count(self) -> int:
        folder = os.path.join(self.root, self.step)
        total = 0
        for name in os.listdir(folder):
            if name.endswith(".n") and not name.startswith(".tmp-"):  # not one being written
                try:
                    with open(os.path.join(folder, name)) as handle:
                        total += int(handle.read() or 0)
                except (OSError, ValueError):
                    continue  # replaced while read: the next poll sees it
        return total

    def _loop(self) -> None:
        while not self._stop.wait(0.5):
            self._update()

    def _update(self) -> None:
        done = self.count()
        if self.total is not None:
            done = min(done, self.total)  # a retried bundle counts twice
        if done > self.done and self._bar is not None:
            self._bar.update(done - self.done)
        self.done = max(done, self.done)

    def __enter__(self) -> "Monitor":
        from tqdm import tqdm

        tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self._bar = tqdm(total=self.total, desc=self.step, unit=f" {self.unit}", file=self.stream,
                         mininterval=0.5 if tty else 10.0, dynamic_ncols=tty, leave=True, smoothing=0.1)
        self._thread = threading.Thread(target=self._loop, name=f"progress-{self.step}", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._update()
        if self._bar is not None:
            self._bar.close()
        import shutil

        shutil.rmtree(self.root, ignore_errors=True)


class Tick(beam.DoFn):
    """Passes every element through, ticking `progress` by 1 (or `weight(element)`)."""

    def __init__(self, progress: Progress, weight: Callable[[Any], int] | None = None):
        super().__init__()
        self.progress, self.weight = progress, weight
        self._ticker: Ticker | None = None

    def setup(self) -> None:
        self._ticker = self.progress.ticker()

    def process(self, element):
        self._ticker.add(1 if self.weight is None else int(self.weight(element)))
        yield element

    def finish_bundle(self) -> None:
        self._ticker.flush()


def counted(pcoll, progress: Progress | None, label: str = "Progress", weight: Callable[[Any], int] | None = None):
    """`pcoll` unchanged, each element ticking `progress`; with no `progress`, `pcoll` itself.
    Fused with its producer, so it costs a function call per element."""
    if progress is None:
        return pcoll
    return pcoll | label >> beam.ParDo(Tick(progress, weight))


@contextlib.contextmanager
def stderr_to_log(url: str) -> Iterator[TextIO]:
    """Send this process's stderr (file descriptor 2, which the local runner's worker
    processes inherit) to the log `url` while the block runs; yields a stream on the console.

    Beam's runner and SDK harness log tens of INFO/WARNING lines per pipeline; they belong in
    the run's folder, not on the user's screen. If the block fails, the log's path is printed
    on the console. A remote `url` is written locally, then uploaded.
    """
    from pipeline import storage

    remote = "://" in url and not url.startswith("file://")
    local = tempfile.mkstemp(prefix="cm3curate-", suffix=".log")[1] if remote else url.removeprefix("file://")
    if not remote:
        os.makedirs(os.path.dirname(local) or ".", exist_ok=True)
    sys.stderr.flush()
    saved = os.dup(2)
    fd = os.open(local, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 2)
    os.close(fd)
    console = os.fdopen(os.dup(saved), "w", buffering=1)
    os.write(2, f"=== {dt.datetime.now(dt.timezone.utc).isoformat()} pid {os.getpid()} ===\n".encode())
    failed = False
    try:
        yield console
    except KeyboardInterrupt:
        raise
    except BaseException:
        failed = True
        raise
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        if failed:
            console.write(f"curate: this step's log (Beam's messages, worker tracebacks): {url}\n")
        console.close()
        if remote:
            with open(local, "rb") as handle:
                storage.write_bytes(url, handle.read())
            os.unlink(local)
