"""Retrieval index over document embeddings, and CM3leon's neighbour-selection rules.

No Beam here: phase E builds the index from the embeddings Parquet with plain FAISS, and
the Beam neighbour stage (`pipeline/stages/index.py`) only loads it and calls
`select_neighbours`. Index choice follows corpus size and a memory budget: exact inner
product while that is cheap, IVF (flat, or PQ-compressed to fit the budget) beyond.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import random
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import fsspec
import numpy as np

from pipeline import storage

log = logging.getLogger(__name__)

INDEX_FILE = "faiss.index"
IDS_FILE = "ids.parquet"
INFO_FILE = "index.json"
KINDS = ("auto", "flat", "ivf_flat", "ivf_pq", "hnsw")


@dataclass(frozen=True)
class IndexConfig:
    """How `build_index` picks and sizes the FAISS index."""

    kind: str = "auto"  # auto | flat | ivf_flat | ivf_pq | hnsw
    memory_budget_bytes: int = 4 * 1024**3
    exact_max_vectors: int = 50_000  # below this, exact search is fast enough: use flat IP
    nlist: int = 0  # IVF lists; 0 = 4·sqrt(n)
    nprobe: int = 0  # IVF lists probed per query; 0 = max(16, nlist/40)
    hnsw_m: int = 32
    hnsw_ef_construction: int = 128
    hnsw_ef_search: int = 256
    seed: int = 0
    deterministic: bool = True  # single-threaded HNSW insertion so a rebuild is identical

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"IndexConfig.kind must be one of {KINDS}, got {self.kind!r}")
        if self.memory_budget_bytes <= 0:
            raise ValueError("IndexConfig.memory_budget_bytes must be > 0")


@dataclass(frozen=True)
class NeighbourConfig:
    """CM3leon's retrieval rules (see docs/alignment.md)."""

    k: int = 2
    max_score: float = 0.9  # a candidate scoring above this is a near copy of the query: skip
    max_pair_similarity: float = 0.9  # skip a candidate this similar (>=) to a chosen neighbour
    prefer_multimodal: bool = True  # take image+text documents before one-modality ones
    query: str = "document"  # document (image + text) | text | image
    query_token_dropout: float = 0.2  # fraction of caption tokens dropped when the query has text
    search_width: int = 32  # candidates fetched first; doubled until k are found...
    max_search_width: int = 4096  # ...or this many (or the whole index) were seen
    seed: int = 0

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError("NeighbourConfig.k must be >= 1")
        if self.query not in ("document", "text", "image"):
            raise ValueError("NeighbourConfig.query must be document | text | image")
        if not 0.0 <= self.query_token_dropout < 1.0:
            raise ValueError("NeighbourConfig.query_token_dropout must be in [0, 1)")


@dataclass
class LoadedIndex:
    """An index plus its id map: FAISS row i is document `keys[i]`."""

    index: Any
    keys: np.ndarray  # str
    cluster_ids: list[str | None]
    multimodal: np.ndarray  # bool: document has both image and text
    info: dict[str, Any]
    row_of: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.row_of:
            self.row_of = {str(k): i for i, k in enumerate(self.keys)}

    def vectors(self, rows: np.ndarray) -> np.ndarray:
        """Stored (for PQ: reconstructed) vectors of index rows, for the pairwise rule."""
        if len(rows) == 0:
            return np.zeros((0, self.index.d), np.float32)
        return self.index.reconstruct_batch(np.asarray(rows, dtype=np.int64))


# --------------------------------------------------------------------------- index choice


