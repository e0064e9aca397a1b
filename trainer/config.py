"""Frozen configs of the reference LM: model shapes by registry name (`LMConfig`, like
`tokenizer.vq.config`) and how to train (`TrainLMConfig`). No torch import here, so the run
config (`pipeline/config.py`, section `train_lm:`) can embed `TrainLMConfig` cheaply."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from typing import Any

@dataclass(frozen=True)
class LMConfig:
    """Shape of one model; saved as `lm.json` beside every checkpoint. `vocab_size` comes from
    the shard set's `vocab.json` when the model is built (`get_lm_config(name, vocab.size)`)."""

    name: str
    vocab_size: int
    n_layers: int
    d_model: int
    n_heads: int
    mlp_ratio: int = 4  # MLP hidden width = mlp_ratio * d_model
    max_seq_len: int = 4096  # what the model is meant for; RoPE itself has no hard limit
    rope_theta: float = 10_000.0
    tie_embeddings: bool = True  # output head = input embedding (saves vocab * d_model parameters)
    dropout: float = 0.0
    norm_eps: float = 1e-5
    init_std: float = 0.02

    def __post_init__(self) -> None:
        if self.vocab_size < 2 or self.n_layers < 1 or self.d_model < 1 or self.n_heads < 1:
            raise ValueError(f"LMConfig {self.name!r}: vocab_size >= 2, n_layers, d_model, n_heads >= 1")
        if self.d_model % self.n_heads or (self.d_model // self.n_heads) % 2:
            raise ValueError(f"LMConfig {self.name!r}: d_model {self.d_model} must split into {self.n_heads} "
                             "heads of an even width (RoPE rotates pairs)")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LMConfig {self.name!r}: dropout must be in [0, 1)")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def num_parameters(self) -> int:
        """Exact count of trainable parameters, without building the model."""
        d, v = self.d_model, self.vocab_size
        per_layer = 2 * d + 4 * d * d + 2 * self.mlp_ratio * d * d  # two norms, q/k/v/o, MLP (no biases)
        return v * d + self.n_layers * per_layer + d + (0 if self.tie_embeddings else v * d)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LMConfig":
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown LMConfig keys: {sorted(unknown)}")
        return cls(**d)


# vocab_size is a placeholder in the registry: get_lm_config fills it from vocab.json
_CONFIGS: dict[str, LMConfig] = {
    # Demo/tests: trains in minutes on 2 CPU cores on ~3,100-token demo sequences (~3,000 ids).
    "cpu-tiny": LMConfig(name="cpu-tiny", vocab_size=2, n_layers=4, d_model=128, n_heads=4, max_seq_len=4096),
    # CM3leon's smallest model (350M): 24 layers, 1,024 wide, 16 heads, 4,096-token sequences. For GPUs.
    "cm3leon-350m": LMConfig(name="cm3leon-350m", vocab_size=2, n_layers=24, d_model=1024, n_heads=16,
                             max_seq_len=4096),
}


def lm_config_names() -> list[str]:
    return sorted(_CONFIGS)


def get_lm_config(name: str, vocab_size: int) -> LMConfig:
    """The registered config `name` ("cpu-tiny", "cm3leon-350m") for a vocabulary of `vocab_size` ids."""
    try:
        base = _CONFIGS[name]
    except KeyError:
        raise KeyError(f"unknown LM config {name!r}; known: {lm_config_names()}") from None
    return dataclasses.replace(base, vocab_size=int(vocab_size))



@dataclass(frozen=True)
class TrainLMConfig:
    """How to train the reference LM (its shape is an `LMConfig` name). The budget is
    `max_steps` and/or `max_minutes`, whichever ends first; the LR schedule runs over
    `decay_steps` (default `max_steps`), so stopping early and resuming is the same run."""

    model: str = "cpu-tiny"  # trainer.config registry name: cpu-tiny | cm3leon-350m
    global_batch_size: int = 8  # sequences per optimiser step, over all ranks
    micro_batch_size: int | None = None  # rows per forward/backward (gradient accumulation); None: a rank's whole batch
    lr: float = 1e-3
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1  # cosine decay to lr * min_lr_ratio
    decay_steps: int | None = None  # length of the cosine; None: max_steps (or max_minutes when no step budget)
    weight_decay: float = 0.1  # on matrices and embeddings, not on norm gains
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0  # max global gradient norm; 0 disables
    max_steps: int | None = 200
    max_minutes: float | None = None
    eval_every: int = 50  # steps; 0 disables periodic eval (a final eval still runs)
    eval_batches: int = 4  # global batches of the held-out split per eval (0: all of it)
    checkpoint_every: int = 50  # steps; a checkpoint is also written at the end
    log_every: int = 1  # steps per train-log.jsonl row
    seed: int = 0  # init, data order, CM3 masking
    pack: bool = False  # pack whole sequences into rows of seq_len (document-masked attention)
    seq_len: int | None = None  # row length; needed when pack, optional padding length otherwise
    mask: bool = True  # CM3 masking in the reader (off for SFT shard sets, normally)
    num_workers: int = 0  # DataLoader workers per rank
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | bf16 | fp32
    num_threads: int | None = None  # torch intra-op threads; None leaves torch's default
    resume: bool = True  # continue from the checkpoint in the output folder when there is one
    progress: bool = True  # tqdm bar (rank 0)

    def __post_init__(self) -> None:
        if self.model not in _CONFIGS:
            raise ValueError(f"unknown LM config {self.model!r}; known: {lm_config_names()}")
        if self.max_steps is None and self.max_minutes is None:
            raise ValueError("set max_steps and/or max_minutes")
        if self.max_steps is not None and self.max_steps < 0 or self.max_minutes is not None and self.max_minutes <= 0:
            raise ValueError("max_steps must be >= 0 and max_minutes > 0")
        if self.global_batch_size < 1 or (self.micro_batch_size is not None and self.micro_batch_size < 1):
            raise ValueError("global_batch_size and micro_batch_size must be >= 1")
        if self.lr <= 0 or not 0.0 <= self.min_lr_ratio <= 1.0 or self.warmup_steps < 0 or self.weight_decay < 0:
            raise ValueError("need lr > 0, 0 <= min_lr_ratio <= 1, warmup_steps >= 0, weight_decay >= 0")
        if self.decay_steps is not None and self.decay_steps < 1:
            raise ValueError("decay_steps must be >= 1")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas!r}")
        if self.grad_clip < 0 or min(self.eval_every, self.eval_batches, self.checkpoint_every) < 0 \
                or self.log_every < 1:
            raise ValueError("grad_clip, eval_every, eval_batches, checkpoint_every must be >= 0, log_every >= 1")
        if self.pack and not self.seq_len:
            raise ValueError("pack needs seq_len")
        if self.seq_len is not None and self.seq_len < 2:
            raise ValueError("seq_len must be >= 2")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto|cpu|cuda, got {self.device!r}")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"precision must be auto|bf16|fp32, got {self.precision!r}")
        if self.num_workers < 0 or (self.num_threads is not None and self.num_threads < 1):
            raise ValueError("num_workers must be >= 0 and num_threads >= 1")

    @property
    def schedule_steps(self) -> int | None:
        """Steps the cosine runs over (None: it runs over max_minutes of wall-clock time)."""
        return self.decay_steps or self.max_steps

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainLMConfig":
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown TrainLMConfig keys: {sorted(unknown)}")
        d = dict(d)
        if "betas" in d:
            d["betas"] = tuple(d["betas"])
        return cls(**d)


