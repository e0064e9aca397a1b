"""Run configuration: frozen dataclasses loaded from one YAML file.

Unknown keys are errors (a typo must not silently fall back to a default), every
section validates itself when built, and the resolved config is saved with the run's
outputs (`run.json`) and hashed to decide whether a phase can be skipped on resume.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Mapping

import fsspec
import yaml

from pipeline import dedup_hash, dedup_search
from pipeline.retrieval import IndexConfig, NeighbourConfig
from tokenizer import sft as sft_format
from tokenizer.vq.config import TrainVQConfig
from trainer.config import TrainLMConfig


class ConfigError(ValueError):
    """The configuration is invalid; the message names the offending key."""


@dataclass(frozen=True)
class ValidateConfig:
    """Caption filters applied right after a row is parsed."""

    max_caption_chars: int = 1000
    min_caption_chars: int = 3
    min_letter_fraction: float = 0.5  # a caption must be mostly letters/spaces to count as text
    max_captions: int = 16

    def __post_init__(self) -> None:
        if self.max_caption_chars < self.min_caption_chars or self.min_caption_chars < 1:
            raise ConfigError("validate: need 1 <= min_caption_chars <= max_caption_chars")
        if not 0.0 <= self.min_letter_fraction <= 1.0:
            raise ConfigError("validate.min_letter_fraction must be in [0, 1]")
        if self.max_captions < 1:
            raise ConfigError("validate.max_captions must be >= 1")


# fsspec filesystems whose implementation is a separate package: scheme -> (module, pip extra).
# http(s) comes with the base install; the object stores with `pip install 'cm3curate[s3]'` etc.
SCHEME_BACKENDS: dict[str, tuple[str, str | None]] = {
    "http": ("aiohttp", None), "https": ("aiohttp", None),
    "s3": ("s3fs", "s3"), "gs": ("gcsfs", "gcs"), "gcs": ("gcsfs", "gcs"), "az": ("adlfs", "azure"), "abfs": ("adlfs", "azure"),
}
DEFAULT_SCHEMES = ("file", "memory", "s3", "gs", "gcs", "az", "abfs", "http", "https")


@functools.lru_cache(maxsize=None)
def missing_backend(scheme: str) -> str | None:
    """None when fsspec can open `scheme://` URLs here; otherwise what to install, in one line.
    Cached: a package does not appear mid-run, and the fetcher asks for every row."""
    import importlib.util

    module, extra = SCHEME_BACKENDS.get(scheme, (None, None))
    if module is None or importlib.util.find_spec(module) is not None:
        return None
    if extra:
        return f"{scheme}:// needs the {module} package: pip install 'cm3curate[{extra}]'"
    return f"{scheme}:// needs the {module} package, a dependency of cm3curate: reinstall cm3curate"


def url_scheme(url: str) -> str:
    return url.split("://", 1)[0].lower() if "://" in url else "file"


@dataclass(frozen=True)
class FetchConfig:
    """Where bytes may come from and how hard to try.

    `allowed_roots` are URL prefixes; when empty, each manifest's own folder is the only
    root, so a relative `uri` cannot escape it with `../`. `allowed_schemes` null means every
    scheme of DEFAULT_SCHEMES whose backend is installed; a scheme listed explicitly whose
    backend is missing is a config error, so no row is ever retried for want of a package.
    """

    allowed_roots: tuple[str, ...] = ()
    allowed_schemes: tuple[str, ...] | None = None
    retries: int = 3
    backoff_s: float = 0.5
    max_backoff_s: float = 8.0
    max_bytes: int = 64 * 1024 * 1024
    concurrency: int = 16  # objects fetched at once by each worker (threads), overlapping waits with decode
    max_bytes_in_flight: int = 256 * 1024 * 1024  # fetched, not yet decoded: no new fetch starts above this
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 30.0  # the longest silence while reading
    timeout_s: float = 120.0  # one attempt, from request to last byte, redirects included
    max_redirects: int = 5  # each hop is checked against the allowed roots again

    def __post_init__(self) -> None:
        if not 1 <= self.concurrency <= 1024:
            raise ConfigError("fetch.concurrency must be in [1, 1024]")
        if self.max_bytes_in_flight <= 0:
            raise ConfigError("fetch.max_bytes_in_flight must be positive")
        for name in ("connect_timeout_s", "read_timeout_s", "timeout_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"fetch.{name} must be positive")
        if not 0 <= self.max_redirects <= 20:
            raise ConfigError("fetch.max_redirects must be in [0, 20]")
        if self.retries < 0 or self.retries > 20:
            raise ConfigError("fetch.retries must be in [0, 20]")
        if self.backoff_s < 0 or self.max_backoff_s < self.backoff_s:
            raise ConfigError("fetch: need 0 <= backoff_s <= max_backoff_s")
        if self.max_bytes <= 0:
            raise ConfigError("fetch.max_bytes must be positive")
        for scheme in self.allowed_schemes or ():
            why = missing_backend(scheme)
            if why:
                raise ConfigError(f"fetch.allowed_schemes lists {scheme!r}, but {why}")

    def schemes(self) -> tuple[str, ...]:
        """The schemes rows may use: the configured ones, or the installed defaults."""
        if self.allowed_schemes is not None:
            return tuple(self.allowed_schemes)
        return tuple(s for s in DEFAULT_SCHEMES if missing_backend(s) is None)


@dataclass(frozen=True)
class DecodeConfig:
    """Safe decode limits, content filters and the normalised output resolution."""

    max_pixels: int = 64_000_000
    min_side: int = 128
    max_aspect_ratio: float = 3.0
    resolution: int = 256
    jpeg_quality: int = 95
    use_draft: bool = True
    check_tdm: bool = True  # XMP/IPTC/C2PA "no data mining" marks => TDM_OPT_OUT

    def __post_init__(self) -> None:
        if self.resolution < 16 or self.resolution > 4096:
            raise ConfigError("decode.resolution must be in [16, 4096]")
        if self.min_side < 1:
            raise ConfigError("decode.min_side must be >= 1")
        if self.max_aspect_ratio < 1.0:
            raise ConfigError("decode.max_aspect_ratio must be >= 1")
        if not 1 <= self.jpeg_quality <= 100:
            raise ConfigError("decode.jpeg_quality must be in [1, 100]")
        if self.max_pixels < self.min_side * self.min_side:
            raise ConfigError("decode.max_pixels is smaller than min_side**2")


@dataclass(frozen=True)
class CuratedConfig:
    """Curated store layout: shards of about `samples_per_shard` records. The prepare step
    works through each manifest `chunk_rows` rows at a time (a worker holds one chunk), and
    a ledger file holds ten chunks."""

    samples_per_shard: int = 2000
    chunk_rows: int = 500

    def __post_init__(self) -> None:
        if self.samples_per_shard < 1:
            raise ConfigError("curated.samples_per_shard must be >= 1")
        if self.chunk_rows < 1:
            raise ConfigError("curated.chunk_rows must be >= 1")


HASH_INPUTS = ("auto", "source", "image")


@dataclass(frozen=True)
class DedupConfig:
    """Settings for the three dedup stages; validated when built (ConfigError on bad values)."""

    exact: bool = True
    pixel_exact: bool = True  # same decoded pixels under another encoding (jpg/png/webp)
    near: bool = True
    hamming_radius: int = 8  # measured on real photos: see docs/dedup.md
    mirror: bool = True  # also match a horizontally mirrored copy (a second hash, of the mirrored frame)
    hash_kind: str = "phash"
    hash_input: str = "auto"  # auto: an upstream phash, else source bytes, else the normalised image
    bucket_cap: int = 256  # band buckets above this are searched recursively, never pairwise
    engine: str = "auto"  # near-dup search: auto | compiled, both the numba kernel (the only engine)
    threads: int | None = None  # threads for the compiled kernel; None = every core the worker may use
    semantic: bool = False  # needs CLIP embeddings (align stage)
    semantic_threshold: float = 0.95  # cosine similarity of image embeddings
    license_preference: tuple[str, ...] = ()  # earlier license ids win ties in representative choice
    previous_run: str | None = None  # URL/glob of a previous run's curated metadata Parquet

    def __post_init__(self) -> None:
        if not isinstance(self.hamming_radius, int) or not 0 <= self.hamming_radius <= 32:
            raise ConfigError(f"hamming_radius must be an int in [0, 32], got {self.hamming_radius!r}")
        if not isinstance(self.mirror, bool):
            raise ConfigError(f"mirror must be true or false, got {self.mirror!r}")
        if self.hash_kind not in dedup_hash.HASH_KINDS:
            raise ConfigError(f"hash_kind must be one of {dedup_hash.HASH_KINDS}, got {self.hash_kind!r}")
        if self.hash_input not in HASH_INPUTS:
            raise ConfigError(f"hash_input must be one of {HASH_INPUTS}, got {self.hash_input!r}")
        if not isinstance(self.bucket_cap, int) or self.bucket_cap < 2:
            raise ConfigError(f"bucket_cap must be an int >= 2, got {self.bucket_cap!r}")
        if self.engine not in dedup_search.ENGINES:
            raise ConfigError(f"engine must be one of {dedup_search.ENGINES}, got {self.engine!r}")
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise ConfigError(f"threads must be an int >= 1 or null, got {self.threads!r}")
        if not 0.0 < float(self.semantic_threshold) <= 1.0:
            raise ConfigError(f"semantic_threshold must be in (0, 1], got {self.semantic_threshold!r}")
        if isinstance(self.license_preference, str):
            raise ConfigError("license_preference must be a list of license ids, not a string")
        object.__setattr__(self, "license_preference", tuple(self.license_preference))


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


@dataclass(frozen=True)
class BeamConfig:
    """Runner flags; `options` pass straight to Beam's PipelineOptions (e.g. `--runner`)."""

    runner: str = "DirectRunner"
    direct_num_workers: int = 0  # 0 = one per core
    direct_running_mode: str = "multi_processing"
    options: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.direct_running_mode not in ("in_memory", "multi_threading", "multi_processing"):
            raise ConfigError("beam.direct_running_mode must be in_memory, multi_threading or multi_processing")
        if self.direct_num_workers < 0:
            raise ConfigError("beam.direct_num_workers must be >= 0")