def choose_index(n: int, dim: int, cfg: IndexConfig) -> dict[str, Any]:
    """Pick index kind and parameters from corpus size and the memory budget.

    flat: exact, n·d·4 bytes, used up to `exact_max_vectors`. ivf_flat: same memory, scans
    ~nprobe/nlist of it. ivf_pq: when raw vectors do not fit, PQ codes sized to the budget."""
    flat_bytes = n * dim * 4
    nlist = cfg.nlist or int(min(65536, max(16, round(4 * math.sqrt(n)))))
    nlist = max(1, min(nlist, n // 39 or 1))  # FAISS wants ~39 training points per list
    nprobe = cfg.nprobe or max(16, nlist // 40)
    kind = cfg.kind
    if kind == "auto":
        if n <= cfg.exact_max_vectors and flat_bytes <= cfg.memory_budget_bytes:
            kind = "flat"
        elif flat_bytes * 1.1 <= cfg.memory_budget_bytes:
            kind = "ivf_flat"
        else:
            kind = "ivf_pq"
    params: dict[str, Any] = {"kind": kind, "n": n, "dim": dim}
    if kind in ("ivf_flat", "ivf_pq"):
        params.update(nlist=nlist, nprobe=min(nprobe, nlist))
    if kind == "ivf_pq":
        per_vector = max(1, int(cfg.memory_budget_bytes * 0.9 / max(n, 1)) - 8)  # 8 B id each
        m = max(d for d in range(1, dim + 1) if dim % d == 0 and d <= max(1, min(per_vector, dim // 2)))
        params.update(pq_m=m, pq_bits=8)
        if n * (m + 8) > cfg.memory_budget_bytes:
            raise ValueError(f"{n} vectors do not fit in {cfg.memory_budget_bytes} bytes even as PQ codes")
    if kind == "hnsw":
        params.update(hnsw_m=cfg.hnsw_m, ef_construction=cfg.hnsw_ef_construction, ef_search=cfg.hnsw_ef_search)
    return params


def _make_index(params: dict[str, Any], vectors: np.ndarray, seed: int, deterministic: bool):
    import faiss

    kind, dim = params["kind"], params["dim"]
    if kind == "flat":
        index = faiss.IndexFlatIP(dim)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, params["hnsw_m"], faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = params["ef_construction"]
        index.hnsw.efSearch = params["ef_search"]
    else:
        quantizer = faiss.IndexFlatIP(dim)
        if kind == "ivf_flat":
            index = faiss.IndexIVFFlat(quantizer, dim, params["nlist"], faiss.METRIC_INNER_PRODUCT)
        else:
            index = faiss.IndexIVFPQ(quantizer, dim, params["nlist"], params["pq_m"], params["pq_bits"],
                                     faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = seed
        index.nprobe = params["nprobe"]
        index.train(vectors)
    threads = faiss.omp_get_max_threads()
    if kind == "hnsw" and deterministic:
        faiss.omp_set_num_threads(1)
    try:
        index.add(vectors)
    finally:
        faiss.omp_set_num_threads(threads)
    if kind in ("ivf_flat", "ivf_pq"):
        index.make_direct_map()  # so `reconstruct` works for the pairwise-similarity rule
    return index


# ------------------------------------------------------------------------------ build/load


def build_index(
    doc_embs: np.ndarray,
    keys: Sequence[str],
    out_dir: str,
    cfg: IndexConfig = IndexConfig(),
    cluster_ids: Sequence[str | None] | None = None,
    multimodal: Sequence[bool] | None = None,
) -> dict[str, Any]:
    """Build the index over (normalised) document embeddings and save it to `out_dir` with
    its id map (`ids.parquet`: row, key, cluster_id, multimodal) and `index.json`.

    Rows are sorted by key first, so the same documents give the same index whatever order
    they arrived in. Returns the `index.json` content."""
    import faiss
    import pyarrow as pa
    import pyarrow.parquet as pq

    keys = [str(k) for k in keys]
    if len(keys) != len(doc_embs) or len(set(keys)) != len(keys):
        raise ValueError("build_index needs one unique key per embedding row")
    n = len(keys)
    cluster_ids = list(cluster_ids) if cluster_ids is not None else [None] * n
    multimodal = list(multimodal) if multimodal is not None else [True] * n
    order = sorted(range(n), key=keys.__getitem__)
    vectors = np.ascontiguousarray(np.asarray(doc_embs, dtype=np.float32)[order])
    params = choose_index(n, vectors.shape[1], cfg)
    index = _make_index(params, vectors, cfg.seed, cfg.deterministic)
    blob = faiss.serialize_index(index).tobytes()

    out_dir = out_dir.rstrip("/")
    fs, path = fsspec.core.url_to_fs(out_dir)
    fs.makedirs(path, exist_ok=True)
    storage.write_bytes(f"{out_dir}/{INDEX_FILE}", blob)
    table = pa.table({
        "row": pa.array(range(n), pa.int64()),
        "key": pa.array([keys[i] for i in order], pa.string()),
        "cluster_id": pa.array([cluster_ids[i] for i in order], pa.string()),
        "multimodal": pa.array([bool(multimodal[i]) for i in order], pa.bool_()),
    })
    buf = io.BytesIO()
    pq.write_table(table, buf)
    storage.write_bytes(f"{out_dir}/{IDS_FILE}", buf.getvalue())
    info = dict(params, config=asdict(cfg), index_sha256=hashlib.sha256(blob).hexdigest(),
                index_bytes=len(blob))
    storage.write_bytes(f"{out_dir}/{INFO_FILE}", json.dumps(info, indent=2, sort_keys=True).encode())
    log.info("built %s index over %d documents (%d bytes) in %s", params["kind"], n, len(blob), out_dir)
    return info


def load_index(index_dir: str) -> LoadedIndex:
    """Load an index written by `build_index` (local path or fsspec URL)."""
    import faiss
    import pyarrow.parquet as pq

    index_dir = index_dir.rstrip("/")
    with fsspec.open(f"{index_dir}/{INFO_FILE}", "r") as f:
        info = json.load(f)
    with fsspec.open(f"{index_dir}/{INDEX_FILE}", "rb") as f:
        index = faiss.deserialize_index(np.frombuffer(f.read(), dtype=np.uint8))
    if info["kind"] in ("ivf_flat", "ivf_pq"):
        index.nprobe = info["nprobe"]
        index.make_direct_map()
    if info["kind"] == "hnsw":
        index.hnsw.efSearch = info["ef_search"]
    with fsspec.open(f"{index_dir}/{IDS_FILE}", "rb") as f:
        ids = pq.read_table(io.BytesIO(f.read()))
    return LoadedIndex(
        index=index,
        keys=np.asarray(ids.column("key").to_pylist(), dtype=object),
        cluster_ids=ids.column("cluster_id").to_pylist(),
        multimodal=np.asarray(ids.column("multimodal").to_pylist(), dtype=bool),
        info=info,
    )


# ---------------------------------------------------------------------- neighbour rules


def key_seed(seed: int, key: str) -> int:
    """A per-document seed that does not depend on worker, batch or order."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "big")


def drop_query_tokens(tokens: "Any", rate: float, seeds: Sequence[int]) -> "Any":
    """CM3leon's query dropout: drop `rate` of each caption's content tokens (never the
    start/end tokens), deterministically per row seed, and re-pad. `tokens` is an open_clip
    token tensor [B, L] with SOT first, EOT = the row's largest id, 0 as padding."""
    import torch

    out = torch.zeros_like(tokens)
    for row, seed in enumerate(seeds):
        ids = tokens[row]
        eot = int(ids.argmax())
        content = ids[1:eot].tolist()
        n_drop = min(len(content) - 1, int(round(rate * len(content)))) if content else 0
        if n_drop > 0:
            drop = set(random.Random(seed).sample(range(len(content)), n_drop))
            content = [t for i, t in enumerate(content) if i not in drop]
        kept = [int(ids[0])] + content + [int(ids[eot])]
        out[row, : len(kept)] = torch.tensor(kept, dtype=tokens.dtype)
    return out


def _pick(
    loaded: LoadedIndex,
    key: str,
    cluster_id: str | None,
    cand_rows: np.ndarray,
    cand_scores: np.ndarray,
    cfg: NeighbourConfig,
) -> tuple[list[tuple[str, float]], bool]:
    """Apply the rules to one query's candidates (sorted best first). Also says whether the
    answer is final: k found, all image+text when that is preferred (else widen the search)."""
    eligible: list[tuple[int, float]] = []
    for row, score in zip(cand_rows.tolist(), cand_scores.tolist()):
        if row < 0:
            continue
        cand_key = str(loaded.keys[row])
        if cand_key == key or score > cfg.max_score:
            continue
        if cluster_id is not None and loaded.cluster_ids[row] == cluster_id:
            continue
        eligible.append((row, score))
    if cfg.prefer_multimodal:
        eligible.sort(key=lambda rs: not loaded.multimodal[rs[0]])  # stable: keeps score order
    vecs = loaded.vectors(np.asarray([r for r, _ in eligible], dtype=np.int64))
    chosen: list[int] = []
    out: list[tuple[str, float]] = []
    for i, (row, score) in enumerate(eligible):
        if chosen and float(np.max(vecs[chosen] @ vecs[i])) >= cfg.max_pair_similarity:
            continue
        chosen.append(i)
        out.append((str(loaded.keys[row]), float(score)))
        if len(out) == cfg.k:
            break
    final = len(out) == cfg.k and (not cfg.prefer_multimodal
                                   or all(loaded.multimodal[eligible[i][0]] for i in chosen))
    return out, final


def select_neighbours(
    loaded: LoadedIndex,
    queries: np.ndarray,
    keys: Sequence[str],
    cluster_ids: Sequence[str | None],
    cfg: NeighbourConfig = NeighbourConfig(),
) -> list[list[tuple[str, float]]]:
    """Up to `cfg.k` neighbours `(key, score)` per query, by maximum inner product, with
    CM3leon's rules: never the document itself, never a member of its dedup cluster, never
    a candidate scoring > `max_score`, never one >= `max_pair_similarity` to a neighbour
    already chosen; image+text documents first. Deterministic: ties break by key, and the
    search widens (doubling) until k image+text neighbours are found, or the whole index
    (at most `max_search_width` candidates) was seen; then one-modality ones fill up."""
    queries = np.ascontiguousarray(np.asarray(queries, dtype=np.float32))
    n = loaded.index.ntotal
    results: list[list[tuple[str, float]] | None] = [None] * len(queries)
    todo = list(range(len(queries)))
    width = min(n, max(cfg.search_width, 4 * cfg.k))
    while todo:
        scores, rows = loaded.index.search(queries[todo], width)
        next_todo = []
        for j, q in enumerate(todo):
            order = sorted(range(width), key=lambda c: (-scores[j, c], str(loaded.keys[rows[j, c]]) if rows[j, c] >= 0 else ""))
            picked, final = _pick(loaded, str(keys[q]), cluster_ids[q], rows[j, order], scores[j, order], cfg)
            if not final and width < min(n, cfg.max_search_width):
                next_todo.append(q)
            results[q] = picked
        todo = next_todo
        width = min(n, cfg.max_search_width, width * 2)
    return [r or [] for r in results]


# ----------------------------------------------------------------------- embeddings table


@dataclass
class EmbeddingTable:
    """The curated store's embeddings, as arrays (float32 for computing, stored float16)."""

    keys: list[str]
    asset_ids: list[str]
    cluster_ids: list[str | None]
    captions: list[list[str]]
    image_emb: np.ndarray
    text_emb: np.ndarray  # rows of zeros where a document has no text
    doc_emb: np.ndarray
    has_text: np.ndarray  # bool


def read_embeddings(urls: Sequence[str]) -> EmbeddingTable:
    """Read `embeddings-*.parquet` files (see docs/alignment.md) into one table, by key."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    tables = []
    for url in urls:
        with fsspec.open(url, "rb") as f:
            tables.append(pq.read_table(io.BytesIO(f.read())))
    if not tables:
        raise ValueError("no embeddings files given")
    table = pa.concat_tables(tables).sort_by("key")

    def matrix(name: str) -> np.ndarray:
        col = table.column(name).to_pylist()
        dim = len(next(v for v in col if v is not None))
        return np.stack([np.zeros(dim, np.float32) if v is None else np.asarray(v, np.float32) for v in col])

    text = table.column("text_emb").to_pylist()
    return EmbeddingTable(
        keys=table.column("key").to_pylist(),
        asset_ids=table.column("asset_id").to_pylist(),
        cluster_ids=table.column("cluster_id").to_pylist(),
        captions=table.column("captions").to_pylist(),
        image_emb=matrix("image_emb"),
        text_emb=matrix("text_emb"),
        doc_emb=matrix("doc_emb"),
        has_text=np.asarray([v is not None for v in text], dtype=bool),
    )


def build_index_from_embeddings(urls: Sequence[str], out_dir: str, cfg: IndexConfig = IndexConfig()) -> dict[str, Any]:
    """Phase E: the index over the curated store's document embeddings."""
    table = read_embeddings(urls)
    from numpy.linalg import norm

    docs = table.doc_emb / np.maximum(norm(table.doc_emb, axis=1, keepdims=True), 1e-12)  # float16 rounding
    return build_index(docs, table.keys, out_dir, cfg, cluster_ids=table.cluster_ids, multimodal=table.has_text)
