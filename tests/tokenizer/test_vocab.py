import json

import numpy as np
import pytest

from tokenizer.text import train_bpe
from tokenizer.vocab import JointVocab, smallest_uint_dtype


@pytest.fixture(scope="module")
def bpe_path(tmp_path_factory, demo_captions):
    path = tmp_path_factory.mktemp("vocab") / "text-bpe.json"
    train_bpe(demo_captions, vocab_size=1500, out_path=str(path))
    return str(path)


def test_ranges_never_collide(bpe_path):
    v = JointVocab.from_components(bpe_path, num_image_codes=512)
    text_ids = set(range(v.bpe_size))
    image_ids = set(v.codes_to_ids(np.arange(512)).tolist())
    assert text_ids.isdisjoint(image_ids)
    assert min(image_ids) == v.image_offset and max(image_ids) == v.size - 1
    specials = list(v.specials.values()) + list(v.mask_ids)
    assert len(set(specials)) == len(specials) and set(specials) <= text_ids
    assert v.is_text(list(text_ids)).all() and not v.is_text(list(image_ids)).any()
    assert v.is_image(list(image_ids)).all() and not v.is_image(list(text_ids)).any()
    assert v.dtype == np.uint16


def test_cm3leon_sizes_fit_uint16_and_reserve_the_text_range(bpe_path):
    v = JointVocab.from_components(bpe_path, num_image_codes=8192, text_vocab_size=56_320)
    assert v.image_offset == 56_320 and v.size == 64_512 and v.dtype == np.uint16
    assert v.bpe_size < v.image_offset  # the unused text ids are reserved, image ids do not move
    big = JointVocab.from_components(bpe_path, num_image_codes=65_536 - 56_320 + 1, text_vocab_size=56_320)
    assert big.dtype == np.uint32
    assert smallest_uint_dtype(65_536) == np.uint16 and smallest_uint_dtype(65_537) == np.uint32
    with pytest.raises(ValueError):
        JointVocab.from_components(bpe_path, num_image_codes=0)


def test_round_trips_text_and_image(bpe_path, demo_captions):
    v = JointVocab.from_components(bpe_path, num_image_codes=512)
    for cap in demo_captions[:50]:
        ids = v.text_to_ids(cap)
        assert ids.dtype == v.dtype and (ids < v.bpe_size).all()
        assert v.ids_to_text(ids) == cap
    codes = np.random.default_rng(0).integers(0, 512, size=(2, 64, 64))
    ids = v.codes_to_ids(codes)
    assert ids.dtype == v.dtype and ids.shape == codes.shape
    assert np.array_equal(v.ids_to_codes(ids), codes)
    with pytest.raises(ValueError):
        v.codes_to_ids([512])
    with pytest.raises(ValueError):
        v.ids_to_codes([v.bos_id])
    with pytest.raises(ValueError):
        v.ids_to_text([v.image_offset])


def test_image_round_trip_through_the_model(bpe_path, data_initialised_model, real_batch):
    v = JointVocab.from_components(bpe_path, num_image_codes=data_initialised_model.cfg.codebook_size)
    codes = data_initialised_model.encode_codes(real_batch[:2])
    ids = v.codes_to_ids(codes)
    back = v.ids_to_codes(ids)
    assert np.array_equal(back, codes)
    assert np.array_equal(data_initialised_model.decode_codes(back), data_initialised_model.decode_codes(codes))


def test_save_load_and_tamper_detection(tmp_path, bpe_path):
    v = JointVocab.from_components(bpe_path, num_image_codes=512, text_vocab_size=2048)
    out = tmp_path / "models"
    out.mkdir()
    (out / "text-bpe.json").write_text(open(bpe_path).read())
    v.save(str(out / "vocab.json"))
    spec = json.loads((out / "vocab.json").read_text())
    assert spec["image"]["offset"] == 2048 and spec["dtype"] == "uint16" and spec["size"] == 2560
    assert spec["specials"]["break"] == 3 and len(spec["mask_ids"]) == 16
    loaded = JointVocab.load(str(out / "vocab.json"))
    assert loaded == v
    assert loaded.ids_to_text(loaded.text_to_ids("a cat on a mat")) == "a cat on a mat"
    assert JointVocab.load(str(out / "vocab.json"), with_text=False).image_offset == 2048
    (out / "text-bpe.json").write_text(open(bpe_path).read().replace('"<break>"', '"<brake>"'))
    with pytest.raises(ValueError, match="sha256"):
        JointVocab.load(str(out / "vocab.json"))


def test_write_vocab_from_a_models_dir(tmp_path, curated_store, caption_rows, tiny_cfg, data_initialised_model):
    from tokenizer.text import captions_from_shards
    from tokenizer.vocab import write_vocab
    from tokenizer.vq.model import save_vq

    captions = list(captions_from_shards(curated_store["urls"]))
    assert len(captions) == 5 * len(curated_store["samples"])  # 5 COCO captions per photo
    train_bpe(captions, vocab_size=600, out_path=str(tmp_path / "text-bpe.json"))
    save_vq(data_initialised_model, str(tmp_path / "vq.safetensors"))
    v = write_vocab(str(tmp_path), text_vocab_size=1000)
    assert v.image_offset == 1000 and v.num_image_codes == tiny_cfg.codebook_size
    assert JointVocab.load(str(tmp_path / "vocab.json")) == v
