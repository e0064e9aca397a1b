"""Frozen configs for the VQ tokenizer, chosen by registry name (like open_clip's model configs)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

from tokenizer.shards import HELDOUT_PERCENT


@dataclass(frozen=True)
class VQConfig:
    """Geometry and loss weights of one VQ tokenizer; saved as `vq.json` beside every checkpoint."""

    name: str
    resolution: int = 256  # the image size the tokenizer is meant for (codes grid = resolution // factor)
    in_channels: int = 3
    patch_size: int = 1  # space-to-depth stem / depth-to-space head: no convolution at full resolution
    base_channels: int = 128
    channel_mult: tuple[int, ...] = (1, 1, 2, 4)  # len(channel_mult) - 1 stride-2 downsamplings
    num_res_blocks: int = 2
    norm_groups: int = 32
    latent_channels: int = 256  # encoder output width before the low-dimensional code projection
    codebook_size: int = 8192
    code_dim: int = 8  # low-dimensional lookup space (ViT-VQGAN style factorised codes)
    l2_normalize: bool = True  # cosine lookup on the unit sphere: keeps codes and encodings on one scale
    commitment_weight: float = 0.25
    codebook_weight: float = 1.0
    usage_decay: float = 0.99  # EMA of per-code usage (1.0 = used at the uniform rate)
    dead_code_threshold: float = 0.03  # usage EMA below which a code counts as dead and is restarted
    restart_every: int = 20  # steps between dead-code restarts (0 disables)
    # loss weights; perceptual and adversarial terms are off unless their weight is > 0
    l1_weight: float = 1.0
    l2_weight: float = 1.0
    perceptual_weight: float = 0.0
    perceptual_weights_path: str | None = None  # local/fsspec torchvision VGG16 state dict; never downloaded
    adversarial_weight: float = 0.0
    adversarial_start_step: int = 10_000
    disc_channels: int = 64
    disc_layers: int = 3

    def __post_init__(self) -> None:
        if len(self.channel_mult) < 1:
            raise ValueError("channel_mult needs at least one level")
        if self.resolution % self.downsample_factor:
            raise ValueError(f"resolution {self.resolution} not divisible by factor {self.downsample_factor}")
        if self.codebook_size < 2 or self.code_dim < 1:
            raise ValueError("codebook_size must be >= 2 and code_dim >= 1")
        for ch in {self.base_channels * m for m in self.channel_mult} | {self.latent_channels}:
            if ch % self.norm_groups:
                raise ValueError(f"channel count {ch} not divisible by norm_groups {self.norm_groups}")
        if self.perceptual_weight > 0 and not self.perceptual_weights_path:
            raise ValueError("perceptual_weight > 0 needs perceptual_weights_path (no downloads)")

    @property
    def downsample_factor(self) -> int:
        return self.patch_size * 2 ** (len(self.channel_mult) - 1)

    @property
    def grid_size(self) -> int:
        """Codes per side at `resolution` (32 for cm3leon-256: 1,024 codes per image)."""
        return self.resolution // self.downsample_factor

    def replace(self, **changes: Any) -> "VQConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["channel_mult"] = list(self.channel_mult)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "VQConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown VQConfig keys: {sorted(unknown)}")
        d = dict(d)
        if "channel_mult" in d:
            d["channel_mult"] = tuple(d["channel_mult"])
        return cls(**d)


_CONFIGS: dict[str, VQConfig] = {
    # CM3leon / Make-A-Scene geometry: 256 px, f8 -> 32x32 = 1,024 codes from 8,192. For GPUs.
    "cm3leon-256": VQConfig(
        name="cm3leon-256",
        resolution=256,
        base_channels=128,
        channel_mult=(1, 1, 2, 4),
        num_res_blocks=2,
        norm_groups=32,
        latent_channels=256,
        codebook_size=8192,
        code_dim=8,
        adversarial_start_step=20_000,
    ),
    # Demo/tests: trains on 2 shared CPU cores in minutes. f4 (64x64 codes at 256 px) with 1,024
    # codes keeps 10 bits per 4x4 patch (0.63 bit/pixel), which a tiny model needs to clear PSNR
    # 23 dB in 15 minutes; f8 at this size stays near 20 dB. A 4x4 space-to-depth stem means no
    # convolution runs at full resolution (5-8x cheaper per step than a conv stem, and it learned
    # faster per CPU-minute in our trials, docs/tokenizer.md). Fully convolutional: trains on
    # crops, encodes 256 px.
    "cpu-small": VQConfig(
        name="cpu-small",
        resolution=256,
        patch_size=4,
        base_channels=96,
        channel_mult=(1,),
        num_res_blocks=2,
        norm_groups=8,
        latent_channels=96,
        codebook_size=1024,
        code_dim=8,
        usage_decay=0.95,  # short runs: a code unused for ~60 steps is restarted
        dead_code_threshold=0.05,
        restart_every=10,
    ),
}


def config_names() -> list[str]:
    return sorted(_CONFIGS)


def get_config(name: str) -> VQConfig:
    """Look up a registered config by name ("cm3leon-256", "cpu-small")."""
    try:
        return _CONFIGS[name]
    except KeyError:
        raise KeyError(f"unknown VQ config {name!r}; known: {config_names()}") from None


@dataclass(frozen=True)
class TrainVQConfig:
    """How to train (the model geometry lives in VQConfig). Budgets: whichever of steps/minutes ends first."""

    batch_size: int = 16
    crop_size: int = 64
    crops_per_image: int = 4  # crops cut from each decoded image (decode once, augment several times)
    shuffle_buffer: int = 512  # crops held for shuffling; bounds memory regardless of corpus size
    hflip: bool = True
    lr: float = 2e-3
    min_lr_ratio: float = 0.05  # cosine decay to lr * min_lr_ratio at the end of the budget
    warmup_steps: int = 50
    weight_decay: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.99)
    grad_clip: float = 1.0
    max_steps: int | None = 1000
    max_minutes: float | None = None
    eval_every: int = 250
    eval_images: int = 8  # held-out images for the periodic eval (the final eval uses all)
    checkpoint_every: int = 250
    eval_batch_size: int = 8
    grid_images: int = 8
    heldout_percent: int = HELDOUT_PERCENT
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | bf16 | fp32
    num_threads: int | None = None  # torch intra-op threads; None leaves torch's default
    progress: bool = True
    final_eval: bool = True

    def __post_init__(self) -> None:
        if self.max_steps is None and self.max_minutes is None:
            raise ValueError("set max_steps and/or max_minutes")
        if self.batch_size < 1 or self.crop_size < 8 or self.crops_per_image < 1:
            raise ValueError("batch_size >= 1, crop_size >= 8, crops_per_image >= 1")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"precision must be auto|bf16|fp32, got {self.precision!r}")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d
