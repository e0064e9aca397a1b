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
from pipeline.config_models import (ALIGN_MODES, SFT_TASKS, SFT_TEMPLATES, TOKEN_ORDERS, AlignConfig, ClipConfig,
                                    ClipTrainConfig, SftConfig, TextConfig, TokensConfig, VQRunConfig)
from pipeline.errors import ConfigError
from pipeline.retrieval import IndexConfig, NeighbourConfig
from trainer.config import TrainLMConfig

# The sections of the models and tokens steps live in pipeline/config_models.py; RunConfig
# composes them, and this module is where every section is imported from.
__all__ = ["ALIGN_MODES", "SFT_TASKS", "SFT_TEMPLATES", "TOKEN_ORDERS", "AlignConfig", "BeamConfig", "ClipConfig",
           "ClipTrainConfig", "ConfigError", "CuratedConfig", "DecodeConfig", "DedupConfig", "FetchConfig",
           "IndexConfig", "NeighbourConfig", "RunConfig", "SftConfig", "TextConfig", "TokensConfig", "TrainLMConfig",
           "VQRunConfig", "ValidateConfig", "describe_yaml_error", "from_dict", "load_config", "missing_backend",
           "url_scheme"]


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
