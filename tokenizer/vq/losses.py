"""Training losses: reconstruction (L1 + L2) and the quantizer's codebook/commitment term always;
perceptual (VGG16 features) and adversarial (PatchGAN, hinge) only when their weights are set.

The perceptual term needs VGG16 weights that the user supplies as a local/fsspec state dict:
nothing is ever downloaded, so by default (weight 0) it is simply not built.
"""

from __future__ import annotations

import logging

import fsspec
import torch
import torch.nn.functional as F
from torch import nn

from tokenizer.vq.config import VQConfig

log = logging.getLogger(__name__)


def reconstruction_loss(recon: torch.Tensor, target: torch.Tensor, l1_weight: float, l2_weight: float) -> torch.Tensor:
    diff = recon.float() - target.float()
    return l1_weight * diff.abs().mean() + l2_weight * diff.pow(2).mean()


class VGGPerceptual(nn.Module):
    """Feature-space L2 on VGG16 relu1_2..relu4_3 (LPIPS without its learned linear heads)."""

    def __init__(self, weights_path: str) -> None:
        super().__init__()
        from torchvision.models import vgg16  # local import: only needed when the term is on

        with fsspec.open(weights_path, "rb") as f:
            state = torch.load(f, map_location="cpu", weights_only=True)
        net = vgg16()
        net.load_state_dict(state)
        self.slices = nn.ModuleList([net.features[a:b] for a, b in ((0, 4), (4, 9), (9, 16), (16, 23))]).eval()
        for p in self.parameters():
            p.requires_grad_(False)
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406])[None, :, None, None])
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225])[None, :, None, None])

    def forward(self, recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        x = ((recon.float() + 1) / 2 - self.mean) / self.std
        y = ((target.float() + 1) / 2 - self.mean) / self.std
        loss = x.new_zeros(())
        for s in self.slices:
            x, y = s(x), s(y)
            loss = loss + F.mse_loss(F.normalize(x, dim=1), F.normalize(y, dim=1))
        return loss


class PatchDiscriminator(nn.Module):
    """PatchGAN (pix2pix/VQGAN): one real/fake logit per receptive field."""

    def __init__(self, channels: int = 64, layers: int = 3, in_channels: int = 3) -> None:
        super().__init__()
        mods: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, 2, 1), nn.LeakyReLU(0.2)]
        ch = channels
        for i in range(1, layers):
            out = channels * min(2**i, 8)
            mods += [nn.Conv2d(ch, out, 4, 2, 1), nn.GroupNorm(min(32, out // 4), out), nn.LeakyReLU(0.2)]
            ch = out
        mods += [nn.Conv2d(ch, 1, 4, 1, 1)]
        self.net = nn.Sequential(*mods)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def hinge_d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean())


def build_perceptual(cfg: VQConfig) -> VGGPerceptual | None:
    if cfg.perceptual_weight <= 0:
        return None
    log.info("perceptual loss on (weight %.3g) from %s", cfg.perceptual_weight, cfg.perceptual_weights_path)
    return VGGPerceptual(cfg.perceptual_weights_path)  # type: ignore[arg-type]


def build_discriminator(cfg: VQConfig) -> PatchDiscriminator | None:
    if cfg.adversarial_weight <= 0:
        return None
    return PatchDiscriminator(cfg.disc_channels, cfg.disc_layers, cfg.in_channels)
