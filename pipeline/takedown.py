"""`curate audit takedown`: remove assets from every output of a run, rewriting only what holds them.

An asset lives in many places: its ledger row, a curated shard (image + metadata), its
embedding, its VQ codes, the FAISS index, the neighbour table, the token shard of its own
sequence and, as a retrieved neighbour, inside other documents' sequences (and SFT shards).
A takedown:

1. resolves the assets (ids, or every kept asset of a license or licensor), adds exact copies
   (same sha256 under another id), and appends them to `OUT/takedowns.jsonl` first: the
   record of intent, which a later `curate run` also honours (by id and by sha256);
2. marks their ledger rows TAKEN_DOWN (the rows stay: the ledger invariant holds);
3. rewrites the curated shards (and those of the prepared store kept for re-alignment),
   embedding files and code files that hold them, member by member (everything else in those
   files is copied byte for byte), and rebuilds the index;
4. removes them from the neighbour table; every other document keeps its remaining ranked
   candidates, so a sequence that used a taken-down neighbour gets the next one that fits
   under the same rules (`tokens.k`, `tokens.max_tokens`), or loses the slot;
5. rebuilds only the token shards holding an affected sequence, with the tokens step's own
   builder (`stages.tokens.build_sequences`), drops the assets' examples from SFT shards, and
   updates each shard set's `index.json`; every other shard keeps its bytes;
6. writes a report (`OUT/takedowns/report-<time>.json`): shards rewritten, sequences changed
   and dropped, and the models trained while the assets were in the corpus; and rewrites the
   attribution list and the Croissant card (pipeline/card.py), whose sha256s have changed.

Every file is replaced atomically, and each part is idempotent given `takedowns.jsonl`, so a
killed takedown rerun (the same command, or `curate audit takedown --resume`) completes it.
"""

from __future__ import annotations

import datetime as dt
import json
from typing import Any, Iterable, Sequence

import fsspec
import pyarrow as pa

from pipeline import ledger, storage
from pipeline.audit import AuditError

RECORDS = "takedowns.jsonl"


