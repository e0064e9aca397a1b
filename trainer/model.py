"""The reference CM3 language model: a decoder-only transformer over the joint vocabulary.

nanoGPT-sized on purpose: pre-norm blocks (RMSNorm), rotary positions driven by `position_ids`
(so positions restart at every packed document), causal attention through
`torch.nn.functional.scaled_dot_product_attention`, a GELU MLP, no dropout by default. Configs
are chosen by registry name (`trainer.config`, re-exported here); a checkpoint is
`lm.safetensors` with its config in `lm.json` beside it, loadable from any fsspec URL.
"""

from __future__ import annotations

import json
import logging
import math
from typing import Any

import fsspec
import torch
import torch.nn.functional as F
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes
from torch import nn

from tokenizer.shards import write_bytes_atomic
from trainer.config import LMConfig, get_lm_config, lm_config_names
from trainer.collate import document_attention_mask

__all__ = ["CM3LM", "LMConfig", "get_lm_config", "lm_config_names", "load_lm", "read_lm_meta", "save_lm"]

log = logging.getLogger(__name__)

FORMAT = "cm3curate-lm/1"
WEIGHTS = "lm.safetensors"
CONFIG = "lm.json"


# rotary positions ----------------------------------------------------------------------------
def rope_tables(position_ids: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [B, 1, T, head_dim / 2] (float32) for the given positions: one table per row, so
    a packed row whose positions restart at 0 per document rotates each document as if alone."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, device=position_ids.device, dtype=torch.float32) / head_dim)
    angles = position_ids.to(torch.float32)[:, None, :, None] * inv_freq
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[2i], x[2i+1]) of x [B, H, T, head_dim] by the position angles."""
    x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    rotated = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)
    return rotated.type_as(x)


# blocks --------------------------------------------------------------------------------------
class Attention(nn.Module):
    def __init__(self, cfg: LMConfig) -> None:
        super().__init__()
        self.n_heads, self.dropout = cfg.n_heads, cfg.dropout
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.out = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        q, k, v = self.qkv(x).unflatten(-1, (3, self.n_heads, -1)).permute(2, 0, 3, 1, 4)  # 3 x [B, H, T, hd]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.out(y.transpose(1, 2).flatten(2))


class MLP(nn.Module):
    def __init__(self, cfg: LMConfig) -> None:
        super().__init__()
        self.up = nn.Linear(cfg.d_model, cfg.mlp_ratio * cfg.d_model, bias=False)
        self.down = nn.Linear(cfg.mlp_ratio * cfg.d_model, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(x)))


class Block(nn.Module):
    """Pre-norm: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: LMConfig) -> None:
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mlp = MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.drop(self.attn(self.attn_norm(x), cos, sin, mask))
        return x + self.drop(self.mlp(self.mlp_norm(x)))


class CM3LM(nn.Module):
    """tokens [B, T] (+ position_ids, document_ids from the reader's `Batch`) -> logits [B, T, V].

    Without `document_ids` attention is plain causal; with them (packed rows) it is causal inside
    each document (`trainer.collate.document_attention_mask`), so packed documents never see each
    other. Without `position_ids` positions are 0..T-1.
    """

    def __init__(self, cfg: LMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        # tied: the head is the embedding matrix itself (F.linear below), so checkpoints hold it once
        self.head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-2 init: N(0, 0.02), residual output projections scaled by 1/sqrt(2 * layers)."""
        std = self.cfg.init_std
        for name, p in self.named_parameters():
            if p.dim() < 2:
                continue  # norm gains stay 1
            residual = name.endswith(("attn.out.weight", "mlp.down.weight"))
            nn.init.normal_(p, mean=0.0, std=std / math.sqrt(2 * self.cfg.n_layers) if residual else std)

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    def forward(self, tokens: torch.Tensor, position_ids: torch.Tensor | None = None,
                document_ids: torch.Tensor | None = None) -> torch.Tensor:
        if position_ids is None:
            position_ids = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
        cos, sin = rope_tables(position_ids, self.cfg.head_dim, self.cfg.rope_theta)
        mask = None if document_ids is None else document_attention_mask(document_ids)
        x = self.drop(self.embed(tokens))
        for block in self.blocks:
            x = block(x, cos, sin, mask)
        x = self.norm(x)
        return F.linear(x, self.embed.weight) if self.head is None else self.head(x)


# checkpoints ---------------------------------------------------------------------------------
def _weights_url(path_or_dir: str) -> str:
    path = path_or_dir.rstrip("/")
    return path if path.endswith(".safetensors") else f"{path}/{WEIGHTS}"


def _config_url(weights: str) -> str:
    return weights[: -len(".safetensors")] + ".json"


def save_lm(model: CM3LM, out_dir: str, extra_meta: dict[str, Any] | None = None) -> str:
    """Write `out_dir/lm.safetensors` + `out_dir/lm.json` (the config) atomically; returns the
    weights URL. `out_dir` may also name the `.safetensors` file itself."""
    weights = _weights_url(out_dir)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    meta = {"format": FORMAT, "config": model.cfg.to_dict(), **(extra_meta or {})}
    write_bytes_atomic(weights, save_safetensors_bytes(state, metadata={"format": FORMAT}))
    write_bytes_atomic(_config_url(weights), json.dumps(meta, indent=2, sort_keys=True).encode())
    return weights


def read_lm_meta(path_or_dir: str) -> dict[str, Any]:
    """The `lm.json` beside a checkpoint: config and whatever the trainer added (step, ...)."""
    with fsspec.open(_config_url(_weights_url(path_or_dir)), "rb") as handle:
        return json.loads(handle.read())


def load_lm(path_or_dir: str, device: str | torch.device = "cpu") -> CM3LM:
    """A checkpoint folder (or its `lm.safetensors`), any fsspec URL -> the model, in eval mode."""
    weights = _weights_url(path_or_dir)
    cfg = LMConfig.from_dict(read_lm_meta(weights)["config"])
    with fsspec.open(weights, "rb") as handle:
        state = load_safetensors_bytes(handle.read())
    model = CM3LM(cfg)
    model.load_state_dict(state)
    log.info("loaded LM %s (%d layers, d %d, %d ids) from %s", cfg.name, cfg.n_layers, cfg.d_model, cfg.vocab_size,
             weights)
    return model.to(device).eval()
