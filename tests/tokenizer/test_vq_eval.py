import numpy as np
import pytest

from tokenizer.vq.eval import codebook_stats, psnr, ssim


def test_psnr_matches_its_definition(real_batch):
    a = real_batch[:2].astype(np.int16)
    b = np.clip(a + 4, 0, 255)
    mse = ((a - b) ** 2).reshape(2, -1).mean(1)
    expected = 10 * np.log10(255**2 / mse)
    np.testing.assert_allclose(psnr(a.astype(np.uint8), b.astype(np.uint8)), expected, rtol=1e-9)
    assert psnr(real_batch[:1], real_batch[:1])[0] > 90


def test_ssim_is_one_for_identity_and_drops_with_noise(real_batch):
    imgs = real_batch[:2]
    np.testing.assert_allclose(ssim(imgs, imgs), 1.0, atol=1e-6)
    rng = np.random.default_rng(0)
    light = np.clip(imgs + rng.normal(0, 5, imgs.shape), 0, 255).astype(np.uint8)
    heavy = np.clip(imgs + rng.normal(0, 40, imgs.shape), 0, 255).astype(np.uint8)
    s_light, s_heavy = ssim(imgs, light), ssim(imgs, heavy)
    assert (s_light > s_heavy).all() and (s_light < 1).all()
    np.testing.assert_allclose(ssim(imgs, heavy), ssim(heavy, imgs), atol=1e-6)  # symmetric
    flat = np.full_like(imgs, 128)  # no structure at all
    assert (ssim(imgs, flat) < 0.6).all()


def test_ssim_matches_a_float64_reference(real_batch):
    import torch
    import torch.nn.functional as F

    a = real_batch[:1]
    b = np.clip(a.astype(np.int16) + np.random.default_rng(1).normal(0, 12, a.shape), 0, 255).astype(np.uint8)
    x = torch.as_tensor(a, dtype=torch.float64).permute(0, 3, 1, 2)[:, :1]
    y = torch.as_tensor(b, dtype=torch.float64).permute(0, 3, 1, 2)[:, :1]
    g = torch.exp(-((torch.arange(11, dtype=torch.float64) - 5) ** 2) / (2 * 1.5**2))
    w = (g[:, None] @ g[None, :] / g.sum() ** 2)[None, None]
    mx, my = F.conv2d(x, w), F.conv2d(y, w)
    sxx, syy, sxy = F.conv2d(x * x, w) - mx**2, F.conv2d(y * y, w) - my**2, F.conv2d(x * y, w) - mx * my
    c1, c2 = 6.5025, 58.5225
    ref = (((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx**2 + my**2 + c1) * (sxx + syy + c2))).mean().item()
    got = ssim(a[..., :1], b[..., :1])[0]
    assert got == pytest.approx(ref, abs=1e-4)


def test_codebook_stats():
    counts = np.zeros(100)
    counts[:25] = 7
    st = codebook_stats(counts)
    assert st["codebook_usage_pct"] == 25.0 and st["codes_used"] == 25
    assert st["perplexity"] == pytest.approx(25.0)
    skewed = counts.copy()
    skewed[0] = 10_000
    assert codebook_stats(skewed)["perplexity"] < 2.0
