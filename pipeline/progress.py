"""Live progress of a Beam step: rows done / total, rows per second and ETA on the console.

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

import os
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable, TextIO

import apache_beam as beam


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
        tmp = f"{self.path}.tmp"
        try:
            with open(tmp, "w") as handle:
                handle.write(str(self.count))
            os.replace(tmp, self.path)
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
            if name.endswith(".n"):
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
