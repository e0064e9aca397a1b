import pytest
from tokenizers import Tokenizer

from tokenizer.text import BASE_SPECIALS, encode, decode, load_bpe, mask_token, num_mask_sentinels, special_tokens, train_bpe


@pytest.fixture(scope="module")
def bpe_path(tmp_path_factory, demo_captions):
    path = tmp_path_factory.mktemp("bpe") / "text-bpe.json"
    train_bpe(demo_captions, vocab_size=2000, out_path=str(path), num_mask_sentinels=16)
    return path


def test_round_trip_on_every_real_caption(bpe_path, demo_captions):
    tok = load_bpe(str(bpe_path))
    assert len(demo_captions) >= 800
    for cap in demo_captions:
        ids = encode(tok, cap)
        assert decode(tok, ids) == cap
    # merges were learned: far fewer tokens than bytes
    n_tok = sum(len(encode(tok, c)) for c in demo_captions)
    n_bytes = sum(len(c.encode()) for c in demo_captions)
    assert n_tok < 0.4 * n_bytes


def test_unseen_text_round_trips_byte_level(bpe_path):
    tok = load_bpe(str(bpe_path))
    for text in ["Zürich café – 東京 🚲", "  leading spaces\tand\nnewlines ", "<break> is literal here?"]:
        assert decode(tok, encode(tok, text)) == text


def test_specials_have_fixed_ids_and_are_atomic(bpe_path):
    tok = Tokenizer.from_file(str(bpe_path))  # plain HF loader works
    specials = special_tokens(16)
    assert specials[: len(BASE_SPECIALS)] == list(BASE_SPECIALS)
    for i, s in enumerate(specials):
        assert tok.token_to_id(s) == i
        assert encode(tok, s) == [i]
    assert num_mask_sentinels(tok) == 16 and tok.token_to_id(mask_token(16)) is None
    assert tok.get_vocab_size() <= 2000


def test_vocab_size_is_respected_and_validated(demo_captions, tmp_path):
    tok = train_bpe(demo_captions, vocab_size=400, num_mask_sentinels=4)
    assert tok.get_vocab_size() == 400
    with pytest.raises(ValueError):
        train_bpe(demo_captions, vocab_size=100)
