"""Encode stage: curated JPEGs -> VQ codes, batched, with the model loaded once per worker.

`EncodeImages` maps `(key, jpeg_bytes)` to `(key, codes)` (uint16 [h, w] for codebooks up to
65,536) and sends undecodable images to the `rejected` output, following the stage contract
(counters `encode/in`, `encode/kept`, `encode/rejected/<reason>`). `encode_curated_store` runs it
over a curated store and writes `codes-NNNNNN.parquet` (key, asset_id, codes, h, w), each shard
sorted by key and assigned by a stable hash of the key, so reruns are byte-identical.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Sequence

import apache_beam as beam
import fsspec
import numpy as np
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.utils.shared import Shared

from pipeline import ledger, storage
from pipeline.progress import Progress, counted
from pipeline.records import Rejected, RejectReason
from pipeline.stages.base import REJECTED, Stage, StageCounters

log = logging.getLogger(__name__)

STAGE = Stage.ENCODE


@dataclass(frozen=True)
class EncodeConfig:
    """Which VQ checkpoint to run and how to batch it."""

    model_path: str  # vq.safetensors (json beside it) or its folder; any fsspec URL
    batch_size: int = 32
    min_batch_size: int | None = None  # None: fixed-size batches (= batch_size) except at bundle ends
    device: str = "cpu"  # cpu | cuda | auto
    num_threads: int | None = None  # torch intra-op threads per worker; None leaves torch's default

    def __post_init__(self) -> None:
        if not self.model_path:
            raise ValueError("EncodeConfig.model_path is required")
        if self.batch_size < 1 or (self.min_batch_size is not None and not 1 <= self.min_batch_size <= self.batch_size):
            raise ValueError("need 1 <= min_batch_size <= batch_size")
        if self.device not in ("cpu", "cuda", "auto"):
            raise ValueError(f"device must be cpu, cuda or auto, got {self.device!r}")


def codes_dtype(codebook_size: int) -> np.dtype:
    """uint16 for every codebook up to 65,536 codes (the vocab's on-disk dtype), else uint32."""
    return np.dtype(np.uint16) if codebook_size <= 65536 else np.dtype(np.uint32)


class _ModelHolder:
    """Weak-referenceable wrapper so `Shared` can hand one model to every DoFn in a process."""

    def __init__(self, model: Any) -> None:
        self.model = model


class _EncodeBatchDoFn(beam.DoFn):
    def __init__(self, cfg: EncodeConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self._shared = Shared()
        self._model = None
        self._counters: StageCounters | None = None

    def setup(self) -> None:
        import torch

        from tokenizer.vq.model import load_vq

        if self.cfg.num_threads:
            torch.set_num_threads(self.cfg.num_threads)
        device = self.cfg.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"

        def load() -> _ModelHolder:
            log.info("encode: loading %s on %s", self.cfg.model_path, device)
            return _ModelHolder(load_vq(self.cfg.model_path, device=device))

        self._model = self._shared.acquire(load, tag=f"{self.cfg.model_path}@{device}").model
        self._dtype = codes_dtype(self._model.cfg.codebook_size)
        self._counters = StageCounters(STAGE)

    def _reject(self, key: str, reason: RejectReason, detail: str) -> beam.pvalue.TaggedOutput:
        self._counters.rejected(reason)  # type: ignore[union-attr]
        return beam.pvalue.TaggedOutput(
            REJECTED, Rejected(asset_id=key, stage=STAGE, reason=reason, detail=detail[:2000], manifest_uri="", manifest_row=-1)
        )

    def process(self, batch: Sequence[tuple[str, bytes]]) -> Iterator[Any]:
        from PIL import Image, UnidentifiedImageError

        counters = self._counters
        assert counters is not None and self._model is not None
        counters.seen.inc(len(batch))
        factor = self._model.cfg.downsample_factor
        groups: dict[tuple[int, int], list[tuple[str, np.ndarray]]] = {}
        for key, data in batch:
            try:
                img = Image.open(io.BytesIO(data))
                img.load()
                arr = np.asarray(img.convert("RGB") if img.mode != "RGB" else img, dtype=np.uint8)
            except UnidentifiedImageError as exc:
                yield self._reject(key, RejectReason.NOT_AN_IMAGE, str(exc))
                continue
            except (OSError, ValueError) as exc:
                yield self._reject(key, RejectReason.TRUNCATED_IMAGE, f"{type(exc).__name__}: {exc}")
                continue
            if arr.shape[0] % factor or arr.shape[1] % factor:
                yield self._reject(key, RejectReason.ERROR, f"image {arr.shape[1]}x{arr.shape[0]} not divisible by f{factor}")
                continue
            groups.setdefault(arr.shape[:2], []).append((key, arr))
        for items in groups.values():  # curated images share one size, so this is one group
            try:
                codes = self._model.encode_codes(np.stack([a for _, a in items]))
            except Exception as exc:  # noqa: BLE001 - the contract: errors become ledger rows
                log.warning("encode: batch of %d failed: %s", len(items), exc)
                for key, _ in items:
                    yield self._reject(key, RejectReason.ERROR, f"{type(exc).__name__}: {exc}")
                continue
            codes = codes.astype(self._dtype)
            for (key, _), c in zip(items, codes):
                counters.kept.inc()
                yield key, c


class EncodeImages(beam.PTransform):
    """`(key, jpeg_bytes)` -> `(key, codes [h, w])`; returns `(kept, rejected)` PCollections."""

    def __init__(self, cfg: EncodeConfig, label: str | None = None) -> None:
        super().__init__(label)
        weights = cfg.model_path if cfg.model_path.endswith(".safetensors") else cfg.model_path.rstrip("/") + "/vq.safetensors"
        fs, path = fsspec.core.url_to_fs(weights)
        if not fs.exists(path):  # fail when the graph is built, not on the first worker
            raise FileNotFoundError(f"VQ checkpoint not found: {weights}")
        self.cfg = cfg

    def expand(self, pcoll: beam.PCollection) -> tuple[beam.PCollection, beam.PCollection]:
        cfg = self.cfg
        batched = pcoll | "Batch" >> beam.BatchElements(
            min_batch_size=cfg.min_batch_size or cfg.batch_size, max_batch_size=cfg.batch_size
        )
        out = batched | "Encode" >> beam.ParDo(_EncodeBatchDoFn(cfg)).with_outputs(REJECTED, main="kept")
        return out.kept, out[REJECTED]


# -- running it over a curated store ------------------------------------------------------------


def _read_shard(url: str) -> Iterator[tuple[str, tuple[bytes, str]]]:
    from tokenizer.shards import iter_shard

    for s in iter_shard(url):
        yield s.key, (s.jpeg, str(s.meta.get("asset_id", s.key)))


def _join_row(item: tuple[str, dict[str, list]]) -> Iterator[dict[str, Any]]:
    key, groups = item
    for codes in groups["codes"]:
        asset_ids = groups["asset_id"]
        yield {"key": key, "asset_id": asset_ids[0] if asset_ids else key, "codes": codes}


def _write_codes_shard(item: tuple[int, Iterable[dict[str, Any]]], out_dir: str) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    idx, rows = item
    rows = sorted(rows, key=lambda r: r["key"])
    dtype = pa.uint16() if rows and rows[0]["codes"].dtype == np.uint16 else pa.uint32()
    schema = pa.schema([("key", pa.string()), ("asset_id", pa.string()), ("codes", pa.list_(dtype)), ("h", pa.int32()), ("w", pa.int32())])
    table = pa.table(
        {
            "key": [r["key"] for r in rows],
            "asset_id": [r["asset_id"] for r in rows],
            "codes": [r["codes"].reshape(-1) for r in rows],
            "h": [int(r["codes"].shape[0]) for r in rows],
            "w": [int(r["codes"].shape[1]) for r in rows],
        },
        schema=schema,
    )
    url = f"{out_dir.rstrip('/')}/codes-{idx:06d}.parquet"
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    storage.write_bytes(url, buf.getvalue())
    return url


def encode_curated_store(curated_dir: str, model_path: str, out_dir: str, pipeline_options: PipelineOptions | None = None,
                         batch_size: int = 32, device: str = "cpu", num_shards: int | None = None,
                         progress: Progress | None = None, rejected_url: str | None = None) -> dict[str, Any]:
    """Encode every image of `curated_dir` into `out_dir/codes-NNNNNN.parquet`; returns counts and files.

    Images that cannot be encoded go to `rejected_url` (JSONL: key, stage, reason, detail;
    default `out_dir/encode-rejected.jsonl`), which a run hands to the ledger."""
    from pipeline.runner import run_beam
    from tokenizer.shards import list_shards

    shards = list_shards(curated_dir)
    if not shards:
        raise ValueError(f"no images-*.tar shards under {curated_dir}")
    n_out = num_shards or len(shards)
    fs, root = fsspec.core.url_to_fs(out_dir)
    fs.makedirs(root, exist_ok=True)
    rejected_url = rejected_url or storage.join(out_dir, "encode-rejected.jsonl")
    for stale in fs.glob(root.rstrip("/") + "/codes-*.parquet"):
        fs.rm(stale)  # a rerun with another shard count must not leave old shards behind
    storage.remove_tree(rejected_url)
    cfg = EncodeConfig(model_path=model_path, batch_size=batch_size, device=device)
    counters = run_beam(lambda p: _encode_graph(p, cfg, shards, n_out, out_dir, rejected_url, progress),
                        pipeline_options or PipelineOptions())
    counts = {k.split("/", 1)[1]: v for k, v in counters.items() if k.startswith(f"{STAGE}/")}
    files = sorted(fs.unstrip_protocol(f) if "://" in out_dir else f for f in fs.glob(root.rstrip("/") + "/codes-*.parquet"))
    log.info("encode: %s -> %d parquet shards, counters %s", curated_dir, len(files), counts)
    return {"counters": counts, "files": files, "rejected": sum(v for k, v in counts.items() if k.startswith("rejected/"))}


def _encode_graph(p: beam.Pipeline, cfg: EncodeConfig, shards: list[str], n_out: int, out_dir: str, rejected_url: str,
                  progress: Progress | None) -> None:
    samples = (
        p
        | "ListShards" >> beam.Create(shards)
        | "ReadShards" >> beam.FlatMap(_read_shard)
        | "Spread" >> beam.Reshuffle()
    )
    kept, rejected = counted(samples, progress) | "ToBytes" >> beam.Map(lambda kv: (kv[0], kv[1][0])) | "EncodeImages" >> EncodeImages(cfg)
    asset_ids = samples | "AssetIds" >> beam.Map(lambda kv: (kv[0], kv[1][1]))
    (
        {"codes": kept, "asset_id": asset_ids}
        | "Join" >> beam.CoGroupByKey()
        | "Rows" >> beam.FlatMap(_join_row)
        | "AssignShard" >> beam.Map(lambda r: (storage.stable_bucket(r["key"], n_out), r))
        | "GroupShard" >> beam.GroupByKey()
        | "WriteShard" >> beam.Map(_write_codes_shard, out_dir)
    )
    _ = (rejected
         | "RejectedRows" >> beam.Map(lambda r: {"key": r.asset_id, "reason": r.reason.value, "detail": r.detail})
         | "WriteRejected" >> ledger.WriteChanges(rejected_url))
