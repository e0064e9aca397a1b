import numpy as np
import pytest

from tokenizer.cm3 import CM3Format, MaskConfig, apply_mask, build_document, build_sequence, choose_spans, cm3_mask, mask_rng, unmask
from tokenizer.text import train_bpe
from tokenizer.vocab import JointVocab


@pytest.fixture(scope="module")
def vocab(tmp_path_factory, demo_captions):
    path = tmp_path_factory.mktemp("cm3") / "text-bpe.json"
    train_bpe(demo_captions, vocab_size=800, out_path=str(path))
    return JointVocab.from_components(str(path), num_image_codes=512)


def _seq(vocab, captions, n_neighbours=2, grid=4, seed=0):
    rng = np.random.default_rng(seed)
    docs = [build_document(vocab, vocab.text_to_ids(c), rng.integers(0, 512, (grid, grid))) for c in captions[: n_neighbours + 1]]
    return build_sequence(vocab, docs[:-1], docs[-1])


def test_document_and_sequence_layout(vocab):
    text = vocab.text_to_ids("a dog")
    codes = np.arange(4).reshape(2, 2)
    doc = build_document(vocab, text, codes)
    assert doc.tolist() == text.tolist() + [vocab.img_begin_id] + (vocab.image_offset + np.arange(4)).tolist() + [vocab.img_end_id]
    img_first = build_document(vocab, text, codes, CM3Format(image_first=True))
    assert img_first[0] == vocab.img_begin_id and img_first[-len(text):].tolist() == text.tolist()
    seq = build_sequence(vocab, [doc, img_first], doc)
    assert seq[0] == vocab.bos_id and seq[-1] == vocab.eos_id and seq.dtype == vocab.dtype
    assert (seq == vocab.break_id).sum() == 2
    assert seq.tolist() == [vocab.bos_id, *doc.tolist(), vocab.break_id, *img_first.tolist(), vocab.break_id, *doc.tolist(), vocab.eos_id]
    assert build_sequence(vocab, [], doc, CM3Format(add_bos=False, add_eos=False)).tolist() == doc.tolist()


def test_masking_is_deterministic_in_seed_epoch_key(vocab, demo_captions):
    seq = _seq(vocab, demo_captions)
    a = cm3_mask(seq, vocab, seed=1, epoch=0, key="k1")
    assert np.array_equal(a, cm3_mask(seq, vocab, seed=1, epoch=0, key="k1"))
    variants = {cm3_mask(seq, vocab, seed=1, epoch=e, key="k1").tobytes() for e in range(10)}
    variants |= {cm3_mask(seq, vocab, seed=s, epoch=0, key="k1").tobytes() for s in range(10)}
    variants |= {cm3_mask(seq, vocab, seed=1, epoch=0, key=f"k{i}").tobytes() for i in range(10)}
    assert len(variants) > 20


def test_spans_respect_breaks_and_counts_and_invert(vocab, demo_captions):
    barriers = {vocab.break_id, vocab.bos_id, vocab.eos_id}
    counts = []
    for i in range(300):
        seq = _seq(vocab, demo_captions[i % 100 :], seed=i)
        spans = choose_spans(seq, vocab, mask_rng(0, 0, f"key{i}"))
        assert 1 <= len(spans) <= 16
        counts.append(len(spans))
        for s, e in spans:
            assert s < e and not barriers & set(seq[s:e].tolist())  # no span crosses <break>/bos/eos
        for (s1, e1), (s2, e2) in zip(spans, spans[1:]):
            assert e1 < s2  # non-overlapping, in order
        masked = apply_mask(seq, spans, vocab)
        assert len(masked) == len(seq) + 2 * len(spans)
        assert masked[-1] == vocab.eos_id and masked[0] == vocab.bos_id
        assert (masked == vocab.break_id).sum() == 2
        for j in range(len(spans)):
            assert (masked == vocab.mask_ids[j]).sum() == 2
        assert np.array_equal(unmask(masked, vocab), seq)
    # Poisson(1) clamped to >= 1: P(1) = 2/e ~ 0.74, and more than one span happens
    assert 0.6 < counts.count(1) / len(counts) < 0.85 and max(counts) >= 3


