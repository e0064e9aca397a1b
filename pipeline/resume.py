"""Resume: which steps of a run are already done, by a chain of config hashes.

Each step's hash covers the config sections that change its outputs and the hash of the
step before it; the first link covers the policy, the manifests' sha256 and the seed. So
changing an upstream setting (or a manifest) changes every hash after it, and those steps
rerun; changing a downstream setting leaves the upstream steps done. A step is done when
`OUT/_state/<step>.json` holds its current hash. An interrupted step has no state file: a
rerun deletes its outputs and runs it again, and since outputs are deterministic the result
equals an uninterrupted run.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from typing import Any, Iterable

from pipeline import storage

STATE = "_state"


def digest(value: Any) -> str:
    """16 hex of the sha256 of `value` as canonical JSON."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def config_hashes(policy: dict[str, Any], manifests: dict[str, str], seed: int, config: dict[str, Any],
                  steps: Iterable[tuple[str, tuple[str, ...]]]) -> dict[str, str]:
    """step name -> chained hash, for `steps` ((name, config sections), in run order) of a run
    with this policy (JSON), these manifest sha256s, seed and config (RunConfig.to_json())."""
    chain = digest({"policy": policy, "manifests": manifests, "seed": seed})
    hashes = {}
    for name, sections in steps:
        chain = digest({"previous": chain, "step": name, **{s: config[s] for s in sections}})
        hashes[name] = chain
    return hashes


def state_url(out: str, step: str) -> str:
    return storage.join(out, STATE, f"{step}.json")


def completed(out: str, step: str, config_hash: str) -> dict[str, Any] | None:
    """The step's state when it completed with this config hash, else None."""
    url = state_url(out, step)
    if not storage.exists(url):
        return None
    state = storage.read_json(url)
    return state if state.get("config_hash") == config_hash else None


def record(out: str, step: str, phase: str, config_hash: str, seconds: float, counters: dict[str, int],
           info: dict[str, Any]) -> None:
    """Mark the step done (written last, after all its outputs)."""
    storage.write_json(state_url(out, step), {
        "step": step, "phase": phase, "config_hash": config_hash, "seconds": round(seconds, 3),
        "finished_at": dt.datetime.now(dt.timezone.utc).isoformat(), "counters": counters, "info": info,
    })
