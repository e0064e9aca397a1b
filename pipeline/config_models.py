"""The config sections of the steps that train or apply models: the CLIP and its training,
alignment, the VQ and text tokenizers, the token shards and the SFT set. pipeline/config.py
composes them (with the curation sections) into `RunConfig`; docs/config.md lists every key."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

from pipeline.errors import ConfigError
from tokenizer import sft as sft_format
from tokenizer.vq.config import TrainVQConfig


@dataclass(frozen=True)
class ClipConfig:
    """Which CLIP to use. `arch` is a built-in name (`cpu-tiny`, `cpu-small`), an open_clip
    registry name (e.g. `ViT-B-32`), or a path/URL to a model-config JSON (open_clip layout or
    the `clip.json` that `train_clip` writes). `weights` is a local path or fsspec URL to a
    `.safetensors` file or a torch checkpoint; None means random init (tests only)."""

    arch: str = "cpu-tiny"
    weights: str | None = None
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    batch_size: int = 64
    num_threads: int = 0  # torch intra-op threads on CPU; 0 = leave torch's default

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError("ClipConfig.batch_size must be >= 1")
        if self.num_threads < 0:
            raise ValueError("ClipConfig.num_threads must be >= 0")


@dataclass(frozen=True)
class ClipTrainConfig:
    """How `curate train-clip` trains a CLIP on the curated corpus (all captions per image:
    each time an image is drawn, one of its captions is sampled)."""

    max_steps: int = 1000
    max_minutes: float = 0.0  # 0 = no time budget
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup_steps: int = 50
    min_crop_scale: float = 0.6  # RandomResizedCrop lower bound; 1.0 disables cropping
    shuffle_buffer: int = 512
    checkpoint_every: int = 100
    seed: int = 0
    num_threads: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        if self.max_steps < 1 or self.batch_size < 2:
            raise ValueError("ClipTrainConfig needs max_steps >= 1 and batch_size >= 2")
        if not 0.0 < self.min_crop_scale <= 1.0:
            raise ValueError("ClipTrainConfig.min_crop_scale must be in (0, 1]")


ALIGN_MODES = ("calibrated", "threshold", "top_fraction", "off")


@dataclass(frozen=True)
class AlignConfig:
    """CLIP scoring and filtering. score = cosine(image, caption) reduced over the asset's
    captions by `reduce` (`max`: some caption describes the image; `mean`: all do).

    `calibrated` (the default) rejects a row only where its score looks like the scores of
    mismatched pairs (the same images with captions drawn from other rows), at a false-reject
    budget, and rejects nothing when the model is too weak to meet it (docs/alignment.md).
    When the run trains its own CLIP, each row is scored by one of `folds` models that never
    saw it (out of fold)."""

    enabled: bool = True  # false: no CLIP at all (no scores, no embeddings, no retrieval index)
    clip: ClipConfig = field(default_factory=ClipConfig)
    reduce: str = "max"
    mode: str = "calibrated"  # calibrated | threshold | top_fraction | off
    folds: int = 2  # out-of-fold scoring when the CLIP is trained here: K models, each without 1/K of the rows
    false_reject_budget: float = 0.02  # calibrated: expected fraction of good rows rejected, at most
    min_auc: float = 0.75  # calibrated: below this out-of-fold AUC the model is too weak: reject nothing
    min_catch: float = 0.5  # calibrated: below this expected catch rate at the budget: reject nothing
    mismatch_draws: int = 3  # calibrated: mismatched captions scored per image
    threshold: float = 0.25  # mode=threshold: keep score >= threshold (model-specific!)
    keep_fraction: float = 0.9  # mode=top_fraction: keep the best-scoring fraction of the run
    quantile_resolution: int = 1000  # top_fraction cut is exact to 1/resolution of the run

    def __post_init__(self) -> None:
        if self.reduce not in ("max", "mean"):
            raise ValueError(f"AlignConfig.reduce must be max or mean, got {self.reduce!r}")
        if self.mode not in ALIGN_MODES:
            raise ValueError(f"AlignConfig.mode must be one of {ALIGN_MODES}, got {self.mode!r}")
        if self.folds < 0 or self.folds == 1:
            raise ValueError("AlignConfig.folds must be 0 (score with the full model) or >= 2")
        if not 0.0 < self.false_reject_budget < 0.5:
            raise ValueError("AlignConfig.false_reject_budget must be in (0, 0.5)")
        if not 0.5 <= self.min_auc <= 1.0:
            raise ValueError("AlignConfig.min_auc must be in [0.5, 1]")
        if not 0.0 <= self.min_catch <= 1.0:
            raise ValueError("AlignConfig.min_catch must be in [0, 1]")
        if self.mismatch_draws < 1:
            raise ValueError("AlignConfig.mismatch_draws must be >= 1")
        if not 0.0 < self.keep_fraction <= 1.0:
            raise ValueError("AlignConfig.keep_fraction must be in (0, 1]")
        if self.quantile_resolution < 2:
            raise ValueError("AlignConfig.quantile_resolution must be >= 2")


@dataclass(frozen=True)
class VQRunConfig:
    """The image tokenizer of a run: train `model` on the curated store, or use `weights`."""

    model: str = "cpu-small"  # tokenizer.vq.config name: cpu-small | cm3leon-256
    weights: str | None = None  # a trained vq.safetensors (vq.json beside it): skip training
    train: TrainVQConfig = field(default_factory=lambda: TrainVQConfig(num_threads=1))
    encode_batch_size: int = 32
    device: str = "auto"  # encode on cpu | cuda | auto

    def __post_init__(self) -> None:
        from tokenizer.vq.config import get_config

        if not self.weights:
            try:
                get_config(self.model)
            except KeyError as exc:
                raise ConfigError(f"vq.model: {exc.args[0]}") from None
        if self.encode_batch_size < 1:
            raise ConfigError("vq.encode_batch_size must be >= 1")
        if self.device not in ("cpu", "cuda", "auto"):
            raise ConfigError("vq.device must be cpu, cuda or auto")


@dataclass(frozen=True)
class TextConfig:
    """The text tokenizer: byte-level BPE trained on the curated captions, or `tokenizer`."""

    vocab_size: int = 56_320  # CM3leon's; the joint vocabulary reserves all of it
    num_mask_sentinels: int = 16
    min_frequency: int = 2
    tokenizer: str | None = None  # an existing tokenizer.json: skip training

    def __post_init__(self) -> None:
        if self.vocab_size < 512:
            raise ConfigError("text.vocab_size must be >= 512")
        if not 1 <= self.num_mask_sentinels <= 256:
            raise ConfigError("text.num_mask_sentinels must be in [1, 256]")


TOKEN_ORDERS = ("text_first", "image_first", "mixed")


@dataclass(frozen=True)
class TokensConfig:
    """The `tokens` step: CM3 sequences `[bos] n1 <break> ... nk <break> main [eos]` written as
    Megatron .bin/.idx shards (docs/shards.md). `order` is a document's caption/image order:
    fixed, or `mixed`, a seeded per-sequence choice with `image_first_fraction` image-first
    (Chameleon flipped half of its pairs so one model learns captioning and generation)."""

    k: int = 2  # retrieved neighbours per sequence (CM3leon: 2-3); at most neighbours.k
    max_tokens: int = 4096  # CM3leon's sequence length; least relevant neighbours go first
    order: str = "mixed"  # text_first | image_first | mixed
    image_first_fraction: float = 0.5  # order=mixed only
    sequences_per_shard: int = 10_000
    webdataset: bool = False  # also write tokens-NNNNNN.tar (KEY.tokens.npy + KEY.json)

    def __post_init__(self) -> None:
        if not isinstance(self.k, int) or self.k < 0:
            raise ConfigError(f"tokens.k must be an int >= 0, got {self.k!r}")
        if self.max_tokens < 8:
            raise ConfigError(f"tokens.max_tokens must be >= 8, got {self.max_tokens!r}")
        if self.order not in TOKEN_ORDERS:
            raise ConfigError(f"tokens.order must be one of {TOKEN_ORDERS}, got {self.order!r}")
        if not 0.0 <= self.image_first_fraction <= 1.0:
            raise ConfigError(f"tokens.image_first_fraction must be in [0, 1], got {self.image_first_fraction!r}")
        if self.sequences_per_shard < 1:
            raise ConfigError("tokens.sequences_per_shard must be >= 1")


SFT_TASKS = sft_format.TASKS
SFT_TEMPLATES = tuple(sft_format.TEMPLATES)


@dataclass(frozen=True)
class SftConfig:
    """The `sft` step: CM3leon-style task examples `[bos] prompt <break> answer [eos]` over the
    curated documents, a shard set of their own (`OUT/sft/`, docs/shards.md#sft-shard-set).
    Each task's natural share is resampled towards `task_weights` (equal by default) by a
    factor clamped to [`min_downsample`, `max_upsample`] (CM3leon: 0.3 and 3)."""

    enabled: bool = False
    tasks: tuple[str, ...] = SFT_TASKS
    templates: str = "cm3leon"  # cm3leon | minimal (no instruction words)
    task_weights: Mapping[str, float] = field(default_factory=dict)  # target share weights; missing = 1
    max_upsample: float = 3.0
    min_downsample: float = 0.3
    max_objects: int = 8  # boxes named in one grounded prompt (the first ones kept by the crop)
    max_tokens: int = 4096  # a longer example is skipped (counted), not rejected in the ledger
    sequences_per_shard: int = 10_000

    def __post_init__(self) -> None:
        if isinstance(self.tasks, str) or not self.tasks:
            raise ConfigError(f"sft.tasks must be a non-empty list from {SFT_TASKS}")
        unknown = [t for t in self.tasks if t not in SFT_TASKS]
        if unknown or len(set(self.tasks)) != len(self.tasks):
            raise ConfigError(f"sft.tasks must name distinct tasks from {SFT_TASKS}, got {list(self.tasks)}")
        object.__setattr__(self, "tasks", tuple(self.tasks))
        if self.templates not in SFT_TEMPLATES:
            raise ConfigError(f"sft.templates must be one of {SFT_TEMPLATES}, got {self.templates!r}")
        if not isinstance(self.task_weights, Mapping):
            raise ConfigError("sft.task_weights must be a mapping task -> weight")
        for task, weight in self.task_weights.items():
            if task not in self.tasks:
                raise ConfigError(f"sft.task_weights names {task!r}, which is not in sft.tasks")
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight > 0:
                raise ConfigError(f"sft.task_weights.{task} must be a number > 0, got {weight!r}")
        object.__setattr__(self, "task_weights", {t: float(w) for t, w in sorted(self.task_weights.items())})
        if not self.max_upsample >= 1.0:
            raise ConfigError(f"sft.max_upsample must be >= 1, got {self.max_upsample!r}")
        if not 0.0 < self.min_downsample <= 1.0:
            raise ConfigError(f"sft.min_downsample must be in (0, 1], got {self.min_downsample!r}")
        if not isinstance(self.max_objects, int) or self.max_objects < 1:
            raise ConfigError(f"sft.max_objects must be an int >= 1, got {self.max_objects!r}")
        if self.max_tokens < 8:
            raise ConfigError(f"sft.max_tokens must be >= 8, got {self.max_tokens!r}")
        if self.sequences_per_shard < 1:
            raise ConfigError("sft.sequences_per_shard must be >= 1")