@dataclass(frozen=True)
class RunConfig:
    """Everything one run needs. `manifests` and `policy` are fsspec URLs."""

    manifests: tuple[str, ...] = ()
    policy: str | None = None
    out: str = "out"
    seed: int = 0
    validate: ValidateConfig = field(default_factory=ValidateConfig)
    fetch: FetchConfig = field(default_factory=FetchConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    curated: CuratedConfig = field(default_factory=CuratedConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    align: AlignConfig = field(default_factory=AlignConfig)
    clip_train: ClipTrainConfig = field(default_factory=ClipTrainConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    neighbours: NeighbourConfig = field(default_factory=NeighbourConfig)
    vq: VQRunConfig = field(default_factory=VQRunConfig)
    text: TextConfig = field(default_factory=TextConfig)
    tokens: TokensConfig = field(default_factory=TokensConfig)
    sft: SftConfig = field(default_factory=SftConfig)
    train_lm: TrainLMConfig = field(default_factory=TrainLMConfig)  # `curate train-lm` (docs/training.md)
    beam: BeamConfig = field(default_factory=BeamConfig)

    def to_json(self) -> dict[str, Any]:
        return _to_json(self)


def _to_json(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return {f.name: _to_json(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [_to_json(v) for v in value]
    return value


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, where)
    if origin is tuple:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__}")
        return tuple(_coerce(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool):
        if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
            raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
        return value
    return value


def from_dict(cls: type, data: Mapping[str, Any] | None, where: str = "config") -> Any:
    """Build dataclass `cls` from a mapping; unknown keys raise ConfigError."""
    data = data or {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown keys {unknown}; known: {sorted(names)}")
    kwargs = {k: _coerce(hints[k], v, f"{where}.{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from None


def describe_yaml_error(exc: Exception) -> str:
    """A YAML parse error in one line: where and what."""
    mark = getattr(exc, "problem_mark", None)
    where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
    return f"not valid YAML{where}: {getattr(exc, 'problem', None) or exc}"


# Keys that name files: a relative path in a config file means "beside this file".
PATH_KEYS: tuple[tuple[str, ...], ...] = (
    ("manifests",), ("policy",), ("out",), ("align", "clip", "weights"), ("vq", "weights"), ("text", "tokenizer"),
    ("dedup", "previous_run"),
)


def resolve_path(path: str, base: str) -> str:
    """`path` as written in a file in folder `base` (a local folder or a URL): URLs and absolute
    paths stay as they are; a relative one is joined to `base` (local: made absolute)."""
    import os
    from pathlib import Path

    if "://" in path or os.path.isabs(path):
        return path
    if "://" in base:
        return base + path if base.endswith("://") else f"{base.rstrip('/')}/{path}"
    return str((Path(base) / path).resolve())


def _resolve_paths(data: dict[str, Any], base: str) -> dict[str, Any]:
    """The PATH_KEYS of a raw config mapping resolved against `base`; other values untouched."""
    for keys in PATH_KEYS:
        parent: Any = data
        for key in keys[:-1]:
            parent = parent.get(key) if isinstance(parent, Mapping) else None
        if not isinstance(parent, dict) or keys[-1] not in parent:
            continue
        value = parent[keys[-1]]
        if isinstance(value, str):
            parent[keys[-1]] = resolve_path(value, base)
        elif isinstance(value, list):
            parent[keys[-1]] = [resolve_path(v, base) if isinstance(v, str) else v for v in value]
    return data


def config_folder(url: str) -> str:
    """The folder a config file's relative paths are resolved against."""
    import os

    if "://" in url:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://{rest.rsplit('/', 1)[0] if '/' in rest else ''}"
    return os.path.dirname(os.path.realpath(url))


def load_config(url: str | None, overrides: Mapping[str, Any] | None = None) -> RunConfig:
    """Read a YAML config (any fsspec URL) and apply top-level overrides (CLI flags).

    Relative paths in the file (PATH_KEYS) are resolved against the file's folder; overrides
    are taken as given."""
    data: dict[str, Any] = {}
    if url:
        try:
            with fsspec.open(url, "rt", encoding="utf-8") as handle:
                data = yaml.safe_load(handle) or {}
        except FileNotFoundError:
            raise ConfigError(f"{url}: not found") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{url}: {describe_yaml_error(exc)}") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{url}: cannot be read: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{url}: the config must be a YAML mapping")
        data = _resolve_paths(data, config_folder(url))
    for key, value in (overrides or {}).items():
        if value is not None and value != ():
            data[key] = value
    return from_dict(RunConfig, data)
