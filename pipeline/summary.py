"""The summary `curate run` and `curate demo` print when a run ends: where the outputs are,
the steps, the ledger's counts, the alignment scores and the calibrated filter's decision, the
VQ tokenizer's quality, the joint vocabulary, the token shards and every stage counter."""

from __future__ import annotations

from pipeline.run import RunReport


def score_summary(out: str) -> str | None:
    """One line on the CLIP alignment scores in the ledger (None before alignment ran)."""
    import numpy as np

    from pipeline.ledger import read_ledger

    table = read_ledger(out)
    scores = np.array([v for v in table.column("clip_score").to_pylist() if v is not None], dtype=np.float64)
    if scores.size == 0:
        return None
    removed = sum(1 for r in table.column("reason").to_pylist() if r == "LOW_ALIGNMENT")
    q = np.quantile(scores, [0.0, 0.1, 0.5, 0.9, 1.0])
    return (f"alignment: {scores.size} rows scored, {removed} removed (LOW_ALIGNMENT); clip_score "
            f"min {q[0]:.3f}  p10 {q[1]:.3f}  median {q[2]:.3f}  p90 {q[3]:.3f}  max {q[4]:.3f}")


def calibration_summary(align: dict) -> str | None:
    """One line on the calibrated filter: the model's power and what the filter decided."""
    cal = align.get("calibration")
    if not cal:
        return None
    where = (f"out of fold ({align['scored_out_of_fold']} folds)" if align.get("scored_out_of_fold")
             else "by the CLIP itself")
    power = f"AUC {cal['auc']:.3f}" if cal.get("auc") is not None else "AUC n/a"
    if cal["decision"] == "filter":
        verdict = (f"filter at clip_score < {cal['threshold']:.4f}: expected false rejects "
                   f"{cal['expected_false_reject']:.1%}, expected catch {cal['expected_catch']:.1%} "
                   f"(budget {cal['false_reject_budget']:.1%})")
    else:
        verdict = f"{cal['decision']}: {cal.get('reason') or 'nothing rejected'}"
    return f"alignment model: matched vs mismatched captions scored {where}, {power}; {verdict}"


def format_report(report: RunReport) -> str:
    s = report.summary
    lines = [
        f"outputs: {report.out}",
        f"  ledger:   {report.out}/ledger/   (one row per manifest row)",
        f"  curated:  {report.out}/curated/  (webdataset tar + metadata/embeddings Parquet)",
        f"  models:   {report.out}/models/   index: {report.out}/index/ (FAISS + neighbours)",
        f"  tokens:   {report.out}/tokens/   (Megatron .bin/.idx shards + sequences.parquet, docs/shards.md)",
        f"  run.json: {report.out}/run.json",
        f"  report:   {report.out}/report/index.html   lineage: {report.out}/lineage/ (OpenLineage events)",
        "",
        "steps: " + ", ".join(f"{r.name} ({'skipped, already complete' if r.skipped else f'{r.seconds:.1f}s'})"
                              for r in report.steps),
        f"rows in: {s.rows_in}   kept: {s.kept}   rejected: {s.rejected}   (invariant holds)",
    ]
    scores = score_summary(report.out)
    if scores:
        lines.append(scores)
    info = {r.name: r.info for r in report.steps}
    calibration = calibration_summary(info.get("align", {}))
    if calibration:
        lines.append(calibration)
    vq = info.get("vq", {})
    if "psnr_db" in vq:
        lines.append(f"vq tokenizer ({vq.get('model')}, held-out {vq.get('images')} images at {vq.get('resolution_px', '?')} px): "
                     f"PSNR {vq['psnr_db']:.2f} dB  SSIM {vq['ssim']:.3f}  codebook usage "
                     f"{vq['codebook_usage_pct']:.1f}%  perplexity {vq['perplexity']:.0f}  (grid: models/vq/vq-recon.png)")
    text = info.get("text", {})
    if "vocab_size" in text:
        lines.append(f"joint vocabulary: {text['text_ids']} text ids (BPE learned {text['bpe_tokens']}), image codes at "
                     f"offset {text['image_offset']}, {text['vocab_size']} ids, {text['dtype']} (models/vocab.json)")
    tokens = info.get("tokens", {})
    if "sequences" in tokens:
        nb = ", ".join(f"{c} with {n}" for n, c in sorted(tokens.get("sequences_with_neighbours", {}).items()))
        lines.append(f"token shards: {tokens['shards']} shards, {tokens['sequences']} sequences, {tokens['tokens']} tokens "
                     f"({tokens['dtype']}); neighbours per sequence: {nb or 'none'}; "
                     f"{tokens['too_long']} documents too long (tokens/index.json)")
    lines += ["", f"{'stage/reason':<40} {'rows':>6}"]
    for name, count in sorted(s.by_stage_reason.items(), key=lambda kv: (-kv[1], kv[0])):
        lines.append(f"{name:<40} {count:>6}")
    stage_counts = {k: v for k, v in report.counters.items() if k.endswith("/in") or k.endswith("/kept")}
    if stage_counts:
        lines += ["", "stage counters:"] + [f"  {k:<38} {v:>6}" for k, v in stage_counts.items()]
    return "\n".join(lines)
