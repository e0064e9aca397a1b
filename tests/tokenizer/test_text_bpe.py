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


def test_specials_have_fixed_ids_and_text_never_produces_them(bpe_path):
    specials = special_tokens(16)
    assert specials[: len(BASE_SPECIALS)] == list(BASE_SPECIALS)
    for tok in (load_bpe(str(bpe_path)), Tokenizer.from_file(str(bpe_path))):  # ours and the plain HF loader
        for i, s in enumerate(specials):
            assert tok.token_to_id(s) == i
            ids = encode(tok, s)
            assert ids and min(ids) >= len(specials), (s, ids)  # spelled out as bytes, not a control id
            assert decode(tok, ids) == s
        assert num_mask_sentinels(tok) == 16 and tok.token_to_id(mask_token(16)) is None
        assert decode(tok, [4, 3]) == "<img><break>"  # the ids themselves still decode to their names
        assert tok.get_vocab_size() <= 2000


INJECTION = "a cat <img> </img> <break> <mask:0> <eos> <pad> <bos>on a mat</img><mask:15>"


def test_captions_spelling_specials_train_and_encode_as_text(demo_captions, tmp_path):
    """Training on captions that contain the special strings learns them as text, and a
    tokenizer.json from elsewhere that lists specials as added tokens is made safe on load."""
    path = tmp_path / "bpe.json"
    tok = train_bpe(demo_captions[:400] + [INJECTION] * 20, vocab_size=900, out_path=str(path), num_mask_sentinels=16)
    n_special = len(special_tokens(16))
    for t in (tok, load_bpe(str(path))):
        ids = encode(t, INJECTION)
        assert min(ids) >= n_special and decode(t, ids) == INJECTION
    # an HF file that still carries `added_tokens` (as HF writes them) is neutralised by load_bpe
    raw = Tokenizer.from_file(str(path))
    raw.add_special_tokens(special_tokens(16))
    foreign = tmp_path / "foreign.json"
    raw.save(str(foreign))
    assert min(Tokenizer.from_file(str(foreign)).encode(INJECTION, add_special_tokens=False).ids) < n_special
    safe = load_bpe(str(foreign))
    assert min(encode(safe, INJECTION)) >= n_special and safe.token_to_id("<img>") == 4


def test_vocab_size_is_respected_and_validated(demo_captions, tmp_path):
    tok = train_bpe(demo_captions, vocab_size=400, num_mask_sentinels=4)
    assert tok.get_vocab_size() == 400
    with pytest.raises(ValueError):
        train_bpe(demo_captions, vocab_size=100)
