"""Vector quantizer that keeps its codebook alive.

Plain VQ collapses onto a few per cent of its codes because unused codes get no gradient. We
use the two fixes that work best together in practice (ViT-VQGAN, Yu et al. 2022; "improved
VQGAN"): look codes up in a low-dimensional space (`code_dim`, e.g. 8) on the unit sphere, so
encodings and codes share one scale and nearest-neighbour search is well conditioned, and
restart dead codes (EMA usage below a threshold) from current encoder outputs. The first
training batch initialises the codebook from encoder outputs (a one-step k-means seeding).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)


@dataclass
class QuantizerOutput:
    quantized: torch.Tensor  # [B, C, h, w], straight-through, in the latent width
    codes: torch.Tensor  # [B, h, w] int64
    loss: torch.Tensor  # codebook + commitment
    perplexity: torch.Tensor  # of this batch's code histogram
    usage: torch.Tensor  # fraction of codes used in this batch
    vectors: torch.Tensor  # [N, code_dim] detached normalised encodings (dead-code restart samples these)


class FactorizedQuantizer(nn.Module):
    """Projects latents to `code_dim`, snaps them to the nearest (l2-normalised) code, projects back."""

    def __init__(
        self,
        latent_channels: int,
        codebook_size: int,
        code_dim: int,
        l2_normalize: bool = True,
        commitment_weight: float = 0.25,
        codebook_weight: float = 1.0,
        usage_decay: float = 0.99,
        dead_code_threshold: float = 1e-3,
    ) -> None:
        super().__init__()
        self.codebook_size = codebook_size
        self.code_dim = code_dim
        self.l2_normalize = l2_normalize
        self.commitment_weight = commitment_weight
        self.codebook_weight = codebook_weight
        self.usage_decay = usage_decay
        self.dead_code_threshold = dead_code_threshold
        self.proj_in = nn.Conv2d(latent_channels, code_dim, 1)
        self.proj_out = nn.Conv2d(code_dim, latent_channels, 1)
        self.codebook = nn.Parameter(torch.randn(codebook_size, code_dim) / code_dim**0.5)
        # Buffers are saved in the checkpoint, so a resumed run restarts the same codes.
        self.register_buffer("usage_ema", torch.ones(codebook_size))  # start "alive"
        self.register_buffer("initialised", torch.zeros((), dtype=torch.bool))

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=-1) if self.l2_normalize else x

    def embed(self) -> torch.Tensor:
        return self._norm(self.codebook)

    def project(self, z: torch.Tensor) -> torch.Tensor:
        """Latents [B, C, h, w] -> normalised low-dim vectors [B, h, w, code_dim]."""
        return self._norm(self.proj_in(z).permute(0, 2, 3, 1).float())

    def lookup(self, flat: torch.Tensor) -> torch.Tensor:
        """Nearest code per row of `flat` [N, code_dim] (max cosine when normalised)."""
        embed = self.embed()
        if self.l2_normalize:
            return (flat @ embed.t()).argmax(dim=1)
        dist = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ embed.t() + embed.pow(2).sum(1)[None]
        return dist.argmin(dim=1)

    def codes_to_latent(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes [B, h, w] -> latent [B, C, h, w] for the decoder."""
        vec = self.embed()[codes]  # [B, h, w, d]
        return self.proj_out(vec.permute(0, 3, 1, 2).to(self.proj_out.weight.dtype))

    @torch.no_grad()
    def init_from(self, flat: torch.Tensor, generator: torch.Generator | None = None) -> None:
        """Seed the codebook with encoder outputs so every code starts inside the data."""
        idx = torch.randint(0, flat.shape[0], (self.codebook_size,), generator=generator, device=flat.device)
        noise = torch.randn(self.codebook_size, self.code_dim, generator=generator, device=flat.device)
        self.codebook.data.copy_(flat[idx] + 0.01 * noise)
        self.usage_ema.fill_(1.0)
        self.initialised.fill_(True)

    @torch.no_grad()
    def restart_dead_codes(self, flat: torch.Tensor, generator: torch.Generator | None = None) -> int:
        """Move codes whose EMA usage fell below the threshold onto random current encodings."""
        dead = (self.usage_ema < self.dead_code_threshold).nonzero().flatten()
        if dead.numel() == 0:
            return 0
        idx = torch.randint(0, flat.shape[0], (dead.numel(),), generator=generator, device=flat.device)
        noise = torch.randn(dead.numel(), self.code_dim, generator=generator, device=flat.device)
        self.codebook.data[dead] = flat[idx] + 0.01 * noise
        self.usage_ema[dead] = 1.0
        return int(dead.numel())

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        vec = self.project(z)  # [B, h, w, d], float32
        b, h, w, d = vec.shape
        flat = vec.reshape(-1, d)
        if self.training and not bool(self.initialised):
            self.init_from(flat.detach())
        codes = self.lookup(flat.detach())
        q = self.embed()[codes]
        loss = self.codebook_weight * F.mse_loss(q, flat.detach()) + self.commitment_weight * F.mse_loss(
            flat, q.detach()
        )
        q_st = flat + (q - flat).detach()  # straight-through estimator
        counts = torch.bincount(codes, minlength=self.codebook_size).float()
        if self.training:
            with torch.no_grad():
                self.usage_ema.mul_(self.usage_decay).add_(counts / max(1, flat.shape[0]) * self.codebook_size, alpha=1 - self.usage_decay)
        probs = counts / counts.sum()
        perplexity = torch.exp(-(probs * torch.log(probs.clamp_min(1e-10))).sum())
        usage = (counts > 0).float().mean()
        q_st = q_st.reshape(b, h, w, d).permute(0, 3, 1, 2).to(self.proj_out.weight.dtype)
        return QuantizerOutput(
            quantized=self.proj_out(q_st),
            codes=codes.reshape(b, h, w),
            loss=loss,
            perplexity=perplexity,
            usage=usage,
            vectors=flat.detach(),
        )