# command line (shared by `python -m trainer.train` and `curate train-lm`) ---------------------
def add_train_lm_flags(parser: argparse.ArgumentParser) -> None:
    """The trainer flags shared by `python -m trainer.train` and `curate train-lm` (each one
    overrides the TrainLMConfig field of the same name; unset flags keep the config's value)."""
    add = parser.add_argument
    add("--model", help="LM config: cpu-tiny (CPU demo) | cm3leon-350m (GPUs)")
    add("--max-steps", type=int, help="stop after this many optimiser steps (also the LR schedule length)")
    add("--max-minutes", type=float, help="stop after this much wall-clock time (whichever budget ends first)")
    add("--decay-steps", type=int, help="LR cosine length; default --max-steps")
    add("--global-batch-size", type=int, help="sequences per optimiser step, over all ranks")
    add("--micro-batch-size", type=int, help="rows per forward/backward (gradient accumulation)")
    add("--lr", type=float, help="peak learning rate (AdamW)")
    add("--warmup-steps", type=int, help="linear warmup steps before the cosine decay")
    add("--seq-len", type=int, help="row length (needed with --pack)")
    add("--pack", action="store_true", default=None, help="pack whole sequences into rows of --seq-len")
    add("--no-mask", dest="mask", action="store_false", default=None, help="no CM3 masking (e.g. SFT shards)")
    add("--eval-every", type=int, help="steps between held-out evaluations (0: only at the end)")
    add("--eval-batches", type=int, help="held-out global batches per evaluation (0: all)")
    add("--checkpoint-every", type=int, help="steps between checkpoints (one is always written at the end)")
    add("--seed", type=int, help="initial weights, data order and CM3 masking")
    add("--num-workers", type=int, help="DataLoader workers per rank")
    add("--device", choices=("auto", "cpu", "cuda"))
    add("--precision", choices=("auto", "bf16", "fp32"), help="auto: bf16 autocast on CUDA, fp32 on CPU")
    add("--threads", dest="num_threads", type=int, help="torch intra-op threads")
    add("--no-resume", dest="resume", action="store_false", default=None,
        help="refuse to start when the output folder holds a checkpoint")
    add("--no-progress", dest="progress", action="store_false", default=None, help="no tqdm bar")


def train_lm_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The TrainLMConfig fields the user set on the command line."""
    names = {f.name for f in dataclasses.fields(TrainLMConfig)}
    return {k: v for k, v in vars(args).items() if k in names and v is not None}


@dataclass(frozen=True)
class SampleConfig:
    """How to decode. `temperature` 0 is greedy; `top_p` 1.0 samples from every allowed id;
    `cfg_scale` 1.0 turns guidance off (the unconditional pass is skipped)."""

    temperature: float = 1.0
    top_p: float = 0.9
    cfg_scale: float = 3.0
    max_caption_tokens: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError("top_p must be in (0, 1]")
        if self.cfg_scale < 0:
            raise ValueError("cfg_scale must be >= 0")
        if self.max_caption_tokens < 1:
            raise ValueError("max_caption_tokens must be >= 1")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
