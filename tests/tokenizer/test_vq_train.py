import json

import numpy as np
import pytest
import torch
from PIL import Image

from tokenizer.shards import is_heldout
from tokenizer.vq.model import VQModel, load_vq
from tokenizer.vq.config import TrainVQConfig
from tokenizer.vq.train import iter_batches, lr_at, train_vq

FAST = dict(batch_size=4, crop_size=32, crops_per_image=2, shuffle_buffer=16, eval_every=0, checkpoint_every=0,
            warmup_steps=2, progress=False, final_eval=False, eval_batch_size=4)


def _preempt_at_batch(monkeypatch, index: int):
    """Make VQ training die (KeyboardInterrupt, as a preempted job) when it asks for batch
    `index` (0-based); returns the real batch iterator, to put back."""
    import tokenizer.vq.train as train_mod

    real_iter = train_mod.iter_batches

    def preempted(*args, **kwargs):
        for i, batch in enumerate(real_iter(*args, **kwargs)):
            if i == index:
                raise KeyboardInterrupt("preempted")
            yield batch

    monkeypatch.setattr(train_mod, "iter_batches", preempted)
    return real_iter


def test_resume_continues_exactly_where_it_stopped(tmp_path, tiny_cfg, curated_store, monkeypatch):
    import tokenizer.vq.train as train_mod

    urls = curated_store["urls"]
    cfg = dict(FAST, max_steps=6, checkpoint_every=3)
    train_vq(tiny_cfg, cfg, urls, str(tmp_path / "a"))

    real_iter = _preempt_at_batch(monkeypatch, 3)  # the job dies when it asks for the 4th batch
    with pytest.raises(KeyboardInterrupt):
        train_vq(tiny_cfg, cfg, urls, str(tmp_path / "b"))
    assert json.loads((tmp_path / "b" / "vq-train.json").read_text())["step"] == 3
    monkeypatch.setattr(train_mod, "iter_batches", real_iter)
    resumed = train_vq(tiny_cfg, cfg, urls, str(tmp_path / "b"))  # same out_dir: resumes at step 3
    assert resumed["step"] == 6
    a, b = load_vq(str(tmp_path / "a")).state_dict(), load_vq(str(tmp_path / "b")).state_dict()
    assert a.keys() == b.keys()
    for k in a:  # weights, quantizer buffers; equality also needs the AdamW moments restored
        assert torch.equal(a[k], b[k]), k
    torch.manual_seed(0)
    fresh = VQModel(tiny_cfg).state_dict()
    assert not torch.equal(a["decoder.conv_out.weight"], fresh["decoder.conv_out.weight"])


def test_resume_refuses_a_different_config(tmp_path, tiny_cfg, curated_store):
    train_vq(tiny_cfg, dict(FAST, max_steps=1), curated_store["urls"], str(tmp_path))
    with pytest.raises(ValueError, match="different VQConfig"):
        train_vq(tiny_cfg.replace(codebook_size=32), dict(FAST, max_steps=2), curated_store["urls"], str(tmp_path))


def test_crop_stream_is_deterministic_and_skips_on_resume(curated_store):
    cfg = TrainVQConfig(**dict(FAST, max_steps=10))
    it = iter_batches(curated_store["urls"], cfg)
    batches = [next(it) for _ in range(5)]
    again = iter_batches(curated_store["urls"], cfg)
    assert all(np.array_equal(x, next(again)) for x in batches)
    skipped = iter_batches(curated_store["urls"], cfg, start_step=3)
    assert np.array_equal(next(skipped), batches[3])
    assert batches[0].shape == (4, 32, 32, 3) and batches[0].dtype == np.uint8


def test_crop_stream_reads_the_pixels_of_every_training_image_and_of_no_heldout_one(curated_store, monkeypatch):
    """Which images' pixels the crop stream decodes, over one epoch: exactly the training split."""
    import tokenizer.vq.train as train_mod

    decoded: list[str] = []
    real_iter_shard = train_mod.iter_shard

    class Watched:  # the real sample; records its key when its pixels are read
        def __init__(self, sample):
            self.sample, self.key = sample, sample.key

        def array(self):
            decoded.append(self.key)
            return self.sample.array()

    monkeypatch.setattr(train_mod, "iter_shard", lambda url: (Watched(s) for s in real_iter_shard(url)))
    cfg = TrainVQConfig(**dict(FAST, max_steps=10))
    keys = [s[0] for s in curated_store["samples"]]
    train = sorted(k for k in keys if not is_heldout(k, cfg.heldout_percent))
    assert 0 < len(train) < len(keys), "the fixture should hold both splits"
    crops = train_mod.iter_crops(curated_store["urls"], cfg)
    for _ in range(len(train) * cfg.crops_per_image):  # one epoch: every image is read before its last crop
        next(crops)
    assert sorted(decoded) == train  # each training image once; no held-out image's pixels


