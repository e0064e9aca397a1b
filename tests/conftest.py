"""Shared fixtures: a tiny corpus built in a temp dir from the real demo photos + bad cases."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "manifests" / "demo"


def demo_rows(name: str) -> list[dict | str]:
    rows: list[dict | str] = []
    for line in (DEMO / name).read_text().splitlines():
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            rows.append(line)
    return rows


def write_jsonl(path: Path, rows: list[dict | str]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch intra-op thread for a module's tests: tiny models on a shared 2-core box (a
    second thread mostly waits at barriers: measured 5 ms vs 0.5-1.8 s per VQ step under load),
    and bit-identical comparisons need the same thread count in every run."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def demo_dir() -> Path:
    return DEMO


@pytest.fixture()
def tiny_corpus(tmp_path: Path) -> dict:
    """12 real COCO rows (mixed licenses), the originals the bad cases derive from, and every bad case."""
    corpus = tmp_path / "corpus"
    (corpus / "images").mkdir(parents=True)
    shutil.copytree(DEMO / "bad", corpus / "bad")
    coco = [r for r in demo_rows("coco.jsonl")]
    bad = demo_rows("bad-cases.jsonl")
    needed = {r["uri"] for r in bad if isinstance(r, dict) and str(r.get("uri", "")).startswith("images/")}
    sources = {r.get("derived_from") for r in bad if isinstance(r, dict)}
    picked = coco[:12] + [r for r in coco[12:] if r["asset_id"] in sources]  # originals of derived cases
    needed |= {r["uri"] for r in picked}
    for uri in sorted(needed):
        if (DEMO / uri).exists():
            shutil.copy(DEMO / uri, corpus / uri)
    # the repeated-id row must point at a copied coco row
    for row in bad:
        if isinstance(row, dict) and row.get("asset_id") == coco[0]["asset_id"]:
            assert coco[0] in picked
    manifest = write_jsonl(corpus / "manifest.jsonl", picked + bad)
    return {
        "dir": corpus,
        "manifest": manifest,
        "rows": len(picked) + len(bad),
        "policy": DEMO / "policy.yaml",
        "coco": picked,
        "bad": bad,
    }
