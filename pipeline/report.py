"""The run report: OUT/report/index.html, static HTML with PNG plots, no server and no script.

Written at the end of every run and every takedown, and by `curate report --out OUT`. It
shows the funnel (rows per stage and per reason, from the ledger), the license mix, the CLIP
score histogram with the cut drawn, example dedup clusters as thumbnails, the VQ
reconstruction grid and codebook usage, the sequence length histogram and neighbours per
sequence, and the takedowns. A section whose outputs the run did not build says so.

Everything a vendor wrote (ids, captions, licensors) is HTML-escaped: text is data. A
taken-down asset is never shown as a thumbnail. The queries go through the audit module's
DuckDB views, the one way this project reads a run's tables.
"""

from __future__ import annotations

import html
import io
import re
from collections import Counter
from typing import Any, Callable

import fsspec

from pipeline import audit, storage

FOLDER = "report"
MAX_CLUSTERS = 6
MAX_MEMBERS = 4  # thumbnails per cluster besides the representative
THUMB_PX = 128
STAGE_ORDER = ("ingest", "validate", "license", "fetch", "decode", "dedup_exact", "dedup_near", "dedup_semantic",
               "align", "encode", "tokens", "takedown")


def _figure(width: float = 7.0, height: float = 3.2, columns: int = 1):
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    fig = Figure(figsize=(width, height), dpi=110)
    return fig, fig.subplots(1, columns)


def _save(fig, out: str, name: str) -> str:
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png")
    storage.write_bytes(storage.join(out, FOLDER, name), buffer.getvalue())
    return name


def _rows(con, sql: str, params: list[Any] | None = None) -> list[tuple]:
    return con.execute(sql, params or []).fetchall()


# ----------------------------------------------------------------------------- sections


def _funnel(con, out: str, run: dict[str, Any]) -> str:
    counters = run.get("counters", {})
    stages = [s for s in STAGE_ORDER if f"{s}/in" in counters]
    by_reason = _rows(con, "SELECT stage, reason, count(*) FROM ledger WHERE status <> 'kept' "
                           "GROUP BY stage, reason ORDER BY stage, count(*) DESC, reason")
    fig, ax = _figure(7.0, 0.45 * max(len(stages), 3) + 1.0)
    ins = [counters[f"{s}/in"] for s in stages]
    kept = [counters.get(f"{s}/kept", 0) for s in stages]
    ax.barh(stages, ins, color="#d9d9d9", label="in")
    ax.barh(stages, kept, color="#4c72b0", label="kept")
    ax.invert_yaxis()
    ax.set_xlabel("rows")
    ax.legend(loc="lower right")
    ax.set_title("rows into and kept by each stage")
    image = _save(fig, out, "funnel.png")
    table = _table(("stage", "reason", "rows"), by_reason)
    return f'<img src="{image}" alt="funnel: rows per stage">\n<h3>Rejected and taken down, by reason</h3>\n{table}'


def _licenses(con, out: str) -> str:
    rows = _rows(con, "SELECT license_id, count(*) FROM ledger WHERE status = 'kept' GROUP BY license_id "
                      "ORDER BY count(*) DESC, license_id")
    if not rows:
        return "<p>No kept assets.</p>"
    fig, ax = _figure(7.0, 0.4 * len(rows) + 1.0)
    ax.barh([str(r[0]) for r in rows], [r[1] for r in rows], color="#55a868")
    ax.invert_yaxis()
    ax.set_xlabel("kept assets")
    ax.set_title("license mix of the kept assets")
    return f'<img src="{_save(fig, out, "licenses.png")}" alt="license mix">\n' + _table(("license", "kept assets"), rows)


def _calibration(run: dict[str, Any]) -> dict[str, Any]:
    return next((s["info"].get("calibration") or {} for s in run.get("steps", []) if s["name"] == "align"), {})