def test_lr_schedule_warms_up_then_decays():
    cfg = TrainVQConfig(max_steps=100, warmup_steps=10, lr=1e-3, min_lr_ratio=0.1)
    lrs = [lr_at(cfg, s, 0.0) for s in range(100)]
    assert lrs[0] < lrs[9] <= 1e-3 + 1e-12
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[-1] == pytest.approx(1e-4, rel=0.05)
    timed = TrainVQConfig(max_steps=None, max_minutes=10, warmup_steps=0, lr=1e-3, min_lr_ratio=0.1)
    assert lr_at(timed, 5, 9.99) < lr_at(timed, 5, 1.0)


@pytest.mark.slow
def test_training_improves_heldout_reconstruction_and_writes_eval(tmp_path, tiny_cfg, curated_store):
    urls = curated_store["urls"]
    base = train_vq(tiny_cfg, dict(FAST, max_steps=1, final_eval=True), urls, str(tmp_path / "short"))
    out = tmp_path / "long"
    res = train_vq(tiny_cfg, dict(FAST, max_steps=120, lr=3e-3, batch_size=8, final_eval=True, eval_every=60, eval_images=2), urls, str(out))
    for name in ("vq.safetensors", "vq.json", "vq-eval.json", "vq-recon.png", "vq-optim.safetensors", "vq-log.jsonl"):
        assert (out / name).exists(), name
    ev = json.loads((out / "vq-eval.json").read_text())
    assert ev["images"] == sum(is_heldout(s[0]) for s in curated_store["samples"]) > 0
    assert ev["resolution"] == [256, 256]
    assert 0 < ev["codebook_usage_pct"] <= 100 and 1 <= ev["perplexity"] <= tiny_cfg.codebook_size
    assert -1 <= ev["ssim"] <= 1
    assert ev["psnr_db"] > base["eval"]["psnr_db"] + 2.0
    assert len(res["history"]) == 2
    grid = Image.open(out / "vq-recon.png")
    assert grid.height == 2 * 256 + 4


def test_adversarial_term_trains_and_resumes_its_discriminator(tmp_path, tiny_cfg, curated_store, monkeypatch):
    """A preempted GAN run resumes with its discriminator and its optimiser: it ends with the same
    discriminator (and VQ weights) as an uninterrupted run; a fresh one, or fresh AdamW moments, would not."""
    from safetensors.torch import load as load_safetensors_bytes

    import tokenizer.vq.train as train_mod

    def disc(folder):
        return load_safetensors_bytes((folder / "vq-disc.safetensors").read_bytes())

    cfg = tiny_cfg.replace(adversarial_weight=0.1, adversarial_start_step=1, disc_channels=8, disc_layers=2)
    urls, train = curated_store["urls"], dict(FAST, max_steps=6, checkpoint_every=3)
    train_vq(cfg, train, urls, str(tmp_path / "straight"))

    real_iter = _preempt_at_batch(monkeypatch, 4)  # the job dies when it asks for the 5th batch
    with pytest.raises(KeyboardInterrupt):
        train_vq(cfg, train, urls, str(tmp_path / "resumed"))
    assert (tmp_path / "resumed" / "vq-disc-optim.safetensors").exists()
    at_3 = disc(tmp_path / "resumed")  # the checkpoint of step 3; step 4 was lost
    monkeypatch.setattr(train_mod, "iter_batches", real_iter)
    assert train_vq(cfg, train, urls, str(tmp_path / "resumed"))["step"] == 6
    resumed, straight = disc(tmp_path / "resumed"), disc(tmp_path / "straight")
    assert resumed.keys() == straight.keys() == at_3.keys()
    assert all(torch.equal(resumed[k], straight[k]) for k in straight)
    assert any(not torch.equal(resumed[k], at_3[k]) for k in at_3)  # steps 4-6 trained it further
    a, b = load_vq(str(tmp_path / "resumed")).state_dict(), load_vq(str(tmp_path / "straight")).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in b)


def test_tokenizer_package_does_not_import_beam():
    import subprocess
    import sys

    code = ("import sys, tokenizer.vq.train, tokenizer.vq.eval, tokenizer.cm3, tokenizer.vocab, tokenizer.text, "
            "tokenizer.shards; assert 'apache_beam' not in sys.modules, 'beam imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
