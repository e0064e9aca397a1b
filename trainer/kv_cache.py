"""Incremental decoding for `CM3LM`: a key/value cache, so sampling an image costs one token's
work per step instead of a forward over the whole prefix (1,024 steps over a ~2,000-token
prompt would otherwise be quadratic).

`CachedLM` runs the model's own modules (norms, projections, MLP, rotary tables) block by
block, in the order `CM3LM.forward` does; it keeps the rotated keys and the values of every
token fed so far. Logits equal a full forward over the same tokens (tested), so the cache is
an optimisation, never a different model. Positions are 0..T-1 over the whole prompt, as in a
stored sequence (one document id: the reader only restarts positions between packed sequences).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from trainer.model import CM3LM, apply_rope, rope_tables


class CachedLM:
    """Feed tokens left to right, get each step's logits; holds at most `max_len` tokens."""

    def __init__(self, model: CM3LM, max_len: int, batch_size: int = 1) -> None:
        if model.training:
            raise ValueError("CachedLM needs the model in eval mode (dropout would make the cache disagree)")
        cfg = model.cfg
        weight = model.embed.weight
        shape = (cfg.n_layers, batch_size, cfg.n_heads, max_len, cfg.head_dim)
        self.model = model
        self.max_len = max_len
        self.keys = torch.zeros(shape, dtype=weight.dtype, device=weight.device)
        self.values = torch.zeros_like(self.keys)
        self.length = 0

    @torch.inference_mode()
    def feed(self, tokens: torch.Tensor, all_logits: bool = False) -> torch.Tensor:
        """Append `tokens` [B, T]; return the logits after the last of them [B, V] (or after
        each of them, [B, T, V], with `all_logits`: a prompt over a large vocabulary would
        otherwise cost T x V floats nobody reads)."""
        model, cfg = self.model, self.model.cfg
        batch, count = tokens.shape
        start, end = self.length, self.length + count
        if end > self.max_len:
            raise ValueError(f"CachedLM holds {self.max_len} tokens; feeding {count} more after {start}")
        tokens = tokens.to(self.keys.device)
        positions = torch.arange(start, end, device=tokens.device).expand(batch, count)
        cos, sin = rope_tables(positions, cfg.head_dim, cfg.rope_theta)
        # new token i (absolute position start + i) sees the cached tokens and the new ones up to itself
        mask = None if count == 1 else torch.ones(count, end, dtype=torch.bool, device=tokens.device).tril(start)
        x = model.embed(tokens)
        for layer, block in enumerate(model.blocks):
            attn = block.attn
            q, k, v = attn.qkv(block.attn_norm(x)).unflatten(-1, (3, attn.n_heads, -1)).permute(2, 0, 3, 1, 4)
            self.keys[layer, :, :, start:end] = apply_rope(k, cos, sin)
            self.values[layer, :, :, start:end] = v
            y = F.scaled_dot_product_attention(apply_rope(q, cos, sin), self.keys[layer, :, :, :end],
                                               self.values[layer, :, :, :end], attn_mask=mask)
            x = x + attn.out(y.transpose(1, 2).flatten(2))
            x = x + block.mlp(block.mlp_norm(x))
        self.length = end
        x = model.norm(x if all_logits else x[:, -1])
        return F.linear(x, model.embed.weight) if model.head is None else model.head(x)