def _cut(con, run: dict[str, Any]) -> tuple[float | None, str]:
    align = run.get("config", {}).get("align", {})
    if align.get("mode") == "calibrated":
        threshold = _calibration(run).get("threshold")
        return (float(threshold), "calibrated cut") if threshold is not None else (None, "")
    if align.get("mode") == "threshold":
        return float(align["threshold"]), "threshold"
    details = _rows(con, "SELECT detail FROM ledger WHERE reason = 'LOW_ALIGNMENT' LIMIT 1")
    found = re.search(r"< (-?[0-9.]+)", details[0][0] or "") if details else None
    return (float(found.group(1)), f"run cut (keep {align.get('keep_fraction')})") if found else (None, "")


def _clip_scores(con, out: str, run: dict[str, Any]) -> str:
    rows = _rows(con, "SELECT clip_score, reason = 'LOW_ALIGNMENT' FROM ledger WHERE clip_score IS NOT NULL")
    if not rows:
        return "<p>No CLIP scores in this run (alignment off or not reached).</p>"
    cut, what = _cut(con, run)
    fig, ax = _figure()
    scores = [[r[0] for r in rows if not r[1]], [r[0] for r in rows if r[1]]]
    ax.hist(scores, bins=30, stacked=True, color=["#4c72b0", "#c44e52"], label=["passed", "LOW_ALIGNMENT"])
    if cut is not None:
        ax.axvline(cut, color="black", linestyle="--", label=f"{what}: {cut:.3f}")
    ax.set_xlabel("CLIP score (cosine of image and caption)")
    ax.set_ylabel("assets")
    ax.legend()
    note = f"<p>{len(rows)} scored, {len(scores[1])} rejected as LOW_ALIGNMENT.</p>"
    cal = _calibration(run)
    if cal:
        shown = [(k, cal.get(k)) for k in ("decision", "auc", "pi", "threshold", "expected_false_reject",
                                           "expected_catch", "false_reject_budget", "n_matched", "n_mismatched",
                                           "reason") if cal.get(k) is not None]
        note += "<h3>Calibrated filter</h3>" + _table(("measure", "value"), shown)
    return f'<img src="{_save(fig, out, "clip-scores.png")}" alt="CLIP score histogram">\n{note}'


def _thumbnail(data: bytes | None) -> bytes | None:
    from PIL import Image

    if not data:
        return None
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.width * image.height > 64_000_000:  # the decode stage's bomb guard applies to sources
                return None
            image.draft("RGB", (THUMB_PX, THUMB_PX))
            image = image.convert("RGB")
            image.thumbnail((THUMB_PX, THUMB_PX))
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=85)
            return buffer.getvalue()
    except Exception:  # noqa: BLE001 - a report shows a placeholder, never fails on one image
        return None


def _source_bytes(uri: str | None, manifest_uri: str) -> bytes | None:
    """A rejected duplicate is not in the store: read its source, but only from a local path (a
    report never goes to the network or uses credentials). It passed the fetch stage's root
    check, so the path is one the run was allowed to read."""
    from pipeline.fetch_urls import resolve_uri

    uri = resolve_uri(uri, manifest_uri) if uri else None
    if not uri or ("://" in uri and not uri.startswith("file://")):
        return None
    try:
        with open(uri.removeprefix("file://"), "rb") as handle:
            return handle.read(64 << 20)
    except OSError:
        return None


