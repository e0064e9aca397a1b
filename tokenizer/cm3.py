"""CM3 sequence format and causal-masked objective (Aghajanyan et al. 2022; CM3leon 2023).

A sequence is `[neighbour 1] <break> [neighbour 2] <break> [main document]` (optionally wrapped
in bos/eos), a document being caption ids and `<img> image ids </img>` in a configurable order.
CM3 masking moves n ~ clamp(Poisson(1), 1, 16) non-overlapping spans to the end, each replaced
in place by `<mask:i>` and re-emitted after `<mask:i>` at the end, so a left-to-right model
learns infilling. Spans never cross `<break>` (or bos/eos), never cut an `<img> ... </img>` block
(a span holds a whole image or none of it), and the choice is a pure function of
(seed, epoch, key) so a reader can re-mask every epoch and still resume mid-epoch exactly.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from tokenizer.vocab import JointVocab


@dataclass(frozen=True)
class CM3Format:
    """How documents and sequences are laid out."""

    image_first: bool = False  # False: caption then image (text-to-image); True: image then caption
    add_bos: bool = True
    add_eos: bool = True


@dataclass(frozen=True)
class MaskConfig:
    poisson_lambda: float = 1.0
    max_spans: int = 16  # needs that many <mask:i> sentinels in the vocabulary


def build_document(vocab: JointVocab, text_ids: Sequence[int] | np.ndarray | None, image_codes: np.ndarray | None,
                   fmt: CM3Format = CM3Format()) -> np.ndarray:
    """Caption ids + `<img>` image ids `</img>` (codes are raw VQ codes; offset applied here)."""
    parts: list[np.ndarray] = []
    text = np.asarray(text_ids if text_ids is not None else [], dtype=np.int64)
    image = None
    if image_codes is not None:
        ids = vocab.codes_to_ids(np.asarray(image_codes).reshape(-1)).astype(np.int64)
        image = np.concatenate([[vocab.img_begin_id], ids, [vocab.img_end_id]])
    order = [image, text] if fmt.image_first else [text, image]
    for p in order:
        if p is not None and len(p):
            parts.append(p)
    return np.concatenate(parts).astype(vocab.dtype) if parts else np.zeros(0, dtype=vocab.dtype)


def build_sequence(vocab: JointVocab, neighbours: Sequence[np.ndarray], main: np.ndarray, fmt: CM3Format = CM3Format()) -> np.ndarray:
    """`[bos] n1 <break> n2 <break> main [eos]` in the vocab dtype."""
    pieces: list[np.ndarray] = []
    if fmt.add_bos:
        pieces.append(np.array([vocab.bos_id]))
    for doc in neighbours:
        pieces += [np.asarray(doc, dtype=np.int64), np.array([vocab.break_id])]
    pieces.append(np.asarray(main, dtype=np.int64))
    if fmt.add_eos:
        pieces.append(np.array([vocab.eos_id]))
    return np.concatenate(pieces).astype(vocab.dtype)


def sequence_documents(vocab: JointVocab, sequence: np.ndarray) -> list[np.ndarray]:
    """Invert `build_sequence` on an unmasked sequence: its documents in order, without bos,
    eos and `<break>`, so the last one is the main document (what a sampling prompt reuses as a
    retrieved neighbour). Captions never hold a `<break>` id (they encode as plain text)."""
    ids = np.asarray(sequence)
    start = 1 if len(ids) and int(ids[0]) == vocab.bos_id else 0
    end = len(ids) - 1 if len(ids) > start and int(ids[-1]) == vocab.eos_id else len(ids)
    body = ids[start:end]
    starts = np.concatenate([[0], np.flatnonzero(body == vocab.break_id) + 1])
    ends = np.concatenate([starts[1:] - 1, [len(body)]])
    return [body[a:b] for a, b in zip(starts.tolist(), ends.tolist())]


def mask_rng(seed: int, epoch: int, key: str) -> np.random.Generator:
    """Deterministic generator per (seed, epoch, key), independent of worker/rank layout."""
    digest = hashlib.sha256(f"cm3:{seed}:{epoch}:{key}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:16], "little"))


def _is_any(ids: np.ndarray, values: set[int]) -> np.ndarray:
    """`np.isin` for a handful of values: a few comparisons are ~5x faster than its set machinery."""
    out = np.zeros(len(ids), dtype=bool)
    for v in values:
        out |= ids == v
    return out


def _segments(ids: np.ndarray, barriers: set[int]) -> list[tuple[int, int]]:
    """Maximal [start, end) runs of maskable positions (no barrier token inside)."""
    maskable = ~_is_any(ids, barriers)
    edges = np.flatnonzero(np.diff(np.concatenate([[False], maskable, [False]]).astype(np.int8)))
    return [(int(s), int(e)) for s, e in zip(edges[::2], edges[1::2])]


def _closed_cuts(ids: np.ndarray, vocab: JointVocab, barriers: set[int]) -> np.ndarray:
    """bool [len(ids) + 1]: True for the cut points strictly inside an image block (cut c lies
    just before token c): after `<img>`, up to and including the one just before `</img>`.

    A span runs from one cut to another, so without these cuts every span holds a whole
    `<img> ... </img>` block or none of it: half an image is not a document a model can learn
    to infill. An `<img>` left open (no `</img>` before the next barrier: a malformed sequence)
    forbids every cut after it up to that barrier.
    """
    closed = np.zeros(len(ids) + 1, dtype=bool)
    marks = np.flatnonzero(_is_any(ids, {vocab.img_begin_id, vocab.img_end_id, *barriers}))
    opened = None
    for p in marks.tolist():
        t = int(ids[p])
        if t == vocab.img_begin_id:
            opened = p if opened is None else opened
        elif opened is not None:  # </img> or a barrier ends the open block
            closed[opened + 1 : p + 1] = True
            opened = None
    if opened is not None:
        closed[opened + 1 :] = True
    return closed


def choose_spans(ids: np.ndarray, vocab: JointVocab, rng: np.random.Generator, cfg: MaskConfig = MaskConfig()) -> list[tuple[int, int]]:
    """Non-overlapping [start, end) spans, sorted, none crossing <break>/bos/eos/pad and none
    starting or ending inside an `<img> ... </img>` block (a span holds a whole block or none)."""
    max_spans = min(cfg.max_spans, len(vocab.mask_ids))
    n = int(np.clip(rng.poisson(cfg.poisson_lambda), 1, max_spans))
    barriers = {vocab.break_id, vocab.bos_id, vocab.eos_id, vocab.pad_id}
    ids = np.asarray(ids)
    segs = _segments(ids, barriers)
    if not segs:
        return []
    closed = _closed_cuts(ids, vocab, barriers)
    lengths = np.array([e - s for s, e in segs], dtype=np.float64)
    # allocate spans to segments in proportion to length; a segment with G allowed cut points
    # holds at most G // 2 spans (without images G = L + 1), because spans are separated by at
    # least one unmasked token
    alloc = np.bincount(rng.choice(len(segs), size=n, p=lengths / lengths.sum()), minlength=len(segs))
    spans: list[tuple[int, int]] = []
    for (s, e), m in zip(segs, alloc):
        if m == 0:
            continue
        gaps = np.arange(s, e + 1)[~closed[s : e + 1]]
        m = min(int(m), len(gaps) // 2)
        if m == 0:
            continue
        # 2m distinct allowed boundaries; pairs give non-empty, non-overlapping spans
        cuts = gaps[np.sort(rng.choice(len(gaps), size=2 * m, replace=False))]
        spans += [(int(cuts[2 * k]), int(cuts[2 * k + 1])) for k in range(m)]
    return sorted(spans)


def apply_mask(ids: np.ndarray, spans: Sequence[tuple[int, int]], vocab: JointVocab) -> np.ndarray:
    """Replace span i by <mask:i> and append `<mask:i> span_i` at the end (before a final eos)."""
    ids = np.asarray(ids)
    if not spans:
        return ids.copy()
    has_eos = len(ids) > 0 and int(ids[-1]) == vocab.eos_id
    body = ids[:-1] if has_eos else ids
    out: list[np.ndarray] = []
    tail: list[np.ndarray] = []
    pos = 0
    for i, (s, e) in enumerate(spans):
        sentinel = np.array([vocab.mask_ids[i]])
        out += [body[pos:s], sentinel]
        tail += [sentinel, body[s:e]]
        pos = e
    out.append(body[pos:])
    result = out + tail + ([np.array([vocab.eos_id])] if has_eos else [])
    return np.concatenate(result).astype(ids.dtype)


def cm3_mask(ids: np.ndarray, vocab: JointVocab, seed: int, epoch: int, key: str, cfg: MaskConfig = MaskConfig()) -> np.ndarray:
    """The CM3 transform of one sequence, deterministic in (seed, epoch, key); 2 tokens longer per span."""
    spans = choose_spans(ids, vocab, mask_rng(seed, epoch, key), cfg)
    return apply_mask(ids, spans, vocab)


def unmask(masked: np.ndarray, vocab: JointVocab) -> np.ndarray:
    """Invert `apply_mask` (used by tests and by anyone checking shards)."""
    m = np.asarray(masked)
    has_eos = len(m) > 0 and int(m[-1]) == vocab.eos_id
    body = m[:-1] if has_eos else m
    mask_set = {int(t): i for i, t in enumerate(vocab.mask_ids)}
    positions = [k for k, t in enumerate(body.tolist()) if t in mask_set]
    n = len(positions) // 2
    if n == 0:
        return m.copy()
    head, tail_pos = positions[:n], positions[n:]
    spans = {}
    for j, p in enumerate(tail_pos):
        end = tail_pos[j + 1] if j + 1 < len(tail_pos) else len(body)
        spans[mask_set[int(body[p])]] = body[p + 1 : end]
    out, pos = [], 0
    for p in head:
        out += [body[pos:p], spans[mask_set[int(body[p])]]]
        pos = p + 1
    out.append(body[pos : tail_pos[0]])
    if has_eos:
        out.append(np.array([vocab.eos_id]))
    return np.concatenate(out).astype(m.dtype)
