"""Token shards on disk: Megatron-Core's indexed dataset (`.bin` + `.idx`, MMIDIDX v1), the
per-sequence provenance Parquet and `tokens/index.json` (see docs/shards.md).

One module owns the format, so the pipeline's writer and the trainer's reader cannot drift:
the `tokens` step calls `encode_shard` per shard and `tokens_index` once and writes the bytes
atomically; readers call `parse_index` / `load_tokens_index`. No Beam here. Megatron's own `IndexedDataset` reads the
files as they are (tested); we encode them ourselves because megatron-core's builder writes to
a local path only, while shards here go to any fsspec URL, atomically.
"""

from __future__ import annotations

import hashlib
import io
import json
import struct
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import fsspec
import numpy as np

INDEX_MAGIC = b"MMIDIDX\x00\x00"
INDEX_VERSION = 1
FORMAT = "cm3curate-tokens/1"
# Megatron-Core's DType codes (megatron/core/datasets/indexed_dataset.py)
DTYPE_CODES: dict[str, int] = {"uint8": 1, "int8": 2, "int16": 3, "int32": 4, "int64": 5, "float64": 6,
                               "float32": 7, "uint16": 8}
CODE_DTYPES = {v: np.dtype(k) for k, v in DTYPE_CODES.items()}
HEADER_SIZE = len(INDEX_MAGIC) + 8 + 1 + 8 + 8  # magic, version, dtype code, sequence count, document count

SEQUENCES_DIR = "sequences.parquet"  # a Parquet folder: part-NNNNNN.parquet, one per token shard
INDEX_FILE = "index.json"


def shard_dtype(vocab_size: int) -> np.dtype:
    """The on-disk token dtype: uint16 (Megatron code 8) while every id fits, else int32 (code 4);
    Megatron has no unsigned 32-bit code, and 2**31 ids is beyond any vocabulary."""
    if vocab_size <= 1 << 16:
        return np.dtype(np.uint16)
    if vocab_size <= 1 << 31:
        return np.dtype(np.int32)
    raise ValueError(f"{vocab_size} ids do not fit a Megatron token dtype")


def shard_name(index: int) -> str:
    return f"tokens-{index:06d}"


@dataclass(frozen=True)
class ShardIndex:
    """The parsed `.idx` of one shard: sequence i is `lengths[i]` tokens at byte `pointers[i]`."""

    dtype: np.dtype
    lengths: np.ndarray  # int32 [n]
    pointers: np.ndarray  # int64 [n], bytes into .bin
    document_indices: np.ndarray  # int64 [docs + 1]; here one document per sequence: 0..n

    def __len__(self) -> int:
        return len(self.lengths)


def encode_index(lengths: Sequence[int] | np.ndarray, dtype: np.dtype) -> bytes:
    """The `.idx` bytes for sequences of `lengths` tokens written back to back in `dtype`;
    each sequence is its own document (document_indices = 0, 1, ..., n)."""
    dtype = np.dtype(dtype)
    if dtype.name not in DTYPE_CODES:
        raise ValueError(f"dtype {dtype} has no Megatron code")
    lengths = np.asarray(lengths, dtype=np.int64)
    if lengths.size and (lengths.min() < 0 or lengths.max() > np.iinfo(np.int32).max):
        raise ValueError("sequence lengths must fit int32")
    pointers = np.zeros(len(lengths), dtype=np.int64)
    if len(lengths) > 1:
        pointers[1:] = np.cumsum(lengths[:-1]) * dtype.itemsize
    documents = np.arange(len(lengths) + 1, dtype=np.int64)
    out = io.BytesIO()
    out.write(INDEX_MAGIC)
    out.write(struct.pack("<Q", INDEX_VERSION))
    out.write(struct.pack("<B", DTYPE_CODES[dtype.name]))
    out.write(struct.pack("<Q", len(lengths)))
    out.write(struct.pack("<Q", len(documents)))
    out.write(lengths.astype("<i4").tobytes())
    out.write(pointers.astype("<i8").tobytes())
    out.write(documents.astype("<i8").tobytes())
    return out.getvalue()


