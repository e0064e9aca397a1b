"""A small token shard set, laid out exactly as the pipeline's `tokens` step writes it: a real
byte-level BPE trained on the demo captions, random 4x4 VQ codes, 40 sequences (0-2 neighbours,
text-first and image-first documents) in 3 shards sorted by key, plus an empty fourth shard (the
pipeline writes none, but a reader must cope with one from any writer). `sft_token_shards` is the same set
with the SFT shard set's optional `answer_start` column (where the main document begins)."""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path

import fsspec
import numpy as np
import pytest

from pipeline.storage import write_bytes
from tokenizer.cm3 import CM3Format, build_document, build_sequence
from tokenizer.text import train_bpe
from tokenizer.token_shards import encode_shard, tokens_index
from tokenizer.vocab import JointVocab

REPO = Path(__file__).resolve().parents[2]
COCO = REPO / "manifests" / "demo" / "coco.jsonl"
NUM_SEQUENCES = 40
NUM_SHARDS = 4  # the last one stays empty
GRID = 4
NUM_CODES = 512


@dataclass(frozen=True)
class TokenShards:
    dir: str
    vocab: JointVocab
    sequences: dict[str, np.ndarray]  # key -> stored tokens
    provenance: dict[str, dict]  # key -> the row written to sequences.parquet


def demo_captions() -> list[str]:
    rows = [json.loads(line) for line in COCO.read_text().splitlines() if line.strip()]
    return [c for r in rows for c in r.get("captions") or []]


def build_token_shards(out: str, num_sequences: int = NUM_SEQUENCES, seed: int = 0,
                       answer_start: bool = False) -> TokenShards:
    """Write OUT/tokens-like files under `out` with the same functions the pipeline uses; with
    `answer_start`, every 4th sequence's is 0 (no prompt) and the others' is where the main
    document begins (the neighbours and `<break>`s are the prompt)."""
    captions = demo_captions()
    train_bpe(captions, vocab_size=800, out_path=f"{out}/text-bpe.json")
    vocab = JointVocab.from_components(f"{out}/text-bpe.json", num_image_codes=NUM_CODES)
    vocab.save(f"{out}/vocab.json")
    rng = np.random.default_rng(seed)
    assets = [f"coco-{i:04d}" for i in range(num_sequences)]
    keys = [hashlib.sha256(a.encode()).hexdigest()[:16] for a in assets]
    shards: dict[int, list[tuple[str, np.ndarray, dict]]] = {s: [] for s in range(NUM_SHARDS)}
    sequences, rows = {}, {}
    for i, (asset, key) in enumerate(zip(assets, keys)):
        fmt = CM3Format(image_first=bool(rng.integers(2)))
        others = [j for j in rng.permutation(num_sequences).tolist() if j != i][: int(rng.integers(0, 3))]

        def doc(j: int) -> np.ndarray:
            return build_document(vocab, vocab.text_to_ids(captions[(7 * j) % len(captions)]),
                                  rng.integers(0, NUM_CODES, (GRID, GRID)), fmt)

        main = doc(i)
        seq = build_sequence(vocab, [doc(j) for j in others], main, fmt)
        row = {"key": key, "main_asset_id": asset, "asset_ids": [asset] + [assets[j] for j in others],
               "roles": ["main"] + ["neighbour"] * len(others), "license_ids": ["CC-BY-2.0"] * (1 + len(others)),
               "licensors": ["flickr"] * (1 + len(others)), "neighbour_scores": [0.5] * len(others),
               "order": "image_first" if fmt.image_first else "text_first"}
        if answer_start:
            row["answer_start"] = 0 if i % 4 == 0 else len(seq) - len(main) - 1  # main, then eos
        shards[int(key, 16) % (NUM_SHARDS - 1)].append((key, seq, row))
        sequences[key], rows[key] = seq, row
    entries = []
    for number, members in shards.items():
        members.sort(key=lambda m: m[0])
        files, entry = encode_shard(number, [m[1] for m in members], [m[2] for m in members], vocab.dtype)
        if answer_start:
            files = _with_answer_start(files, number, [m[2]["answer_start"] for m in members])
        for name, data in files.items():
            write_bytes(f"{out}/{name}", data)
        entries.append(entry)
    with fsspec.open(f"{out}/vocab.json", "rb") as handle:
        vocab_sha = hashlib.sha256(handle.read()).hexdigest()
    write_bytes(f"{out}/index.json", tokens_index(entries, dtype=vocab.dtype.name, vocab_sha256=vocab_sha))
    return TokenShards(out, vocab, sequences, rows)


def _with_answer_start(files: dict[str, bytes], shard: int, starts: list[int]) -> dict[str, bytes]:
    """Make sure the provenance part carries `answer_start` as int32 (what the SFT writer adds)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    name = f"sequences.parquet/part-{shard:06d}.parquet"
    table = pq.read_table(io.BytesIO(files[name]))
    if "answer_start" in table.column_names:
        assert table.column("answer_start").to_pylist() == starts and table.schema.field("answer_start").type == pa.int32()
        return files
    out = io.BytesIO()
    pq.write_table(table.append_column("answer_start", pa.array(starts, type=pa.int32())), out)
    return {**files, name: out.getvalue()}


@pytest.fixture(scope="session")
def token_shards(tmp_path_factory) -> TokenShards:
    return build_token_shards(str(tmp_path_factory.mktemp("tokens")))


@pytest.fixture(scope="session")
def tiny_token_shards(tmp_path_factory) -> TokenShards:
    """4 sequences: a set small enough for the reference LM to memorise in seconds."""
    return build_token_shards(str(tmp_path_factory.mktemp("tiny-tokens")), num_sequences=4)


@pytest.fixture(scope="session")
def sft_token_shards(tmp_path_factory) -> TokenShards:
    return build_token_shards(str(tmp_path_factory.mktemp("sft-tokens")), answer_start=True)


@pytest.fixture(scope="session")
def memory_token_shards(token_shards) -> str:
    """The same files on fsspec's in-memory filesystem (a real non-local backend: ranged reads)."""
    url = "memory://trainer-tests/tokens"
    memory = fsspec.filesystem("memory")
    for path in Path(token_shards.dir).rglob("*"):
        if path.is_file():
            memory.pipe(f"/trainer-tests/tokens/{path.relative_to(token_shards.dir)}", path.read_bytes())
    yield url
    memory.rm("/trainer-tests", recursive=True)


@pytest.fixture(scope="module", autouse=True)
def _single_threaded(one_torch_thread):
    """Every test here runs with one torch thread (tests/conftest.py)."""
