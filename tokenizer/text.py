"""Byte-level BPE text tokenizer (HF `tokenizers`), trained on the corpus captions.

Byte-level means every string round-trips exactly (no unknown tokens); the special tokens
come first with fixed ids (pad=0, bos=1, eos=2, <break>=3, <img>=4, </img>=5, <mask:0..N-1>=6..),
so the joint vocabulary can rely on them without reading the merges. The saved file is a plain
`tokenizer.json`, loadable by `tokenizers.Tokenizer.from_file` from any language.

Text is data: a caption that spells `<img>` or `<mask:0>` must encode as those characters, never
as a control id. HF tokenizers match "added tokens" in the raw text before anything else, so the
specials are kept as ordinary vocabulary entries instead (`plain_specials`): the byte-level
pre-tokenizer splits `<`, letters and `>` into separate pieces, and no merge can rebuild a
special from text. The saved file therefore has no `added_tokens`, and any loader (ours, or
`Tokenizer.from_file`) encodes captions safely.
"""

from __future__ import annotations

import json
import logging
from typing import Iterable, Iterator

import fsspec
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from tokenizer.shards import write_bytes_atomic

log = logging.getLogger(__name__)

PAD, BOS, EOS, BREAK, IMG_BEGIN, IMG_END = "<pad>", "<bos>", "<eos>", "<break>", "<img>", "</img>"
BASE_SPECIALS: tuple[str, ...] = (PAD, BOS, EOS, BREAK, IMG_BEGIN, IMG_END)
CM3LEON_TEXT_VOCAB = 56_320
DEFAULT_MASK_SENTINELS = 16  # CM3 masks at most 16 spans


def mask_token(i: int) -> str:
    return f"<mask:{i}>"


def special_tokens(num_mask_sentinels: int = DEFAULT_MASK_SENTINELS) -> list[str]:
    """All special tokens in id order."""
    return [*BASE_SPECIALS, *(mask_token(i) for i in range(num_mask_sentinels))]


def train_bpe(captions: Iterable[str], vocab_size: int, out_path: str | None = None,
              num_mask_sentinels: int = DEFAULT_MASK_SENTINELS, min_frequency: int = 2) -> Tokenizer:
    """Train byte-level BPE on `captions`; save to `out_path` (any fsspec URL) when given.

    A small corpus may stop short of `vocab_size` (no more pairs to merge); the joint vocabulary
    can still reserve the full size so image ids do not move when the text model is retrained.
    """
    specials = special_tokens(num_mask_sentinels)
    if vocab_size < len(specials) + 256:
        raise ValueError(f"vocab_size {vocab_size} < specials + 256 byte symbols ({len(specials) + 256})")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_nonempty(captions), trainer=trainer)
    tok = plain_specials(tok)
    for i, s in enumerate(specials):  # the contract other code relies on
        if tok.token_to_id(s) != i:
            raise RuntimeError(f"special token {s} got id {tok.token_to_id(s)}, expected {i}")
    log.info("trained byte-level BPE: %d tokens (asked %d), %d specials", tok.get_vocab_size(), vocab_size, len(specials))
    if out_path is not None:
        save_bpe(tok, out_path)
    return tok


def plain_specials(tok: Tokenizer) -> Tokenizer:
    """The same tokenizer with its added tokens turned into plain vocabulary entries (same ids),
    so no text can produce them; see the module docstring."""
    data = json.loads(tok.to_str())
    added = data.get("added_tokens") or []
    if not added:
        return tok
    model_vocab = data["model"].get("vocab")
    if not isinstance(model_vocab, dict):
        raise ValueError(f"tokenizer model {data['model'].get('type')} has no vocabulary map; only BPE is supported")
    for token in added:
        known = model_vocab.get(token["content"])
        if known is not None and known != token["id"]:
            raise ValueError(f"added token {token['content']!r} has id {token['id']} but the vocabulary says {known}")
        model_vocab[token["content"]] = token["id"]
    data["added_tokens"] = []
    return Tokenizer.from_str(json.dumps(data))


def _nonempty(captions: Iterable[str]) -> Iterator[str]:
    for c in captions:
        if c and c.strip():
            yield c


def captions_from_shards(urls: Iterable[str]) -> Iterator[str]:
    """Every caption of the curated store, streamed from the tar shards' `KEY.json` members."""
    from tokenizer.shards import iter_samples

    for sample in iter_samples(urls):
        for caption in sample.meta.get("captions") or []:
            if isinstance(caption, str):
                yield caption


def save_bpe(tok: Tokenizer, url: str) -> None:
    write_bytes_atomic(url, tok.to_str(pretty=False).encode("utf-8"))


def load_bpe(url: str) -> Tokenizer:
    """Load a saved tokenizer.json from a local path or fsspec URL; added tokens (a file from
    elsewhere may have them) become plain vocabulary entries, so captions never produce them."""
    with fsspec.open(url, "r", encoding="utf-8") as f:
        return plain_specials(Tokenizer.from_str(f.read()))


def num_mask_sentinels(tok: Tokenizer) -> int:
    """How many `<mask:i>` tokens a tokenizer carries (contiguous from 0)."""
    n = 0
    while tok.token_to_id(mask_token(n)) is not None:
        n += 1
    return n


def encode(tok: Tokenizer, text: str) -> list[int]:
    """Caption -> ids without adding bos/eos (the CM3 format decides where those go). Text that
    spells a special token encodes as plain text (see the module docstring)."""
    return tok.encode(text, add_special_tokens=False).ids


def decode(tok: Tokenizer, ids: Iterable[int]) -> str:
    return tok.decode(list(ids), skip_special_tokens=False)
