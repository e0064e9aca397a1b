"""The output folder belongs to one run at a time, and only to runs of this pipeline.

- `claim(out, force)`: a folder that is empty (or absent) or already a run folder of ours is
  used; a non-empty folder without our run record is refused, so `--out ~/Documents` cannot
  delete anything. With `force`, such a folder is adopted only if none of the paths our steps
  own (and replace on a rerun) exist in it yet: a foreign file is never deleted.
- `RunLock(out)`: `OUT/_lock.json` is created exclusively (O_EXCL on a local disk) and holds
  the holder's pid, host and start time. A second run is refused with one line naming the
  holder. A lock left by a process that died on this host is detected (its pid is gone) and
  taken over; a lock from another host is refused, with the command to clear it.
  On an object store the lock is written, read back and compared, which narrows but does not
  close the race between two runs that start within the same second (docs/security.md).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import socket
import uuid

from fsspec.core import url_to_fs

from pipeline import storage
from pipeline.config import ConfigError

MARKER = ".cm3curate-run"  # written into every run folder on first use
LOCK = "_lock.json"
OWNED = ("_work", "_state", "_logs", "curated", "ledger", "models", "codes", "index", "tokens", "sft", "samples",
         "run.json", "takedowns.jsonl", "takedowns", "croissant.json", "ATTRIBUTION.md", "lineage", "report",
         "ATTRIBUTION.csv")  # what a run writes (and a rerun replaces)


class OutputFolderError(ConfigError):
    """`--out` cannot be used: in use by another run, or a folder that is not ours."""


def _is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def claim(out: str, force: bool = False) -> None:
    fs, path = url_to_fs(out)
    if fs.exists(path) and not fs.isdir(path):
        raise OutputFolderError(f"--out {out} is a file, not a folder")
    names = {p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)} if fs.exists(path) else set()
    names.discard(LOCK)
    ours = MARKER in names or "_state" in names or "run.json" in names  # run.json / _state: older run folders
    if names and not ours:
        if not force:
            raise OutputFolderError(
                f"--out {out} is not empty and holds no run of this pipeline ({sorted(names)[:3]}...): "
                "choose an empty or new folder, or pass --force to add a run beside those files")
        clash = sorted(names & set(OWNED))
        if clash:
            raise OutputFolderError(f"--out {out}: --force cannot adopt this folder, it already holds {clash}, "
                                    "which a run would replace; move them away or choose another folder")
    if MARKER not in names:
        try:
            fs.makedirs(path, exist_ok=True)
            storage.write_json(storage.join(out, MARKER), {  # the same bytes in every run folder
                "tool": "cm3curate", "note": "a cm3curate run folder: its steps own " + ", ".join(OWNED)})
        except OSError as exc:
            raise OutputFolderError(f"--out {out} is not writable: {exc.strerror or exc}") from None


class RunLock:
    """`with RunLock(out):` the run's exclusive hold on its output folder."""

    def __init__(self, out: str, command: str = "curate run"):
        self.out = out
        self.url = storage.join(out, LOCK)
        self.token = uuid.uuid4().hex
        self.record = {"pid": os.getpid(), "host": socket.gethostname(), "command": command, "token": self.token,
                       "started": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
        self.held = False

    def _holder(self) -> dict | None:
        try:
            return storage.read_json(self.url)
        except (FileNotFoundError, ValueError):
            return None

    def _stale(self, holder: dict) -> bool:
        if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
            return False
        try:
            os.kill(holder["pid"], 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False

    def _create(self) -> bool:
        data = json.dumps(self.record, indent=2).encode()
        if _is_local(self.url):
            path = self.url.removeprefix("file://")
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
            return True
        if storage.exists(self.url):
            return False
        storage.write_bytes(self.url, data)
        return (self._holder() or {}).get("token") == self.token

    def __enter__(self) -> "RunLock":
        for _ in range(2):
            if self._create():
                self.held = True
                return self
            holder = self._holder()
            if holder is not None and self._stale(holder):
                storage.remove_tree(self.url)  # its process is gone: the run it guarded is over
                continue
            if holder is None:
                continue  # released while we looked
            raise OutputFolderError(
                f"--out {self.out} is in use by {holder.get('command', 'a run')} (pid {holder.get('pid')} on "
                f"{holder.get('host')}, since {holder.get('started')}); if that run is gone, delete {self.url}")
        raise OutputFolderError(f"--out {self.out}: could not take the lock {self.url}")

    def __exit__(self, *exc) -> None:
        if self.held and (self._holder() or {}).get("token") == self.token:
            storage.remove_tree(self.url)
        self.held = False