def _clusters(con, out: str) -> str:
    groups = _rows(con, """
        SELECT d.dup_of, k.key, k.uri, k.manifest_uri, list(d.asset_id ORDER BY d.asset_id),
               list(d.uri ORDER BY d.asset_id), list(d.manifest_uri ORDER BY d.asset_id), list(d.reason ORDER BY d.asset_id)
        FROM ledger d JOIN ledger k ON k.asset_id = d.dup_of AND k.status = 'kept'
        WHERE d.dup_of IS NOT NULL AND d.status = 'rejected' AND d.stage LIKE 'dedup%'
        GROUP BY ALL ORDER BY count(*) DESC, d.dup_of LIMIT ?""", [MAX_CLUSTERS])
    if not groups:
        return "<p>No duplicate groups in this run.</p>"
    wanted = {g[1] for g in groups}
    stored: dict[str, bytes] = {}
    for url in storage.list_files(storage.join(out, "curated"), "images-*.tar"):
        from tokenizer.shards import iter_shard

        for sample in iter_shard(url):
            if sample.key in wanted:
                stored[sample.key] = sample.jpeg
        if wanted <= stored.keys():
            break
    parts = []
    for number, (rep, key, rep_uri, rep_manifest, members, uris, manifests, reasons) in enumerate(groups):
        cells = [_thumb_cell(out, f"cluster{number}-0.jpg", stored.get(key) or _source_bytes(rep_uri, rep_manifest),
                             f"kept: {rep}")]
        for i, row in enumerate(list(zip(members, uris, manifests, reasons))[:MAX_MEMBERS], start=1):
            member, uri, manifest, reason = row
            cells.append(_thumb_cell(out, f"cluster{number}-{i}.jpg", _source_bytes(uri, manifest),
                                     f"{reason}: {member}"))
        more = len(members) - MAX_MEMBERS
        extra = f"<p>and {more} more</p>" if more > 0 else ""
        parts.append(f'<div class="cluster">{"".join(cells)}{extra}</div>')
    return "\n".join(parts)


def _thumb_cell(out: str, name: str, data: bytes | None, label: str) -> str:
    thumb = _thumbnail(data)
    if thumb is None:
        image = '<div class="missing">not stored</div>'
    else:
        storage.write_bytes(storage.join(out, FOLDER, "thumbs", name), thumb)
        image = f'<img src="thumbs/{name}" alt="{html.escape(label)}">'
    return f'<figure>{image}<figcaption>{html.escape(label)}</figcaption></figure>'


def _vq(out: str, run: dict[str, Any]) -> str:
    import numpy as np

    parts = []
    recon = storage.join(out, "models", "vq", "vq-recon.png")
    if storage.exists(recon):
        with fsspec.open(recon, "rb") as handle:
            storage.write_bytes(storage.join(out, FOLDER, "vq-recon.png"), handle.read())
        parts.append('<img src="vq-recon.png" alt="VQ reconstructions: originals above, decoded codes below">')
    code_files = storage.list_files(storage.join(out, "codes"), "codes-*.parquet")
    info = next((s["info"] for s in run.get("steps", []) if s["name"] == "vq"), {})
    if code_files:
        counts: Counter[int] = Counter()
        for url in code_files:
            for codes in storage.read_table(url, columns=["codes"]).column("codes").to_pylist():
                counts.update(codes)
        size = int(info.get("codebook_size") or (max(counts) + 1))
        usage = np.sort(np.bincount(np.fromiter(counts.elements(), dtype=np.int64, count=sum(counts.values())),
                                    minlength=size))[::-1]
        fig, ax = _figure()
        ax.plot(np.arange(1, len(usage) + 1), usage, color="#8172b2")
        ax.set_yscale("symlog")
        ax.set_xlabel("codes, most used first")
        ax.set_ylabel("uses in the curated codes")
        ax.set_title(f"codebook usage: {int((usage > 0).sum())} of {size} codes used")
        parts.append(f'<img src="{_save(fig, out, "codebook.png")}" alt="codebook usage">')
    if info:
        shown = {k: info[k] for k in ("model", "psnr_db", "ssim", "codebook_usage_pct", "perplexity") if k in info}
        parts.append(_table(("measure", "value"), [(k, _fmt(v)) for k, v in shown.items()]))
    return "\n".join(parts) or "<p>No image tokenizer in this run (not reached).</p>"


