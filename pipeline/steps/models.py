"""The `models` phase: vq (train the VQ image tokenizer, or take the configured weights),
text (byte-level BPE and the joint vocabulary) and encode (VQ codes for every curated image)."""

from __future__ import annotations

from pipeline import ledger, storage
from pipeline.stages.base import Stage
from pipeline.steps.context import ENCODE_REJECTED, NothingToDo, RunContext, copy_file


def step_vq(ctx: RunContext):
    """D: train the VQ image tokenizer on the curated store (or take the configured one)."""
    vq = ctx.cfg.vq
    out = ctx.path("models", "vq")
    if vq.weights:
        copy_file(vq.weights, storage.join(out, "vq.safetensors"))
        copy_file(vq.weights.rsplit(".", 1)[0] + ".json", storage.join(out, "vq.json"))
        return {}, {"trained": False, "weights": vq.weights}
    from tokenizer.vq.config import get_config
    from tokenizer.vq.train import train_vq

    shards = storage.list_files(ctx.path("curated"), "images-*.tar")
    if not shards:
        raise NothingToDo("no curated images to train the VQ tokenizer on: every row was rejected (see OUT/ledger/)")
    result = train_vq(get_config(vq.model), vq.train, shards, out)
    evaluation = storage.read_json(storage.join(out, "vq-eval.json")) if storage.exists(storage.join(out, "vq-eval.json")) else {}
    info = {"trained": True, "model": vq.model}
    info.update({k: v for k, v in evaluation.items() if isinstance(v, (int, float, str, bool))})
    if evaluation.get("resolution"):  # [h, w] of the held-out images: the curated resolution
        info["resolution_px"] = int(evaluation["resolution"][0])
    info.update({k: v for k, v in result.items() if isinstance(v, (int, float, str, bool)) and k not in info})
    return {}, info


def step_text(ctx: RunContext):
    """D: byte-level BPE on the curated captions, then the joint vocabulary (vocab.json)."""
    from tokenizer.text import captions_from_shards, train_bpe
    from tokenizer.vocab import write_vocab

    text = ctx.cfg.text
    models = ctx.path("models")
    target = storage.join(models, "text-bpe.json")
    if text.tokenizer:
        copy_file(text.tokenizer, target)
    else:
        shards = storage.list_files(ctx.path("curated"), "images-*.tar")
        train_bpe(captions_from_shards(shards), text.vocab_size, target,
                  num_mask_sentinels=text.num_mask_sentinels, min_frequency=text.min_frequency)
    vocab = write_vocab(models, text_vocab_size=text.vocab_size, vq_name="vq/vq.json")
    return {}, {"text_ids": vocab.text_size, "bpe_tokens": vocab.bpe_size, "image_offset": vocab.image_offset,
                "vocab_size": vocab.size, "dtype": vocab.dtype.name}


def step_encode(ctx: RunContext):
    """Apply the VQ tokenizer to every curated image (Beam); an image it cannot encode is
    rejected in the ledger with the stage's reason (stage encode)."""
    from pipeline.stages.encode import encode_curated_store

    vq = ctx.cfg.vq
    samples = storage.read_json(ctx.path("curated", "index.json"))["samples"]
    with ctx.beam_step("encode", samples, "images") as progress:
        result = encode_curated_store(ctx.path("curated"), ctx.path("models", "vq", "vq.safetensors"), ctx.path("codes"),
                                      ctx.options, batch_size=vq.encode_batch_size, device=vq.device, progress=progress,
                                      rejected_url=ctx.path(ENCODE_REJECTED))
    counters = {f"encode/{k}": int(v) for k, v in result["counters"].items()}
    failed = ledger.apply_changes(ctx.out, Stage.ENCODE, ctx.path(ENCODE_REJECTED))
    return counters, {"files": len(result["files"]), "rejected": len(failed)}