def load_takedowns(out: str) -> list[dict[str, Any]]:
    url = storage.join(out, RECORDS)
    if not storage.exists(url):
        return []
    with fsspec.open(url, "rt", encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def taken_down(out: str) -> tuple[frozenset[str], frozenset[str]]:
    """(asset ids, sha256s) a run into `out` must keep out."""
    records = load_takedowns(out)
    return frozenset(r["asset_id"] for r in records), frozenset(r["sha256"] for r in records if r.get("sha256"))


def _filter_parquets(folder: str, pattern: str, keys: frozenset[str], column: str = "key") -> list[str]:
    """Rewrite each file of `folder/pattern` that holds one of `keys` without those rows."""
    rewritten = []
    for url in storage.list_files(folder, pattern):
        table = storage.read_table(url)
        values = table.column(column).to_pylist()
        keep = [v not in keys for v in values]
        if all(keep):
            continue
        storage.write_table(url, table.filter(pa.array(keep)))
        rewritten.append(url.rsplit("/", 1)[-1])
    return rewritten


def _filter_store(curated: str, keys: frozenset[str]) -> list[str]:
    """Curated shards without the taken-down samples: tar members copied as they are, through the
    store's own writer (fixed headers, so the bytes equal a fresh write of the rest)."""
    from tokenizer.shards import atomic_open, iter_members, shard_name, tar_writer, write_index

    index = storage.read_json(storage.join(curated, "index.json"))
    entries = {e["shard"]: e for e in index["shards"]}
    rewritten = []
    for entry in list(entries.values()):
        meta_url = storage.join(curated, entry["metadata"])
        table = storage.read_table(meta_url)
        if not set(table.column("key").to_pylist()) & keys:
            continue
        tar_url = storage.join(curated, entry["tar"])
        kept = table.filter(pa.array([k not in keys for k in table.column("key").to_pylist()]))
        if kept.num_rows:
            with atomic_open(tar_url, "wb") as handle, tar_writer(handle) as tar:
                for name, data in iter_members(tar_url, max_member_bytes=None):
                    key, _, ext = name.partition(".")
                    if key not in keys:
                        tar.write({"__key__": key, ext: data})
            storage.write_table(meta_url, kept)
            entries[entry["shard"]] = {**entry, "samples": kept.num_rows, "tar_sha256": storage.file_sha256(tar_url)}
        else:
            for url in (tar_url, meta_url):
                storage.remove_tree(url)
            del entries[entry["shard"]]
        rewritten.append(shard_name(entry["shard"]))
    if rewritten:
        write_index(curated, list(entries.values()))
    return rewritten


def _filter_neighbours(index_dir: str, keys: frozenset[str]) -> list[str]:
    """The neighbour table without the taken-down documents, as rows or as candidates."""
    rewritten = []
    for url in storage.list_files(index_dir, "neighbours-*.parquet"):
        table = storage.read_table(url)
        rows = table.to_pylist()
        changed = False
        out_rows = []
        for row in rows:
            if row["key"] in keys:
                changed = True
                continue
            pairs = list(zip(row["neighbour_keys"] or [], row["scores"] or []))
            kept = [(k, s) for k, s in pairs if k not in keys]
            if len(kept) != len(pairs):
                changed = True
                row = {**row, "neighbour_keys": [k for k, _ in kept], "scores": [s for _, s in kept]}
            out_rows.append(row)
        if changed:
            storage.write_table(url, pa.Table.from_pylist(out_rows, schema=table.schema))
            rewritten.append(url.rsplit("/", 1)[-1])
    return rewritten


def _sequences(folder: str) -> list[dict[str, Any]]:
    parts = storage.list_files(storage.join(folder, "sequences.parquet"), "*.parquet")
    return [row for url in parts for row in storage.read_table(url).to_pylist()]


def _shard_tokens(folder: str, shard: int, index: int, dtype) -> Any:
    import numpy as np

    from tokenizer.token_shards import parse_index, shard_name

    name = shard_name(shard)
    with fsspec.open(storage.join(folder, f"{name}.idx"), "rb") as handle:
        idx = parse_index(handle.read())
    start = int(idx.pointers[index])
    with fsspec.open(storage.join(folder, f"{name}.bin"), "rb") as handle:
        handle.seek(start)
        return np.frombuffer(handle.read(int(idx.lengths[index]) * idx.dtype.itemsize), dtype=idx.dtype)


def _write_set_index(folder: str, entries: dict[int, dict[str, Any]], index: dict[str, Any],
                     histograms: dict[str, str]) -> None:
    """Rewrite a shard set's index.json: the old fields, with the shard entries and totals renewed."""
    from pipeline.stages.tokens import write_tokens_index

    fixed = {"format", "dtype", "shards", "sequences", "tokens", *histograms.values()}
    extra = {k: v for k, v in index.items() if k not in fixed}
    write_tokens_index(folder, [entries[s] for s in sorted(entries)], index["dtype"], extra, histograms)


def _entry_counts(rows: Sequence[dict[str, Any]], field: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for row in rows:
        n = str(len(row["asset_ids"]) - 1) if field == "neighbour_counts" else row.get("task") or "?"
        counts[n] = counts.get(n, 0) + 1
    return counts


def _rewrite_tokens(out: str, cfg, keys: frozenset[str], asset_ids: frozenset[str]) -> dict[str, Any]:
    """Rebuild the token shards that hold a taken-down asset, with the tokens step's builder."""
    from pipeline.stages.tokens import (NEIGHBOUR_HISTOGRAM, SharedVocab, build_sequences, make_document, read_codes,
                                        write_token_shard)

    folder = storage.join(out, "tokens")
    if not storage.exists(storage.join(folder, "index.json")):
        return {"shards_rewritten": [], "sequences_changed": [], "sequences_dropped": []}
    index = storage.read_json(storage.join(folder, "index.json"))
    sequences = _sequences(folder)
    affected = {r["shard"] for r in sequences if set(r["asset_ids"]) & asset_ids}
    if not affected:
        return {"shards_rewritten": [], "sequences_changed": [], "sequences_dropped": []}
    mains_of = {s: [r for r in sequences if r["shard"] == s and r["main_asset_id"] not in asset_ids] for s in affected}
    dropped = sorted(r["key"] for r in sequences if r["shard"] in affected and r["main_asset_id"] in asset_ids)
    changed = sorted(r["key"] for r in sequences if r["main_asset_id"] not in asset_ids
                     and set(r["asset_ids"][1:]) & asset_ids)
    wanted = {r["key"] for rows in mains_of.values() for r in rows}
    neighbour_rows = {row["key"]: row for url in storage.list_files(storage.join(out, "index"), "neighbours-*.parquet")
                      for row in storage.read_table(url).to_pylist() if row["key"] in wanted}
    k = cfg.tokens.k
    for row in neighbour_rows.values():
        wanted.update((row["neighbour_keys"] or [])[:k])
    meta = {}
    for url in storage.list_files(storage.join(out, "curated"), "metadata-*.parquet"):
        table = storage.read_table(url).select(["key", "asset_id", "captions", "license_id", "licensor"])
        meta.update({row["key"]: row for row in table.to_pylist() if row["key"] in wanted})
    codes = {key: c for url in storage.list_files(storage.join(out, "codes"), "codes-*.parquet")
             for key, c in read_codes(url) if key in wanted}
    vocab = SharedVocab(storage.join(folder, "vocab.json")).load()
    docs = {key: make_document(vocab, meta[key], codes[key], cfg.seed) for key in wanted if key in meta and key in codes}
    entries = {e["shard"]: e for e in index["shards"]}
    for shard in sorted(affected):
        mains = {r["key"]: docs[r["key"]] for r in mains_of[shard] if r["key"] in docs}
        ranked = {}
        for key in mains:
            row = neighbour_rows.get(key) or {"neighbour_keys": [], "scores": []}
            pairs = [(n, s) for n, s in zip(row["neighbour_keys"] or [], row["scores"] or []) if n in docs][:k]
            ranked[key] = [(rank, float(score), docs[n]) for rank, (n, score) in enumerate(pairs)]
        built = build_sequences(vocab, cfg.tokens, cfg.seed, mains, ranked)
        if built.sequences:
            entries[shard] = write_token_shard(folder, shard, built.sequences, built.rows, index["dtype"],
                                               cfg.tokens.webdataset)
        else:
            _remove_shard(folder, shard)
            entries.pop(shard, None)
    for shard, entry in entries.items():  # untouched shards: their counts from their provenance
        if "neighbour_counts" not in entry:
            entry["neighbour_counts"] = _entry_counts([r for r in sequences if r["shard"] == shard], "neighbour_counts")
    _write_set_index(folder, entries, index, NEIGHBOUR_HISTOGRAM)
    return {"shards_rewritten": sorted(affected), "sequences_changed": changed, "sequences_dropped": dropped}


def _remove_shard(folder: str, shard: int) -> None:
    from tokenizer.token_shards import SEQUENCES_DIR, shard_name

    name = shard_name(shard)
    for rel in (f"{name}.bin", f"{name}.idx", f"{name}.tar", f"{SEQUENCES_DIR}/part-{shard:06d}.parquet"):
        storage.remove_tree(storage.join(folder, rel))


def _drop_from_sft(out: str, asset_ids: frozenset[str]) -> dict[str, Any]:
    """SFT examples have no neighbours: drop the assets' examples, copy every other one's tokens."""
    from pipeline.stages.sft import SFT_HISTOGRAMS
    from pipeline.stages.tokens import write_token_shard

    folder = storage.join(out, "sft")
    if not storage.exists(storage.join(folder, "index.json")):
        return {"shards_rewritten": [], "sequences_dropped": []}
    index = storage.read_json(storage.join(folder, "index.json"))
    sequences = _sequences(folder)
    affected = sorted({r["shard"] for r in sequences if set(r["asset_ids"]) & asset_ids})
    entries = {e["shard"]: e for e in index["shards"]}
    dropped = []
    for shard in affected:
        rows = sorted((r for r in sequences if r["shard"] == shard), key=lambda r: r["index"])
        keep = [r for r in rows if not set(r["asset_ids"]) & asset_ids]
        dropped += [r["key"] for r in rows if set(r["asset_ids"]) & asset_ids]
        if keep:
            tokens = [_shard_tokens(folder, shard, r["index"], index["dtype"]) for r in keep]
            provenance = [{k: v for k, v in r.items() if k not in ("shard", "index", "num_tokens")} for r in keep]
            entry = write_token_shard(folder, shard, tokens, provenance, index["dtype"],
                                      storage.exists(storage.join(folder, f"tokens-{shard:06d}.tar")))
            entry.pop("neighbour_counts", None)
            entries[shard] = {**entry, "task_counts": _entry_counts(keep, "task_counts")}
        else:
            _remove_shard(folder, shard)
            entries.pop(shard, None)
    if affected:
        for shard, entry in entries.items():
            if "task_counts" not in entry:
                entry["task_counts"] = _entry_counts([r for r in sequences if r["shard"] == shard], "task_counts")
        _write_set_index(folder, entries, index, SFT_HISTOGRAMS)
    return {"shards_rewritten": affected, "sequences_dropped": sorted(dropped)}


def _models(out: str) -> list[dict[str, str]]:
    """The models a run trained on its curated data: all of them saw every kept asset."""
    found = []
    for name, path, retrain in (("CLIP", "models/clip/clip.safetensors", "curate train-clip --out OUT"),
                                ("VQ image tokenizer", "models/vq/vq.safetensors", "curate train-vq --out OUT"),
                                ("BPE text tokenizer", "models/text-bpe.json", "curate train-text --out OUT"),
                                ("reference LM", "models/lm/lm.safetensors", "curate train-lm --out OUT")):
        url = storage.join(out, path)
        if storage.exists(url):
            found.append({"model": name, "file": path, "sha256": storage.file_sha256(url), "retrain": retrain})
    return found


def takedown(out: str, asset_ids: Iterable[str] = (), license_id: str | None = None, licensor: str | None = None,
             reason: str = "", now: dt.datetime | None = None) -> dict[str, Any]:
    """Take assets down everywhere in run `out`; returns (and writes) the report. Emits the
    lineage events of job `cm3curate.takedown` (a refused request is a FAIL event)."""
    from pipeline.lineage import Lineage

    touched = ["ledger", "curated", "codes", "index", "tokens", "sft", RECORDS]
    with Lineage(out).job("takedown", inputs=[out], outputs=[storage.join(out, name) for name in touched]):
        return _takedown(out, asset_ids, license_id, licensor, reason, now)


def _takedown(out: str, asset_ids: Iterable[str], license_id: str | None, licensor: str | None, reason: str,
              now: dt.datetime | None) -> dict[str, Any]:
    from pipeline.config import RunConfig, from_dict
    from pipeline.retrieval import build_index_from_embeddings

    if not reason.strip():
        raise AuditError("takedown needs --reason (it is recorded with every asset)")
    ids = list(dict.fromkeys(asset_ids))
    if not ids and not license_id and not licensor:
        raise AuditError("takedown needs asset ids, --license or --licensor")
    if not storage.exists(storage.join(out, "run.json")):
        raise AuditError(f"{out} holds no completed run (no run.json)")
    cfg = from_dict(RunConfig, storage.read_json(storage.join(out, "run.json"))["config"])
    stamp = (now or dt.datetime.now(dt.timezone.utc)).isoformat(timespec="seconds")
    records = load_takedowns(out)
    done = {r["asset_id"] for r in records}
    rows = ledger.read_ledger(out).to_pylist()
    kept = [r for r in rows if r["status"] == "kept"]
    picked = [r for r in kept if r["asset_id"] in ids or (license_id and r["license_id"] == license_id)
              or (licensor and r["licensor"] == licensor)]
    missing = [i for i in ids if i not in {r["asset_id"] for r in picked} | done]
    if missing:
        raise AuditError(f"not a kept asset of this run: {missing[:5]} (curate audit asset ID says why)")
    request = {"asset_ids": ids, "license": license_id, "licensor": licensor, "reason": reason}
    shas = {r["sha256"] for r in picked if r["sha256"]}
    new = []
    for r in kept:
        if r["asset_id"] in done:
            continue
        if r in picked:
            match = "requested"
        elif r["sha256"] in shas:
            match = "an exact copy (same sha256) of a requested asset"
        else:
            continue
        new.append({"asset_id": r["asset_id"], "key": r["key"], "sha256": r["sha256"], "license_id": r["license_id"],
                    "licensor": r["licensor"], "reason": reason, "match": match, "taken_down_at": stamp,
                    "request": request})
    if new:  # the record of intent comes first: a rerun completes from it
        lines = "".join(json.dumps(r, sort_keys=True) + "\n" for r in records + new)
        storage.write_bytes(storage.join(out, RECORDS), lines.encode("utf-8"))
    records += new
    keys = frozenset(r["key"] for r in records)
    gone = frozenset(r["asset_id"] for r in records)
    rejections = {r["key"]: ("TAKEN_DOWN", f"{r['taken_down_at']}: {r['reason']}") for r in records}
    ledger.update_statuses(out, "audit", reject=rejections)
    prepared = storage.join(out, "_work", "prepared")  # the store before alignment, kept to re-align cheaply
    if storage.exists(storage.join(prepared, "index.json")):
        _filter_store(prepared, keys)
        ledger.update_statuses(prepared, "audit", reject=rejections)
    standby = storage.join(prepared, "standby")  # duplicates a re-alignment could promote
    if storage.exists(storage.join(standby, "index.json")):
        _filter_store(standby, keys)
    curated = storage.join(out, "curated")
    store = _filter_store(curated, keys) if storage.exists(storage.join(curated, "index.json")) else []
    embeddings = _filter_parquets(curated, "embeddings-*.parquet", keys)
    codes = _filter_parquets(storage.join(out, "codes"), "codes-*.parquet", keys)
    neighbours = _filter_neighbours(storage.join(out, "index"), keys)
    if embeddings and storage.exists(storage.join(out, "index", "index.json")):
        build_index_from_embeddings(storage.list_files(curated, "embeddings-*.parquet"), storage.join(out, "index"),
                                    cfg.index)
    tokens = _rewrite_tokens(out, cfg, keys, gone)
    sft = _drop_from_sft(out, gone)
    report = {
        "taken_down_at": stamp, "request": request,
        "assets": [{k: r[k] for k in ("asset_id", "key", "sha256", "license_id", "match")} for r in new],
        "already_taken_down": sorted(set(ids) & done),
        "curated_shards_rewritten": store, "embedding_files_rewritten": embeddings, "code_files_rewritten": codes,
        "neighbour_files_rewritten": neighbours, "index_rebuilt": bool(embeddings),
        "token_shards_rewritten": tokens["shards_rewritten"], "sequences_changed": tokens["sequences_changed"],
        "sequences_dropped": tokens["sequences_dropped"],
        "sft_shards_rewritten": sft["shards_rewritten"], "sft_examples_dropped": sft["sequences_dropped"],
        "models_trained_with_these_assets": _models(out),
        "models_note": ("every model above was trained on the curated store while these assets were in it; "
                        "the takedown does not change their weights. Retrain them (commands above, or rerun "
                        "`curate run` with a changed clip_train/vq/text seed) to remove the assets' influence."),
    }
    storage.write_json(storage.join(out, "takedowns", f"report-{stamp.replace(':', '')}.json"), report)
    from manifests.policy import policy_from_dict
    from pipeline.card import write_attribution, write_card
    from pipeline.report import write_report

    run_record = storage.read_json(storage.join(out, "run.json"))
    policy = policy_from_dict(run_record["policy"])
    write_attribution(out, policy.attribution_required)  # the card last: it lists every file's sha256
    summary = ledger.check_invariant(out, run_record["ledger"]["rows_in"]).to_json()
    write_report(out)
    write_card(out, cfg, policy, summary)
    return report
