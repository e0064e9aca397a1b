"""Check that a refactor left a run's outputs byte-identical.

    python benchmarks/identity.py digest OUT > before.json   # on the old commit
    python benchmarks/identity.py digest OUT > after.json    # on the new commit
    python benchmarks/identity.py compare before.json after.json

`digest` prints the sha256 of every data file a run writes that must not
change when only the code's shape changes: the curated store, the ledger,
the codes, the retrieval index and the token shards. Run records (run.json,
the card, step states, logs) hold times and are left out. `compare` prints
each difference and exits 1 when there is one. Both arguments of `compare`
may also be output folders, which are digested on the spot.
"""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

CHECKED = ("curated", "ledger", "codes", "index", "tokens")


def digest(out: Path) -> dict[str, str]:
    found: dict[str, str] = {}
    for folder in CHECKED:
        for path in sorted((out / folder).rglob("*")):
            if path.is_file():
                found[path.relative_to(out).as_posix()] = hashlib.sha256(path.read_bytes()).hexdigest()
    if not found:
        raise SystemExit(f"{out}: no run outputs under {', '.join(CHECKED)}")
    return found


def _load(arg: str) -> dict[str, str]:
    path = Path(arg)
    return digest(path) if path.is_dir() else json.loads(path.read_text())


def main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "digest":
        print(json.dumps(digest(Path(argv[1])), indent=1, sort_keys=True))
        return 0
    if len(argv) == 3 and argv[0] == "compare":
        before, after = _load(argv[1]), _load(argv[2])
        differ = sorted(k for k in before.keys() & after.keys() if before[k] != after[k])
        for name in differ:
            print(f"changed  {name}")
        for name in sorted(before.keys() - after.keys()):
            print(f"missing  {name}")
        for name in sorted(after.keys() - before.keys()):
            print(f"new      {name}")
        same = len(before.keys() & after.keys()) - len(differ)
        print(f"{same} of {len(before)} files identical")
        return 1 if differ or before.keys() != after.keys() else 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
