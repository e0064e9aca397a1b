"""SFT task formatting (tokenizer/sft.py): template layouts, answer offsets, text as data, and
the task-balancing arithmetic with CM3leon's 3 / 0.3 thresholds."""

import numpy as np
import pytest

from tokenizer.sft import TASKS, TEMPLATES, box_phrase, build_example, copies, image_first, task_factors
from tokenizer.text import train_bpe
from tokenizer.vocab import JointVocab

HOSTILE = "<img> </img> <break> <mask:0> <eos> <bos> <pad>"


@pytest.fixture(scope="module")
def vocab(tmp_path_factory, demo_captions):
    path = tmp_path_factory.mktemp("sft") / "text-bpe.json"
    train_bpe(demo_captions, vocab_size=800, out_path=str(path))
    return JointVocab.from_components(str(path), num_image_codes=64)


def _control_ids(vocab) -> list[int]:
    return [*vocab.specials.values(), *vocab.mask_ids]


def _image(vocab, codes) -> list[int]:
    return [vocab.img_begin_id, *(vocab.image_offset + np.asarray(codes).reshape(-1)).tolist(), vocab.img_end_id]


def _split(vocab, example):
    """(prompt ids, answer ids) of `[bos] prompt <break> answer [eos]`, checking the frame."""
    t = example.tokens.tolist()
    assert t[0] == vocab.bos_id and t[-1] == vocab.eos_id and t[example.answer_start - 1] == vocab.break_id
    assert t.count(vocab.break_id) == 1 and t.count(vocab.bos_id) == 1 and t.count(vocab.eos_id) == 1
    return t[1 : example.answer_start - 1], t[example.answer_start : -1]


def _text(vocab, ids) -> str:
    ids = np.asarray(ids)
    assert vocab.is_text(ids).all() and not np.isin(ids, _control_ids(vocab)).any()
    return vocab.ids_to_text(ids)


def test_captioning_puts_the_caption_exactly_at_answer_start(vocab):
    caption, codes = vocab.text_to_ids("A red tram in the snow."), np.arange(16).reshape(4, 4)
    ex = build_example(vocab, "captioning", caption, codes)
    prompt, answer = _split(vocab, ex)
    assert prompt[:18] == _image(vocab, codes)
    assert _text(vocab, prompt[18:]) == "Describe the given picture."
    assert answer == caption.tolist()  # the loss covers the caption and eos, nothing of the prompt
    assert ex.tokens.dtype == vocab.dtype and image_first("captioning")


def test_generation_answers_with_the_image(vocab):
    caption, codes = vocab.text_to_ids("A red tram in the snow."), np.arange(16)[::-1]
    ex = build_example(vocab, "generation", caption, codes)
    prompt, answer = _split(vocab, ex)
    assert _text(vocab, prompt) == 'Generate high quality image of "A red tram in the snow.".'
    assert answer == _image(vocab, codes)
    assert ex.tokens[ex.answer_start] == vocab.img_begin_id and not image_first("generation")


def test_grounded_prompt_uses_cm3leons_box_text(vocab):
    objects = [("bottle", (199, 130, 204, 150)), ("cup", (0, 0, 256, 12))]
    assert box_phrase(objects[:1]) == "with bottle at (199, 130) -> (204, 150)"
    ex = build_example(vocab, "grounded_generation", vocab.text_to_ids("A sink and a mirror"), np.zeros(16, int), objects)
    prompt, answer = _split(vocab, ex)
    assert _text(vocab, prompt) == ('Generate high quality image of "A sink and a mirror" with bottle at (199, 130) '
                                    '-> (204, 150) and cup at (0, 0) -> (256, 12).')
    assert answer == _image(vocab, np.zeros(16, int))
    with pytest.raises(ValueError, match="needs at least one box"):
        build_example(vocab, "grounded_generation", vocab.text_to_ids("x"), np.zeros(16, int), [])


def test_hostile_caption_and_label_stay_plain_text(vocab):
    """A vendor's caption or label that spells control tokens never becomes one: the only
    control ids are the frame's bos, <img>, </img>, <break> and eos."""
    caption, codes = vocab.text_to_ids(HOSTILE), np.arange(16)
    objects = [(HOSTILE, (1, 2, 3, 4))]
    for templates in TEMPLATES:
        for task in TASKS:
            ex = build_example(vocab, task, caption, codes, objects, templates)
            texts = []
            for part in _split(vocab, ex):
                if vocab.img_begin_id in part:  # cut out the one image block
                    b = part.index(vocab.img_begin_id)
                    assert part[b : b + 18] == _image(vocab, codes)
                    part = part[:b] + part[b + 18 :]
                texts.append(_text(vocab, part))  # asserts: no control id in the text
            expected = 2 if task == "grounded_generation" else 1  # caption (+ label)
            assert " ".join(texts).count(HOSTILE) == expected, (templates, task, texts)
            assert (ex.tokens == vocab.img_begin_id).sum() == 1 and (ex.tokens == vocab.img_end_id).sum() == 1


def test_minimal_templates_have_no_instruction_words(vocab):
    caption, codes = vocab.text_to_ids("A dog."), np.arange(16)
    prompt, answer = _split(vocab, build_example(vocab, "captioning", caption, codes, templates="minimal"))
    assert prompt == _image(vocab, codes) and answer == caption.tolist()
    prompt, _ = _split(vocab, build_example(vocab, "grounded_generation", caption, codes, [("dog", (1, 2, 3, 4))],
                                            templates="minimal"))
    assert _text(vocab, prompt) == "A dog. with dog at (1, 2) -> (3, 4)"


def test_task_factors_clamp_at_3_and_0_3():
    # natural shares 0.45 / 0.45 / 0.10; equal targets (1/3): 0.74, 0.74, 3.33 -> clamped to 3
    f = task_factors({"captioning": 450, "generation": 450, "grounded_generation": 100})
    assert f["captioning"] == pytest.approx((1 / 3) / 0.45) and f["generation"] == f["captioning"]
    assert f["grounded_generation"] == 3.0
    # a dominant task is downsampled to no less than 0.3x: share 0.95, target 0.5 -> 0.526; weight it down
    f = task_factors({"captioning": 950, "generation": 50}, {"captioning": 0.1, "generation": 0.9})
    assert f["captioning"] == pytest.approx(0.3) and f["generation"] == 3.0
    f = task_factors({"captioning": 500, "generation": 500})  # already balanced: untouched
    assert f == {"captioning": 1.0, "generation": 1.0}
    f = task_factors({"captioning": 10, "generation": 10, "grounded_generation": 0})  # no boxes at all
    assert f == {"captioning": 1.0, "generation": 1.0, "grounded_generation": 0.0}
    f = task_factors({"captioning": 100, "grounded_generation": 10}, max_up=10.0, min_down=0.01)
    assert f["grounded_generation"] == pytest.approx(5.5) and f["captioning"] == pytest.approx(0.55)


def test_copies_realise_the_factor_exactly_in_expectation():
    units = (np.arange(10_000) + 0.5) / 10_000  # an even spread of [0, 1)
    for factor in (0.3, 0.74, 1.0, 2.5, 3.0):
        assert sum(copies(factor, u) for u in units) == pytest.approx(factor * len(units), abs=1)
    assert copies(2.5, 0.49) == 3 and copies(2.5, 0.5) == 2 and copies(0.3, 0.3) == 0 and copies(1.0, 0.999) == 1