def test_masked_spans_move_to_the_end(vocab):
    seq = np.array([vocab.bos_id, 10, 11, 12, vocab.break_id, 13, 14, vocab.eos_id], dtype=vocab.dtype)
    m0, m1 = vocab.mask_ids[:2]
    out = apply_mask(seq, [(2, 4), (5, 6)], vocab)
    assert out.tolist() == [vocab.bos_id, 10, m0, vocab.break_id, m1, 14, m0, 11, 12, m1, 13, vocab.eos_id]


def test_short_or_empty_sequences(vocab):
    only_break = np.array([vocab.bos_id, vocab.break_id, vocab.eos_id], dtype=vocab.dtype)
    assert np.array_equal(cm3_mask(only_break, vocab, 0, 0, "x"), only_break)
    one = np.array([vocab.bos_id, 42, vocab.eos_id], dtype=vocab.dtype)
    out = cm3_mask(one, vocab, 0, 0, "x", MaskConfig(poisson_lambda=8.0))
    assert out.tolist() == [vocab.bos_id, vocab.mask_ids[0], vocab.mask_ids[0], 42, vocab.eos_id]


def _image_blocks(seq, vocab):
    begins = np.flatnonzero(seq == vocab.img_begin_id)
    ends = np.flatnonzero(seq == vocab.img_end_id)
    assert len(begins) == len(ends)
    return list(zip(begins.tolist(), ends.tolist()))  # inclusive [<img>, </img>]


@pytest.mark.parametrize("image_first", [False, True])
def test_spans_hold_a_whole_image_block_or_none_of_it(vocab, demo_captions, image_first):
    whole = 0
    for i in range(200):
        rng = np.random.default_rng(i)
        fmt = CM3Format(image_first=image_first)
        captions = demo_captions[i % 50 : i % 50 + 3]
        docs = [build_document(vocab, vocab.text_to_ids(c), rng.integers(0, 512, (4, 4)), fmt) for c in captions]
        seq = build_sequence(vocab, docs[:-1], docs[-1], fmt)
        for lam in (1.0, 6.0):
            spans = choose_spans(seq, vocab, mask_rng(0, i, f"key{i}"), MaskConfig(poisson_lambda=lam))
            for s, e in spans:
                for b, end in _image_blocks(seq, vocab):
                    inside = s <= b and end < e
                    assert inside or e <= b or s > end, (s, e, b, end)  # never a part of a block
                    whole += inside
            assert np.array_equal(unmask(apply_mask(seq, spans, vocab), vocab), seq)
    assert whole > 20  # images are masked too, as whole blocks


def test_an_image_alone_between_breaks_is_masked_whole_or_not_at_all(vocab):
    img = [vocab.img_begin_id, *(vocab.image_offset + np.arange(5)).tolist(), vocab.img_end_id]
    seq = np.array([vocab.bos_id, *img, vocab.eos_id], dtype=vocab.dtype)
    for key in range(20):
        spans = choose_spans(seq, vocab, mask_rng(0, 0, str(key)), MaskConfig(poisson_lambda=5.0))
        assert spans == [(1, 1 + len(img))]
    # an unclosed <img> (malformed) is never cut into: spans stay before it
    open_block = np.array([vocab.bos_id, 40, 41, vocab.img_begin_id, *img[1:-1], vocab.break_id, 42, vocab.eos_id])
    for key in range(50):
        for s, e in choose_spans(open_block, vocab, mask_rng(0, 0, str(key)), MaskConfig(poisson_lambda=5.0)):
            assert e <= 3 or s >= 10


def test_text_only_spans_are_unchanged_by_the_image_rule(vocab):
    """Spans recorded before the image rule existed: shards masked at shard time stay identical."""
    seq = np.array([vocab.bos_id, *range(30, 42), vocab.break_id, *range(50, 57), vocab.eos_id], dtype=vocab.dtype)
    expected = {"a": [(2, 4), (5, 11)], "b": [(1, 2), (9, 10), (11, 13), (19, 20)],
                "c": [(1, 2), (3, 4), (5, 8), (9, 10), (11, 12), (15, 19)]}
    for key, spans in expected.items():
        assert choose_spans(seq, vocab, mask_rng(0, 0, key), MaskConfig(poisson_lambda=3.0)) == spans
