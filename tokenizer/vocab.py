"""The joint text + image vocabulary that token shards and the trainer agree on.

Layout: ids [0, text_size) are text (special tokens first: pad, bos, eos, <break>, <img>, </img>,
<mask:0..N-1>, then BPE bytes and merges); ids [image_offset, image_offset + num_image_codes)
are VQ codes, with image_offset == text_size fixed in the spec. `text_size` may exceed the
trained BPE size so that image ids stay put when the text tokenizer is retrained (CM3leon:
56,320 text + 8,192 image = 64,512 ids, which fits uint16). Written as `vocab.json` every run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import posixpath
from dataclasses import dataclass, field
from typing import Any, Iterable

import fsspec
import numpy as np
from tokenizers import Tokenizer

from tokenizer import text as text_bpe
from tokenizer.shards import write_bytes_atomic

log = logging.getLogger(__name__)

FORMAT = "cm3curate-vocab/1"
SPECIAL_NAMES = {
    "pad": text_bpe.PAD,
    "bos": text_bpe.BOS,
    "eos": text_bpe.EOS,
    "break": text_bpe.BREAK,
    "img_begin": text_bpe.IMG_BEGIN,
    "img_end": text_bpe.IMG_END,
}


def smallest_uint_dtype(num_ids: int) -> np.dtype:
    """Smallest unsigned dtype holding ids 0..num_ids-1 (token shards use it on disk)."""
    for dt in (np.uint8, np.uint16, np.uint32, np.uint64):
        if num_ids - 1 <= np.iinfo(dt).max:
            return np.dtype(dt)
    raise ValueError(f"{num_ids} ids do not fit any integer dtype")


def _sha256_url(url: str) -> str:
    with fsspec.open(url, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


@dataclass(frozen=True)
class JointVocab:
    """The vocabulary spec; `tokenizer` (not part of the spec's identity) is the loaded BPE, if any."""

    text_tokenizer_sha256: str  # identifies the text tokenizer (its location does not)
    bpe_size: int  # ids the BPE actually uses
    text_size: int  # reserved text range == image offset (>= bpe_size)
    num_image_codes: int
    specials: dict[str, int]
    mask_ids: tuple[int, ...]
    text_tokenizer: str = field(default="", compare=False)  # where tokenizer.json was when loaded/written
    tokenizer: Tokenizer | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.text_size < self.bpe_size:
            raise ValueError(f"text_size {self.text_size} < BPE size {self.bpe_size}")
        if self.num_image_codes < 1:
            raise ValueError("num_image_codes must be >= 1")
        ids = list(self.specials.values()) + list(self.mask_ids)
        if len(set(ids)) != len(ids) or any(not 0 <= i < self.bpe_size for i in ids):
            raise ValueError("special ids must be distinct and inside the text range")

    # construction ----------------------------------------------------------------------------
    @classmethod
    def from_components(cls, text_tokenizer_path: str, num_image_codes: int, text_vocab_size: int | None = None) -> "JointVocab":
        """Build the spec from a trained tokenizer.json and the VQ codebook size."""
        tok = text_bpe.load_bpe(text_tokenizer_path)
        bpe_size = tok.get_vocab_size(with_added_tokens=True)
        specials = {}
        for name, token in SPECIAL_NAMES.items():
            tid = tok.token_to_id(token)
            if tid is None:
                raise ValueError(f"tokenizer {text_tokenizer_path} lacks special token {token}")
            specials[name] = tid
        masks = tuple(tok.token_to_id(text_bpe.mask_token(i)) for i in range(text_bpe.num_mask_sentinels(tok)))
        return cls(
            text_tokenizer=text_tokenizer_path,
            text_tokenizer_sha256=_sha256_url(text_tokenizer_path),
            bpe_size=bpe_size,
            text_size=max(bpe_size, text_vocab_size or 0),
            num_image_codes=int(num_image_codes),
            specials=specials,
            mask_ids=masks,
            tokenizer=tok,
        )

    # layout ------------------------------------------------------------------------------------
    @property
    def image_offset(self) -> int:
        return self.text_size

    @property
    def size(self) -> int:
        return self.text_size + self.num_image_codes

    @property
    def dtype(self) -> np.dtype:
        return smallest_uint_dtype(self.size)

    @property
    def pad_id(self) -> int:
        return self.specials["pad"]

    @property
    def bos_id(self) -> int:
        return self.specials["bos"]

    @property
    def eos_id(self) -> int:
        return self.specials["eos"]

    @property
    def break_id(self) -> int:
        return self.specials["break"]

    @property
    def img_begin_id(self) -> int:
        return self.specials["img_begin"]

    @property
    def img_end_id(self) -> int:
        return self.specials["img_end"]

    # conversions -------------------------------------------------------------------------------
    def _tok(self) -> Tokenizer:
        if self.tokenizer is None:
            raise RuntimeError("this JointVocab was loaded without its text tokenizer (load(..., with_text=True))")
        return self.tokenizer

    def text_to_ids(self, text: str) -> np.ndarray:
        return np.asarray(text_bpe.encode(self._tok(), text), dtype=self.dtype)

    def ids_to_text(self, ids: Iterable[int]) -> str:
        ids = np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids)
        if ids.size and (ids.max() >= self.bpe_size):
            raise ValueError("ids outside the text range")
        return text_bpe.decode(self._tok(), ids.tolist())

    def codes_to_ids(self, codes: np.ndarray | Iterable[int]) -> np.ndarray:
        """VQ codes (any shape) -> joint ids of the same shape, in the vocab dtype."""
        c = np.asarray(codes)
        if c.size and (c.min() < 0 or c.max() >= self.num_image_codes):
            raise ValueError(f"codes outside [0, {self.num_image_codes})")
        return (c.astype(np.int64) + self.image_offset).astype(self.dtype)

    def ids_to_codes(self, ids: np.ndarray | Iterable[int]) -> np.ndarray:
        i = np.asarray(ids).astype(np.int64)
        if i.size and not self.is_image(i).all():
            raise ValueError("ids outside the image range")
        return i - self.image_offset

    def is_image(self, ids: np.ndarray | Iterable[int]) -> np.ndarray:
        i = np.asarray(ids).astype(np.int64)
        return (i >= self.image_offset) & (i < self.size)

    def is_text(self, ids: np.ndarray | Iterable[int]) -> np.ndarray:
        i = np.asarray(ids).astype(np.int64)
        return (i >= 0) & (i < self.bpe_size)

    # (de)serialisation -------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "size": self.size,
            "dtype": self.dtype.name,
            "text": {
                "tokenizer": posixpath.basename(self.text_tokenizer),
                "tokenizer_uri": self.text_tokenizer,
                "sha256": self.text_tokenizer_sha256,
                "bpe_size": self.bpe_size,
                "range": [0, self.text_size],
            },
            "image": {"offset": self.image_offset, "num_codes": self.num_image_codes, "range": [self.image_offset, self.size]},
            "specials": dict(self.specials),
            "mask_ids": list(self.mask_ids),
        }

    def save(self, url: str) -> None:
        write_bytes_atomic(url, json.dumps(self.to_json(), indent=2, sort_keys=True).encode("utf-8"))

    @classmethod
    def load(cls, url: str, with_text: bool = True) -> "JointVocab":
        """Read vocab.json; the tokenizer is looked up beside it first, then at its recorded URI."""
        with fsspec.open(url, "r") as f:
            d = json.load(f)
        if d.get("format") != FORMAT:
            raise ValueError(f"{url}: not a {FORMAT} spec")
        tok_uri = d["text"]["tokenizer_uri"]
        tok = None
        if with_text:
            beside = posixpath.join(posixpath.dirname(url), d["text"]["tokenizer"]) if "/" in url else d["text"]["tokenizer"]
            fs, _ = fsspec.core.url_to_fs(beside)
            tok_uri = beside if fs.exists(beside) else tok_uri
            if _sha256_url(tok_uri) != d["text"]["sha256"]:
                raise ValueError(f"{tok_uri} does not match the sha256 recorded in {url}")
            tok = text_bpe.load_bpe(tok_uri)
        vocab = cls(
            text_tokenizer=tok_uri,
            text_tokenizer_sha256=d["text"]["sha256"],
            bpe_size=int(d["text"]["bpe_size"]),
            text_size=int(d["text"]["range"][1]),
            num_image_codes=int(d["image"]["num_codes"]),
            specials={k: int(v) for k, v in d["specials"].items()},
            mask_ids=tuple(int(i) for i in d["mask_ids"]),
            tokenizer=tok,
        )
        if vocab.image_offset != d["image"]["offset"] or vocab.size != d["size"]:
            raise ValueError(f"{url}: inconsistent offsets")
        return vocab


def write_vocab(models_dir: str, text_vocab_size: int | None = None, tokenizer_name: str = "text-bpe.json",
                vq_name: str = "vq.json") -> JointVocab:
    """Build `models_dir/vocab.json` from the tokenizer and the VQ config saved there (every run does this)."""
    root = models_dir.rstrip("/")
    with fsspec.open(f"{root}/{vq_name}", "r") as f:
        num_codes = int(json.load(f)["config"]["codebook_size"])
    vocab = JointVocab.from_components(f"{root}/{tokenizer_name}", num_codes, text_vocab_size)
    vocab.save(f"{root}/vocab.json")
    log.info("vocab: %d text ids (BPE %d) + %d image codes at offset %d, %s", vocab.text_size, vocab.bpe_size,
             num_codes, vocab.image_offset, vocab.dtype.name)
    return vocab
