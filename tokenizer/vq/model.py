"""VQGAN-family convolutional autoencoder with codes in the middle, plus checkpoint load/save.

Fully convolutional (no attention, no absolute positions), so one model trains on random crops
and encodes full 256 px images. Pixels enter as uint8 [B, H, W, 3] and leave the same way, so
callers never need to know the internal [-1, 1] NCHW convention.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import fsspec
import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes
from torch import nn

from tokenizer.shards import write_bytes_atomic
from tokenizer.vq.config import VQConfig
from tokenizer.vq.quantizer import FactorizedQuantizer, QuantizerOutput

log = logging.getLogger(__name__)


class ResBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, groups: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class Encoder(nn.Module):
    def __init__(self, cfg: VQConfig) -> None:
        super().__init__()
        chans = [cfg.base_channels * m for m in cfg.channel_mult]
        p = cfg.patch_size
        self.stem = nn.PixelUnshuffle(p) if p > 1 else nn.Identity()
        self.conv_in = nn.Conv2d(cfg.in_channels * p * p, chans[0], 3, padding=1)
        layers: list[nn.Module] = []
        ch = chans[0]
        for level, out_ch in enumerate(chans):
            for _ in range(cfg.num_res_blocks):
                layers.append(ResBlock(ch, out_ch, cfg.norm_groups))
                ch = out_ch
            if level < len(chans) - 1:
                layers.append(nn.Conv2d(ch, ch, 4, stride=2, padding=1))
        layers.append(ResBlock(ch, ch, cfg.norm_groups))
        self.body = nn.Sequential(*layers)
        self.norm_out = nn.GroupNorm(cfg.norm_groups, ch)
        self.conv_out = nn.Conv2d(ch, cfg.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_out(F.silu(self.norm_out(self.body(self.conv_in(self.stem(x))))))


class Upsample(nn.Module):
    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Decoder(nn.Module):
    def __init__(self, cfg: VQConfig) -> None:
        super().__init__()
        chans = [cfg.base_channels * m for m in cfg.channel_mult][::-1]
        ch = chans[0]
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch, 3, padding=1)
        layers: list[nn.Module] = [ResBlock(ch, ch, cfg.norm_groups)]
        for level, out_ch in enumerate(chans):
            for _ in range(cfg.num_res_blocks):
                layers.append(ResBlock(ch, out_ch, cfg.norm_groups))
                ch = out_ch
            if level < len(chans) - 1:
                layers.append(Upsample(ch))
        self.body = nn.Sequential(*layers)
        self.norm_out = nn.GroupNorm(cfg.norm_groups, ch)
        p = cfg.patch_size
        self.conv_out = nn.Conv2d(ch, cfg.in_channels * p * p, 3, padding=1)
        self.head = nn.PixelShuffle(p) if p > 1 else nn.Identity()

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv_out(F.silu(self.norm_out(self.body(self.conv_in(z))))))


def to_model_input(images: torch.Tensor | np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    """uint8 [B, H, W, 3] -> float [B, 3, H, W] in [-1, 1]."""
    t = torch.as_tensor(images)
    if t.dtype != torch.uint8 or t.ndim != 4 or t.shape[-1] != 3:
        raise ValueError(f"expected uint8 [B, H, W, 3], got {t.dtype} {tuple(t.shape)}")
    return t.to(device).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """float [B, 3, H, W] in [-1, 1] -> uint8 [B, H, W, 3] (rounded, clamped)."""
    return x.float().add(1.0).mul(127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


class VQModel(nn.Module):
    """Encoder -> factorised quantizer -> decoder. `encode_codes`/`decode_codes` are the public API."""

    def __init__(self, cfg: VQConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.quantizer = FactorizedQuantizer(
            cfg.latent_channels,
            cfg.codebook_size,
            cfg.code_dim,
            l2_normalize=cfg.l2_normalize,
            commitment_weight=cfg.commitment_weight,
            codebook_weight=cfg.codebook_weight,
            usage_decay=cfg.usage_decay,
            dead_code_threshold=cfg.dead_code_threshold,
        )
        self.decoder = Decoder(cfg)

    @property
    def device(self) -> torch.device:
        return self.quantizer.codebook.device

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, QuantizerOutput]:
        """x: float [B, 3, H, W] in [-1, 1] -> (reconstruction, quantizer output)."""
        q = self.quantizer(self.encoder(x))
        return self.decoder(q.quantized), q

    def _check_hw(self, h: int, w: int) -> None:
        f = self.cfg.downsample_factor
        if h % f or w % f:
            raise ValueError(f"image size {h}x{w} must be divisible by the downsampling factor {f}")

    @torch.inference_mode()
    def encode_codes(self, images: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
        """uint8 [B, H, W, 3] -> int64 codes [B, H/f, W/f]; numpy in gives numpy out."""
        as_numpy = isinstance(images, np.ndarray)
        x = to_model_input(images, self.device)
        self._check_hw(x.shape[2], x.shape[3])
        vec = self.quantizer.project(self.encoder(x))
        b, h, w, d = vec.shape
        codes = self.quantizer.lookup(vec.reshape(-1, d)).reshape(b, h, w)
        return codes.cpu().numpy() if as_numpy else codes

    @torch.inference_mode()
    def decode_codes(self, codes: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
        """int codes [B, h, w] -> uint8 images [B, h*f, w*f, 3]; numpy in gives numpy out."""
        as_numpy = isinstance(codes, np.ndarray)
        c = torch.as_tensor(np.asarray(codes, dtype=np.int64) if as_numpy else codes).long().to(self.device)
        if c.ndim != 3:
            raise ValueError(f"expected codes [B, h, w], got {tuple(c.shape)}")
        if int(c.min()) < 0 or int(c.max()) >= self.cfg.codebook_size:
            raise ValueError(f"codes outside [0, {self.cfg.codebook_size})")
        out = to_uint8(self.decoder(self.quantizer.codes_to_latent(c)))
        return out.cpu().numpy() if as_numpy else out

    @torch.inference_mode()
    def reconstruct(self, images: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
        """uint8 -> uint8 round trip through the codes (what evaluation measures)."""
        return self.decode_codes(self.encode_codes(images))


def _json_path(weights_path: str) -> str:
    return weights_path[: -len(".safetensors")] + ".json" if weights_path.endswith(".safetensors") else weights_path + ".json"


def _resolve_weights_path(path_or_url: str) -> str:
    """Accept the .safetensors file itself or the folder holding `vq.safetensors`."""
    if path_or_url.endswith(".safetensors"):
        return path_or_url
    return path_or_url.rstrip("/") + "/vq.safetensors"


def save_vq(model: VQModel, path_or_url: str, extra_meta: dict[str, Any] | None = None) -> str:
    """Write `<name>.safetensors` + `<name>.json` (the config) atomically; returns the weights path."""
    weights = _resolve_weights_path(path_or_url)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    meta = {"format": "cm3curate-vq/1", "config": model.cfg.to_dict(), **(extra_meta or {})}
    write_bytes_atomic(weights, save_safetensors_bytes(state, metadata={"format": "cm3curate-vq/1"}))
    write_bytes_atomic(_json_path(weights), json.dumps(meta, indent=2, sort_keys=True).encode())
    return weights


def read_vq_meta(path_or_url: str) -> dict[str, Any]:
    with fsspec.open(_json_path(_resolve_weights_path(path_or_url)), "rb") as f:
        return json.loads(f.read())


def load_vq(path_or_url: str, device: str | torch.device = "cpu") -> VQModel:
    """Load a checkpoint (safetensors + json beside it, any fsspec URL), in eval mode."""
    weights = _resolve_weights_path(path_or_url)
    cfg = VQConfig.from_dict(read_vq_meta(weights)["config"])
    with fsspec.open(weights, "rb") as f:
        state = load_safetensors_bytes(f.read())
    model = VQModel(cfg)
    model.load_state_dict(state)
    log.info("loaded VQ %s (%s codes, f%d) from %s", cfg.name, cfg.codebook_size, cfg.downsample_factor, weights)
    return model.to(device).eval()
