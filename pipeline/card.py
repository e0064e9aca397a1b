"""The run's dataset card and attribution list: `OUT/croissant.json`, `OUT/ATTRIBUTION.md|.csv`.

- `croissant.json` is Croissant 1.1 JSON-LD built with `mlcroissant` (MLCommons' reference
  library, so the context and the vocabulary are the standard's own): the RAI fields
  (collection, preprocessing, manipulation, limitations, biases, use cases, personal or
  sensitive information, maintenance), a FileObject with sha256 for every output file, and
  RecordSets for the token sequences and the curated assets with the license of each record.
- `ATTRIBUTION.md` and `ATTRIBUTION.csv` list every kept asset whose license requires
  attribution (the policy's `attribution_required`, e.g. the CC BY family): what CC BY asks
  of whoever redistributes the data.

Both are rewritten at the end of every run and after every takedown (`pipeline/takedown.py`).
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
from typing import Any

import fsspec

from pipeline import storage

CARD = "croissant.json"
ATTRIBUTION = "ATTRIBUTION"
_SKIP = ("_work/", "_state/", "_logs/", "lineage/", "report/", "_lock.json", ".cm3curate-run", CARD, f"{ATTRIBUTION}.md",
         f"{ATTRIBUTION}.csv")
_FORMATS = {".parquet": "application/x-parquet", ".tar": "application/x-tar", ".json": "application/json",
            ".jsonl": "application/jsonlines", ".bin": "application/octet-stream", ".idx": "application/octet-stream",
            ".safetensors": "application/octet-stream", ".png": "image/png", ".txt": "text/plain",
            ".faiss": "application/octet-stream", ".md": "text/markdown", ".csv": "text/csv"}


def _files(out: str) -> list[tuple[str, int]]:
    """(relative path, size) of every output file a card describes."""
    fs, root = fsspec.core.url_to_fs(out)
    root = root.rstrip("/")
    found = []
    for path, info in sorted(fs.find(root, detail=True).items()):
        rel = path[len(root) + 1:]
        if rel.startswith(_SKIP) or "/.tmp-" in f"/{rel}":
            continue
        found.append((rel, int(info.get("size") or 0)))
    return found


def _rows(out: str, folder: str, pattern: str, columns: list[str]) -> list[dict[str, Any]]:
    rows = []
    for url in storage.list_files(storage.join(out, folder), pattern):
        table = storage.read_table(url)
        rows += table.select([c for c in columns if c in table.column_names]).to_pylist()
    return rows


def _source_link(row: dict[str, Any]) -> str:
    extra = json.loads(row.get("extra_json") or "{}")
    for name in ("source_url", "flickr_url", "url", "page_url"):
        if isinstance(extra.get(name), str):
            return extra[name]
    return row.get("source_uri") or ""


def write_attribution(out: str, attribution_required: frozenset[str]) -> int:
    """ATTRIBUTION.md + .csv: every kept asset whose license requires attribution; returns the count."""
    rows = _rows(out, "curated", "metadata-*.parquet", ["asset_id", "licensor", "license_id", "license_name",
                                                        "license_url", "source_uri", "extra_json"])
    rows = sorted((r for r in rows if r["license_id"] in attribution_required), key=lambda r: r["asset_id"])
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["asset_id", "licensor", "source", "license_id", "license_name", "license_url"])
    lines = ["# Attribution", "",
             "The images in this corpus whose licenses require attribution, with their creators and licenses.", "",
             "| asset | licensor | source | license |", "|---|---|---|---|"]
    cell = (lambda s: str(s or "").replace("|", "\\|").replace("\n", " "))  # noqa: E731 - one Markdown cell
    for r in rows:
        source = _source_link(r)
        writer.writerow([r["asset_id"], r["licensor"] or "", source, r["license_id"], r["license_name"] or "",
                         r["license_url"] or ""])
        license_text = f"[{cell(r['license_name'] or r['license_id'])}]({cell(r['license_url'])})" \
            if r["license_url"] else cell(r["license_name"] or r["license_id"])
        lines.append(f"| {cell(r['asset_id'])} | {cell(r['licensor'])} | {cell(source)} | {license_text} |")
    storage.write_bytes(storage.join(out, f"{ATTRIBUTION}.csv"), buf.getvalue().encode("utf-8"))
    storage.write_bytes(storage.join(out, f"{ATTRIBUTION}.md"), ("\n".join(lines) + "\n").encode("utf-8"))
    return len(rows)


def _field(mlc, record_set: str, file_set: str, column: str, data_type, description: str, repeated: bool = False):
    return mlc.Field(id=f"{record_set}/{column}", name=column, description=description, data_types=[data_type],
                     repeated=repeated or None,
                     source=mlc.Source(file_set=file_set, extract=mlc.Extract(column=column)))


def _known_sha256(out: str) -> dict[str, str]:
    """sha256s the shard sets already record (token .bin/.idx/.tar, curated tars): not hashed again."""
    known = {}
    for folder in ("tokens", "sft"):
        url = storage.join(out, folder, "index.json")
        if storage.exists(url):
            for e in storage.read_json(url).get("shards", []):
                for ext in ("bin", "idx", "tar"):
                    if e.get(f"{ext}_sha256"):
                        known[f"{folder}/{e['name']}.{ext}"] = e[f"{ext}_sha256"]
    url = storage.join(out, "curated", "index.json")
    if storage.exists(url):
        known.update({f"curated/{e['tar']}": e["tar_sha256"] for e in storage.read_json(url).get("shards", [])})
    return known


def write_card(out: str, cfg, policy, summary: dict[str, Any]) -> dict[str, Any]:
    """croissant.json for the run in `out`; returns the JSON-LD written."""
    import mlcroissant as mlc

    files = _files(out)
    known = _known_sha256(out)
    distribution: list[Any] = []
    for rel, size in files:
        suffix = "." + rel.rsplit(".", 1)[-1] if "." in rel.rsplit("/", 1)[-1] else ""
        distribution.append(mlc.FileObject(id=rel, name=rel, content_url=rel, content_size=f"{size} B",
                                           encoding_formats=[_FORMATS.get(suffix, "application/octet-stream")],
                                           sha256=known.get(rel) or storage.file_sha256(storage.join(out, rel))))
    record_sets = []
    T, I = mlc.DataType.TEXT, mlc.DataType.INTEGER
    if any(rel.startswith("tokens/sequences.parquet/") for rel, _ in files):
        distribution.append(mlc.FileSet(id="sequences-parquet", name="sequences-parquet",
                                        encoding_formats=["application/x-parquet"],
                                        includes=["tokens/sequences.parquet/*.parquet"],
                                        description="token-sequence provenance, one part per token shard"))
        record_sets.append(mlc.RecordSet(id="sequences", name="sequences", key=["sequences/key"],
                                         description="one record per CM3 token sequence (tokens/tokens-*.bin/.idx), "
                                                     "with every asset in it and the license of each", fields=[
            _field(mlc, "sequences", "sequences-parquet", "key", T, "sequence key (its main document's key)"),
            _field(mlc, "sequences", "sequences-parquet", "shard", I, "token shard number"),
            _field(mlc, "sequences", "sequences-parquet", "index", I, "sequence index inside the shard"),
            _field(mlc, "sequences", "sequences-parquet", "num_tokens", I, "length in tokens"),
            _field(mlc, "sequences", "sequences-parquet", "main_asset_id", T, "the main document's asset id"),
            _field(mlc, "sequences", "sequences-parquet", "asset_ids", T, "every asset in the sequence", True),
            _field(mlc, "sequences", "sequences-parquet", "license_ids", T, "the license of each asset", True),
        ]))
    if any(rel.startswith("curated/metadata-") for rel, _ in files):
        distribution.append(mlc.FileSet(id="curated-metadata", name="curated-metadata",
                                        encoding_formats=["application/x-parquet"],
                                        includes=["curated/metadata-*.parquet"],
                                        description="one row per kept asset, beside its image in curated/images-*.tar"))
        record_sets.append(mlc.RecordSet(id="assets", name="assets", key=["assets/key"],
                                         description="one record per kept (curated) asset with its license",
                                         fields=[
            _field(mlc, "assets", "curated-metadata", "key", T, "curated key (webdataset sample key)"),
            _field(mlc, "assets", "curated-metadata", "asset_id", T, "the vendor's asset id"),
            _field(mlc, "assets", "curated-metadata", "license_id", T, "license of this asset"),
            _field(mlc, "assets", "curated-metadata", "license_url", T, "license URL"),
            _field(mlc, "assets", "curated-metadata", "licensor", T, "licensor / creator"),
            _field(mlc, "assets", "curated-metadata", "manifest_uri", T, "the manifest it came from"),
            _field(mlc, "assets", "curated-metadata", "manifest_row", I, "its row in that manifest"),
        ]))
    licenses = sorted({r["license_url"] or r["license_id"] for r in
                       _rows(out, "curated", "metadata-*.parquet", ["license_id", "license_url"])})
    kept, rows_in = summary.get("kept"), summary.get("rows_in")
    reasons = ", ".join(f"{k} {v}" for k, v in sorted(summary.get("by_stage_reason", {}).items()))
    metadata = mlc.Metadata(
        name=f"cm3curate-{policy.name}",
        description=(f"A licensed image-text corpus curated by cm3curate for CM3-style (CM3leon) training: {kept} of "
                     f"{rows_in} manifest rows kept under the license policy '{policy.name}'. Images are VQ codes "
                     "and captions BPE tokens in Megatron token shards (tokens/), with the curated images and "
                     "metadata (curated/), the per-row ledger (ledger/) and the retrieval index (index/)."),
        conforms_to=["http://mlcommons.org/croissant/1.1", "http://mlcommons.org/croissant/RAI/1.0"],
        date_published=dt.datetime.now(dt.timezone.utc).replace(microsecond=0),
        version="1.0.0", license=licenses or None, url=None,
        cite_as=f"cm3curate corpus under the license policy '{policy.name}' (as of {policy.as_of}), {out}",
        distribution=distribution, record_sets=record_sets,
        data_collection=(f"Licensed vendor manifests ({len(cfg.manifests)} file(s)); every row was checked against "
                         f"the license policy '{policy.name}' (as of {policy.as_of}) before any byte was fetched, "
                         "and its images were fetched only from the allowed roots. The ledger (ledger/) accounts "
                         f"for every row: {reasons}."),
        data_collection_type=["Secondary data analysis"],
        data_preprocessing_protocol=[
            "validation of manifest rows (ids, captions, licenses, dates); caption normalisation (NFC, control "
            "characters removed)",
            "embedded opt-out marks (XMP/IPTC/C2PA, TDMRep) reject an image",
            f"decode with bomb/truncation checks; exact and near-duplicate removal (perceptual hash radius "
            f"{cfg.dedup.hamming_radius}); CLIP image-text alignment filter (mode {cfg.align.mode})",
            "VQ image tokenizer and byte-level BPE trained on the curated data; retrieval of neighbours with FAISS"],
        data_manipulation_protocol=(f"every image is the centre square of its frame resampled (bicubic) to "
                                    f"{cfg.decode.resolution} px and re-encoded as JPEG quality {cfg.decode.jpeg_quality}; "
                                    "token sequences hold retrieved neighbours before the main document"),
        data_limitations=["the alignment filter uses a CLIP trained on this corpus unless weights are given; at "
                          "small scale it is weak (docs/alignment.md)",
                          "captions are the vendor's; they are filtered for form, not checked for truth"],
        data_biases=["the corpus reflects what the vendors' catalogues and the license policy admit: stock and "
                     "photo-sharing imagery, mostly English captions, over-representing everyday Western scenes"],
        data_use_cases=["training and evaluating retrieval-augmented, token-based multimodal models (CM3leon-style) "
                        "within the terms of each record's license"],
        personal_sensitive_information=["images can show identifiable people; no face blurring is applied; "
                                        "licensor names are kept for attribution"],
        data_release_maintenance_plan=("assets are removed on request with `curate audit takedown` (docs/audit.md), "
                                       "which rewrites only the affected shards, records the takedown in "
                                       "takedowns.jsonl and regenerates this card"),
    )
    jsonld = metadata.to_json()
    # mlcroissant 1.1 writes this RAI property as "dataDataManipulationProtocol"; the RAI
    # vocabulary's term is "dataManipulationProtocol" (http://mlcommons.org/croissant/RAI/)
    if "rai:dataDataManipulationProtocol" in jsonld:
        jsonld["rai:dataManipulationProtocol"] = jsonld.pop("rai:dataDataManipulationProtocol")
    storage.write_bytes(storage.join(out, CARD), (json.dumps(jsonld, indent=2, default=str) + "\n").encode("utf-8"))
    return jsonld