def _sequences(con, out: str) -> str:
    if not audit._has(con, "sequences"):
        return "<p>No token sequences in this run (not reached).</p>"
    rows = _rows(con, "SELECT num_tokens, len(asset_ids) - 1 FROM sequences")
    fig, (left, right) = _figure(9.0, 3.2, columns=2)
    left.hist([r[0] for r in rows], bins=30, color="#4c72b0")
    left.set_xlabel("tokens per sequence")
    left.set_ylabel("sequences")
    neighbours = Counter(r[1] for r in rows)
    right.bar([str(k) for k in sorted(neighbours)], [neighbours[k] for k in sorted(neighbours)], color="#dd8452")
    right.set_xlabel("retrieved neighbours per sequence")
    right.set_ylabel("sequences")
    total = sum(r[0] for r in rows)
    note = f"<p>{len(rows)} sequences, {total} tokens.</p>"
    return f'<img src="{_save(fig, out, "sequences.png")}" alt="sequence lengths and neighbours">\n{note}'


def _takedowns(con) -> str:
    rows = _rows(con, "SELECT asset_id, sha256, reason, taken_down_at FROM takedowns ORDER BY taken_down_at, asset_id")
    if not rows:
        return "<p>None.</p>"
    return _table(("asset", "sha256", "reason", "when"), rows)


# ----------------------------------------------------------------------------- page


def _fmt(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def _table(header: tuple[str, ...], rows: list[tuple] | list[list]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


STYLE = """body{font-family:sans-serif;margin:2em;max-width:1100px;color:#222}
img{max-width:100%;display:block;margin:.5em 0}table{border-collapse:collapse;margin:.5em 0}
td,th{border:1px solid #ccc;padding:2px 8px;text-align:left;font-size:90%}
.cluster{display:flex;gap:8px;align-items:flex-start;margin:.8em 0}
figure{margin:0;width:140px}figcaption{font-size:75%;word-break:break-all}
.missing{width:128px;height:96px;background:#eee;display:flex;align-items:center;justify-content:center}"""


def write_report(out: str) -> str:
    """Write OUT/report/index.html (and its plots) for the run in `out`; returns its URL."""
    con = audit.connect(out)  # first: refuses a folder that holds no run
    storage.remove_tree(storage.join(out, FOLDER))
    run = storage.read_json(storage.join(out, "run.json")) if storage.exists(storage.join(out, "run.json")) else {}
    counts = dict(_rows(con, "SELECT CASE WHEN reason = 'TAKEN_DOWN' THEN 'taken down' ELSE status END, count(*) "
                             "FROM ledger GROUP BY ALL"))
    sections: list[tuple[str, Callable[[], str]]] = [
        ("Funnel", lambda: _funnel(con, out, run)),
        ("Licenses", lambda: _licenses(con, out)),
        ("CLIP alignment", lambda: _clip_scores(con, out, run)),
        ("Duplicate groups", lambda: _clusters(con, out)),
        ("Image tokenizer", lambda: _vq(out, run)),
        ("Sequences", lambda: _sequences(con, out)),
        ("Takedowns", lambda: _takedowns(con)),
    ]
    steps = [(s["name"], "skipped (already complete)" if s["skipped"] else f"{s['seconds']:.1f} s")
             for s in run.get("steps", [])]
    body = [f"<h1>cm3curate run report</h1><p>{html.escape(out)}</p>",
            _table(("manifest rows", "kept", "rejected", "taken down"),
                   [(sum(counts.values()), counts.get("kept", 0), counts.get("rejected", 0),
                     counts.get("taken down", 0))]),
            "<h2>Steps</h2>" + _table(("step", "time"), steps)]
    for title, build in sections:
        body.append(f"<h2>{html.escape(title)}</h2>\n{build()}")
    page = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>cm3curate run report</title>'
            f"<style>{STYLE}</style></head>\n<body>\n" + "\n".join(body) + "\n</body></html>\n")
    url = storage.join(out, FOLDER, "index.html")
    storage.write_bytes(url, page.encode("utf-8"))
    return url
