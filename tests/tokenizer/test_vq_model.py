import json

import numpy as np
import pytest
import torch

from tokenizer.vq.config import VQConfig, config_names, get_config
from tokenizer.vq.model import VQModel, load_vq, save_vq
from tokenizer.vq.quantizer import FactorizedQuantizer


def test_registry_geometry_matches_cm3leon():
    cfg = get_config("cm3leon-256")
    assert cfg.downsample_factor == 8 and cfg.grid_size == 32
    assert cfg.grid_size**2 == 1024 and cfg.codebook_size == 8192
    small = get_config("cpu-small")
    assert small.resolution == 256 and small.resolution % small.downsample_factor == 0
    assert set(config_names()) >= {"cm3leon-256", "cpu-small"}
    with pytest.raises(KeyError):
        get_config("nope")


def test_config_json_round_trip_and_validation():
    cfg = get_config("cpu-small")
    assert VQConfig.from_dict(json.loads(cfg.to_json())) == cfg
    with pytest.raises(ValueError):
        VQConfig.from_dict({**cfg.to_dict(), "bogus": 1})
    with pytest.raises(ValueError):
        cfg.replace(resolution=250)
    with pytest.raises(ValueError):
        cfg.replace(perceptual_weight=1.0)  # no weights path: refuse instead of downloading


@pytest.mark.parametrize("size", [64, 256])
def test_encode_decode_shapes_and_id_ranges(data_initialised_model, real_batch, size):
    model = data_initialised_model
    f = model.cfg.downsample_factor
    images = np.ascontiguousarray(real_batch[:, :size, :size])
    codes = model.encode_codes(images)
    assert isinstance(codes, np.ndarray) and codes.shape == (4, size // f, size // f)
    assert codes.min() >= 0 and codes.max() < model.cfg.codebook_size
    assert len(np.unique(codes)) > 1
    recon = model.decode_codes(codes)
    assert recon.dtype == np.uint8 and recon.shape == images.shape
    # torch in -> torch out, same values
    t_codes = model.encode_codes(torch.from_numpy(images))
    assert torch.is_tensor(t_codes) and np.array_equal(t_codes.numpy(), codes)


def test_bad_inputs_are_refused(data_initialised_model, real_batch):
    model = data_initialised_model
    with pytest.raises(ValueError):
        model.encode_codes(real_batch.astype(np.float32))
    with pytest.raises(ValueError):
        model.encode_codes(np.ascontiguousarray(real_batch[:, :63, :63]))
    with pytest.raises(ValueError):
        model.decode_codes(np.full((1, 4, 4), model.cfg.codebook_size))


def test_cm3leon_config_makes_32x32_codes_per_256px():
    torch.manual_seed(0)
    model = VQModel(get_config("cm3leon-256")).eval()
    # one 64 px image keeps this fast; the grid scales with the input (fully convolutional)
    codes = model.encode_codes(np.zeros((1, 64, 64, 3), dtype=np.uint8))
    assert codes.shape == (1, 8, 8) and codes.max() < 8192
    assert 256 // model.cfg.downsample_factor == 32


def test_checkpoint_round_trip_gives_identical_codes(tmp_path, data_initialised_model, real_batch):
    model = data_initialised_model
    path = save_vq(model, str(tmp_path / "vq.safetensors"))
    assert (tmp_path / "vq.json").exists()
    loaded = load_vq(str(tmp_path))  # the folder works too
    assert loaded.cfg == model.cfg
    a, b = model.encode_codes(real_batch), loaded.encode_codes(real_batch)
    assert np.array_equal(a, b) and len(np.unique(a)) > 1
    assert np.array_equal(model.decode_codes(a), loaded.decode_codes(b))
    loaded2 = load_vq("file://" + path)  # fsspec URL
    assert np.array_equal(loaded2.encode_codes(real_batch), a)
    nested = save_vq(model, str(tmp_path / "new" / "dir" / "vq.safetensors"))  # creates parents
    assert np.array_equal(load_vq(nested).encode_codes(real_batch), a)


def test_quantizer_lookup_is_cosine_nearest_and_straight_through():
    torch.manual_seed(0)
    q = FactorizedQuantizer(8, 16, 4).train()
    z = torch.randn(2, 8, 3, 3, requires_grad=True)
    out = q(z)
    vec = q.project(z).reshape(-1, 4)
    assert torch.allclose(vec.norm(dim=1), torch.ones(18), atol=1e-5)
    sims = vec @ q.embed().t()
    assert torch.equal(out.codes.reshape(-1), sims.argmax(1))
    (out.quantized.sum() + out.loss).backward()
    assert z.grad is not None and z.grad.abs().sum() > 0  # gradient passes the quantizer


def test_dead_code_restart_moves_only_dead_codes():
    torch.manual_seed(0)
    q = FactorizedQuantizer(8, 16, 4, dead_code_threshold=0.5)
    before = q.codebook.detach().clone()
    q.usage_ema[:8] = 0.0  # codes 0..7 dead
    vectors = torch.nn.functional.normalize(torch.randn(100, 4), dim=1)
    n = q.restart_dead_codes(vectors, torch.Generator().manual_seed(1))
    assert n == 8
    assert not torch.allclose(q.codebook[:8], before[:8])
    assert torch.equal(q.codebook[8:], before[8:])
    # restarted codes sit on (near) real encodings
    dist = torch.cdist(q.codebook[:8].detach(), vectors).min(dim=1).values
    assert (dist < 0.1).all()
    assert (q.usage_ema[:8] == 1.0).all()
    assert q.restart_dead_codes(vectors) == 0
