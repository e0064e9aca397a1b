"""SFT task formatting in the style of CM3leon §4: instruction prompt, `<break>`, answer.

One example is `[bos] prompt <break> answer [eos]`. `answer_start` is the offset of the
answer's first token in that stored sequence; a reader gives no loss before it, so the model
learns to answer, not to repeat prompts (the answer's `eos` is learnt: it says when to stop).
Tasks, on one curated document (caption ids, VQ codes, boxes in the curated frame):

    captioning           <img> codes </img> Describe the given picture. <break> caption
    generation           Generate high quality image of "caption". <break> <img> codes </img>
    grounded_generation  Generate high quality image of "caption" with bottle at (199, 130) -> (204, 150).
                         <break> <img> codes </img>

(the `cm3leon` templates; `minimal` drops the instruction words). Every text piece goes
through the BPE as plain text: captions and labels are data, so one that spells `<img>` is
those characters, never a control id. Task balancing (`task_factors`, `copies`) is pure
arithmetic so the pipeline and the tests share it. No Beam here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from tokenizer.vocab import JointVocab

TASKS = ("captioning", "generation", "grounded_generation")
GROUNDED = "grounded_generation"  # the task that needs boxes

# A template is (prompt parts, answer parts); a part is "{image}", "{caption}", or text in
# which "{objects}" stands for the box phrase. Consecutive text parts are encoded together.
IMAGE, CAPTION, OBJECTS = "{image}", "{caption}", "{objects}"
Template = tuple[tuple[str, ...], tuple[str, ...]]
TEMPLATES: dict[str, dict[str, Template]] = {
    "cm3leon": {
        "captioning": ((IMAGE, "Describe the given picture."), (CAPTION,)),
        "generation": (('Generate high quality image of "', CAPTION, '".'), (IMAGE,)),
        GROUNDED: (('Generate high quality image of "', CAPTION, '" ' + OBJECTS + "."), (IMAGE,)),
    },
    "minimal": {
        "captioning": ((IMAGE,), (CAPTION,)),
        "generation": ((CAPTION,), (IMAGE,)),
        GROUNDED: ((CAPTION, " " + OBJECTS), (IMAGE,)),
    },
}
LAYOUT = "[bos] prompt <break> answer [eos]"

Box = tuple[int, int, int, int]


def box_phrase(objects: Sequence[tuple[str, Box]]) -> str:
    """CM3leon's grounding text: `with bottle at (199, 130) -> (204, 150) and cup at ...`."""
    spans = [f"{label} at ({x0}, {y0}) -> ({x1}, {y1})" for label, (x0, y0, x1, y1) in objects]
    return "with " + " and ".join(spans)


def image_first(task: str, templates: str = "cm3leon") -> bool:
    """Whether the image comes before any text in the sequence (the provenance `order`)."""
    prompt, _ = TEMPLATES[templates][task]
    return prompt[0] == IMAGE


@dataclass(frozen=True)
class Example:
    """One SFT sequence as stored, and where its answer begins."""

    tokens: np.ndarray
    answer_start: int


def _render(vocab: JointVocab, parts: Sequence[str], caption: np.ndarray, codes: np.ndarray,
            objects: Sequence[tuple[str, Box]]) -> list[np.ndarray]:
    out: list[np.ndarray] = []
    text: list[str] = []

    def flush() -> None:
        if text:
            out.append(vocab.text_to_ids("".join(text)).astype(np.int64))
            text.clear()

    for part in parts:
        if part == IMAGE:
            flush()
            ids = vocab.codes_to_ids(np.asarray(codes).reshape(-1)).astype(np.int64)
            out.append(np.concatenate([[vocab.img_begin_id], ids, [vocab.img_end_id]]))
        elif part == CAPTION:
            flush()
            out.append(np.asarray(caption, dtype=np.int64))
        else:
            text.append(part.replace(OBJECTS, box_phrase(objects)) if OBJECTS in part else part)
    flush()
    return out


def build_example(vocab: JointVocab, task: str, caption: np.ndarray, codes: np.ndarray,
                  objects: Sequence[tuple[str, Box]] = (), templates: str = "cm3leon") -> Example:
    """`[bos] prompt <break> answer [eos]` for one document; `caption` are its caption ids
    (plain BPE text), `codes` its raw VQ codes, `objects` (label, box) in the curated frame."""
    if task == GROUNDED and not objects:
        raise ValueError("grounded_generation needs at least one box")
    prompt_parts, answer_parts = TEMPLATES[templates][task]
    prompt = _render(vocab, prompt_parts, caption, codes, objects)
    answer = _render(vocab, answer_parts, caption, codes, objects)
    head = [np.array([vocab.bos_id]), *prompt, np.array([vocab.break_id])]
    start = sum(len(p) for p in head)
    tokens = np.concatenate([*head, *answer, np.array([vocab.eos_id])]).astype(vocab.dtype)
    return Example(tokens, start)


# ----------------------------------------------------------------------------- balancing


def task_factors(candidates: Mapping[str, int], weights: Mapping[str, float] | None = None,
                 max_up: float = 3.0, min_down: float = 0.3) -> dict[str, float]:
    """Sampling factor per task: target share / natural share, clamped to [min_down, max_up].

    The natural share of a task is its candidates over all candidates; the target share is its
    weight over the weights of the tasks that have candidates (equal weights by default). A task
    without candidates gets factor 0. CM3leon's thresholds: upsampled at most 3x, downsampled
    to no less than 0.3x.
    """
    present = {t: n for t, n in candidates.items() if n > 0}
    total = sum(present.values())
    weight = {t: float((weights or {}).get(t, 1.0)) for t in present}
    weight_sum = sum(weight.values())
    factors = {t: 0.0 for t in candidates}
    for task, n in present.items():
        target, natural = weight[task] / weight_sum, n / total
        factors[task] = min(max_up, max(min_down, target / natural))
    return factors


def copies(factor: float, unit: float) -> int:
    """How many times one candidate is written: floor(factor), plus one more when `unit`
    (uniform in [0, 1), a pure function of seed, task and key) is below the fractional part;
    so a task's expected count is exactly candidates x factor."""
    whole = math.floor(factor)
    return whole + (1 if unit < factor - whole else 0)