def parse_index(data: bytes | memoryview | np.ndarray) -> ShardIndex:
    """Parse `.idx` bytes (a bytes object or a uint8 memmap; arrays are views, not copies)."""
    buf = memoryview(data if not isinstance(data, np.ndarray) else data.data).cast("B")
    if bytes(buf[: len(INDEX_MAGIC)]) != INDEX_MAGIC:
        raise ValueError("not a Megatron MMIDIDX index (bad magic)")
    pos = len(INDEX_MAGIC)
    (version,) = struct.unpack_from("<Q", buf, pos)
    if version != INDEX_VERSION:
        raise ValueError(f"MMIDIDX version {version} is not supported (expected {INDEX_VERSION})")
    code, n_seq, n_doc = struct.unpack_from("<BQQ", buf, pos + 8)
    if code not in CODE_DTYPES:
        raise ValueError(f"unknown MMIDIDX dtype code {code}")
    pos = HEADER_SIZE
    need = pos + n_seq * 4 + n_seq * 8 + n_doc * 8
    if len(buf) < need:
        raise ValueError(f"truncated index: {len(buf)} bytes, header says {need}")
    lengths = np.frombuffer(buf, dtype="<i4", count=n_seq, offset=pos)
    pointers = np.frombuffer(buf, dtype="<i8", count=n_seq, offset=pos + 4 * n_seq)
    documents = np.frombuffer(buf, dtype="<i8", count=n_doc, offset=pos + 12 * n_seq)
    return ShardIndex(CODE_DTYPES[code], lengths, pointers, documents)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def encode_shard(index: int, sequences: Sequence[np.ndarray], provenance: Sequence[dict[str, Any]],
                 dtype: np.dtype, webdataset: bool = False) -> tuple[dict[str, bytes], dict[str, Any]]:
    """The files of shard `index` (relative path -> bytes) and its entry for `index.json`.

    Files: `.bin`, `.idx`, the provenance part `sequences.parquet/part-NNNNNN.parquet` and,
    when asked, the webdataset tar. `sequences[i]` and `provenance[i]` describe the same
    sequence, in the order the caller chose (the pipeline sorts by key). The caller writes
    each file atomically (`pipeline.storage.write_bytes`).
    """
    if len(sequences) != len(provenance):
        raise ValueError("one provenance row per sequence")
    dtype = np.dtype(dtype)
    name = shard_name(index)
    arrays = [np.ascontiguousarray(s, dtype=dtype) for s in sequences]
    body = b"".join(a.tobytes() for a in arrays)
    idx = encode_index([len(a) for a in arrays], dtype)
    rows = [{**row, "shard": index, "index": i, "num_tokens": int(len(a))}
            for i, (a, row) in enumerate(zip(arrays, provenance))]
    files = {f"{name}.bin": body, f"{name}.idx": idx, f"{SEQUENCES_DIR}/part-{index:06d}.parquet": provenance_parquet(rows)}
    entry = {"name": name, "shard": index, "sequences": len(arrays), "tokens": int(sum(len(a) for a in arrays)),
             "bin_sha256": _sha256(body), "idx_sha256": _sha256(idx)}
    if webdataset:
        tar = webdataset_tar(arrays, rows)
        files[f"{name}.tar"] = tar
        entry["tar_sha256"] = _sha256(tar)
    return files, entry


PROVENANCE_COLUMNS = ("key", "shard", "index", "num_tokens", "main_asset_id", "asset_ids", "roles", "license_ids",
                      "licensors", "neighbour_scores", "order")
# Columns a shard set adds when its rows carry them (SFT: the task and where the answer
# begins); a part without them is byte-identical to one written before they existed.
OPTIONAL_COLUMNS = ("task", "answer_start")


def provenance_schema(optional: Sequence[str] = ()):
    """The provenance columns, plus those of OPTIONAL_COLUMNS named in `optional` (in that order)."""
    import pyarrow as pa

    extra = {"task": pa.string(), "answer_start": pa.int32()}
    unknown = set(optional) - set(extra)
    if unknown:
        raise ValueError(f"unknown optional provenance columns {sorted(unknown)}")
    return pa.schema([
        ("key", pa.string()),
        ("shard", pa.int32()),
        ("index", pa.int32()),
        ("num_tokens", pa.int32()),
        ("main_asset_id", pa.string()),
        ("asset_ids", pa.list_(pa.string())),
        ("roles", pa.list_(pa.string())),
        ("license_ids", pa.list_(pa.string())),
        ("licensors", pa.list_(pa.string())),
        ("neighbour_scores", pa.list_(pa.float32())),
        ("order", pa.string()),
    ] + [(name, extra[name]) for name in OPTIONAL_COLUMNS if name in optional])


def provenance_parquet(rows: Iterable[dict[str, Any]]) -> bytes:
    """One provenance part; an optional column is written when any row carries it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = list(rows)
    schema = provenance_schema([c for c in OPTIONAL_COLUMNS if any(c in r for r in rows)])
    table = pa.Table.from_pylist([{c: r.get(c) for c in schema.names} for r in rows], schema=schema)
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


def webdataset_tar(arrays: Sequence[np.ndarray], rows: Sequence[dict[str, Any]]) -> bytes:
    """A stock webdataset shard: `KEY.tokens.npy` (the sequence) + `KEY.json` (its provenance row),
    in that order, through the curated store's tar writer (`tokenizer.shards.tar_writer`)."""
    from tokenizer.shards import tar_writer

    out = io.BytesIO()
    with tar_writer(out) as tar:
        for array, row in zip(arrays, rows):
            npy = io.BytesIO()
            np.save(npy, array, allow_pickle=False)
            meta = json.dumps(row, sort_keys=True, default=_json_default).encode()
            for suffix, data in (("tokens.npy", npy.getvalue()), ("json", meta)):
                tar.write({"__key__": row["key"], suffix: data})  # one member a call: keeps this order
    return out.getvalue()


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def tokens_index(shards: Sequence[dict[str, Any]], **extra: Any) -> bytes:
    """The bytes of `tokens/index.json`: every shard's counts and sha256s plus `extra`
    (model hashes, config hash, dtype, ...)."""
    shards = sorted(shards, key=lambda s: s["shard"])
    index = {
        "format": FORMAT,
        "shards": list(shards),
        "sequences": int(sum(s["sequences"] for s in shards)),
        "tokens": int(sum(s["tokens"] for s in shards)),
        **extra,
    }
    return (json.dumps(index, indent=2, sort_keys=True) + "\n").encode()


def load_tokens_index(tokens_dir: str) -> tuple[dict[str, Any], str]:
    """(parsed index.json, sha256 of its bytes): the hash identifies the shard set for resume."""
    with fsspec.open(f"{tokens_dir.rstrip('/')}/{INDEX_FILE}", "rb") as handle:
        data = handle.read()
    index = json.loads(data)
    if index.get("format") != FORMAT:
        raise ValueError(f"{tokens_dir}/{INDEX_FILE}: not a {FORMAT} index")
    return index, _sha256(data)
