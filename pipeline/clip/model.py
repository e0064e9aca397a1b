"""CLIP models: configs, open_clip's registry and factory, safe loading of weights.

Every model is built by `open_clip.create_model` from a config in open_clip's registry: the
built-in archs and any config dict (a checkpoint's `clip.json`, a user's JSON) are added to
it with `open_clip.add_model_config` first. Weights are only ever read with non-executing
loaders (safetensors, or ``torch.load(weights_only=True)``), from a local path or any fsspec
URL, and nothing is downloaded: a licensed-only lineage trains its own CLIP (`train.py`).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

import fsspec
import torch

log = logging.getLogger(__name__)

# Model configs in open_clip's own JSON layout (embed_dim / vision_cfg / text_cfg), so a
# checkpoint written here is an ordinary open_clip CLIP. `cpu-tiny` (64 px, 4×4 patches of
# 16 px, 7.9 M parameters, 6.3 M of them the 49k-token embedding) trains in a minute or two
# on two CPU cores; `cpu-small` is a step up for a few thousand images.
BUILTIN_ARCHS: dict[str, dict[str, Any]] = {
    "cpu-tiny": {
        "embed_dim": 128,
        "vision_cfg": {"image_size": 64, "layers": 4, "width": 128, "head_width": 32, "patch_size": 16},
        "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 3},
    },
    "cpu-small": {
        "embed_dim": 256,
        "vision_cfg": {"image_size": 128, "layers": 6, "width": 256, "head_width": 64, "patch_size": 16},
        "text_cfg": {"context_length": 48, "vocab_size": 49408, "width": 256, "heads": 4, "layers": 6},
    },
}


def resolve_device(device: str) -> torch.device:
    """`auto` picks CUDA when present so the same config runs on a laptop and a GPU worker."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def model_config(arch: str) -> dict[str, Any]:
    """The open_clip model config dict for `arch` (built-in, registry name or JSON URL)."""
    if arch in BUILTIN_ARCHS:
        return json.loads(json.dumps(BUILTIN_ARCHS[arch]))
    if arch.endswith(".json"):
        with fsspec.open(arch, "r") as f:
            cfg = json.load(f)
        return cfg["model_cfg"] if "model_cfg" in cfg else cfg
    import open_clip

    cfg = open_clip.get_model_config(arch)
    if cfg is None:
        raise ValueError(f"unknown CLIP arch {arch!r}: not built in ({sorted(BUILTIN_ARCHS)}), "
                         "not an open_clip model name, not a .json config")
    return cfg


def register_model_config(model_cfg: dict[str, Any], name: str | None = None) -> str:
    """Add `model_cfg` to open_clip's model registry and return its name there.

    open_clip's registry reads JSON files (`add_model_config`), so the config is written to a
    temporary folder for the moment it is read. Without `name` it is named by its content
    (`cm3curate-<sha256 prefix>`), so two configs never share a name; a name already
    registered with this very config is reused as is."""
    import open_clip

    if name is None:
        digest = hashlib.sha256(json.dumps(model_cfg, sort_keys=True).encode()).hexdigest()[:16]
        name = f"cm3curate-{digest}"
    if open_clip.get_model_config(name) == model_cfg:
        return name
    with tempfile.TemporaryDirectory(prefix="cm3curate-clip-") as tmp:
        (Path(tmp) / f"{name}.json").write_text(json.dumps(model_cfg))
        open_clip.add_model_config(tmp)
    if open_clip.get_model_config(name) != model_cfg:
        raise ValueError(f"open_clip did not register CLIP config {name!r} (needs embed_dim, vision_cfg, text_cfg)")
    return name


def build_model(model_cfg: dict[str, Any], name: str | None = None) -> torch.nn.Module:
    """A randomly initialised model of `model_cfg` from open_clip's factory (`create_model`).

    No pretrained weights of any kind are fetched, not even an HF text tower's: weights come
    only from `load_clip` / `read_state_dict`."""
    import open_clip

    name = register_model_config(model_cfg, name)
    with _factory_logging():
        return open_clip.create_model(name, pretrained=None, pretrained_image=False, pretrained_text=False)


class _DropRandomInitWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No pretrained weights loaded for model")


@contextlib.contextmanager
def _factory_logging() -> Iterator[None]:
    """open_clip's factory logs with module-level `logging.info/warning`, which configure the
    root logger (`basicConfig`) in a process that has not, and it warns "Model initialized
    randomly" for every model built here, although `load_clip` loads the weights next. For
    the call, a NullHandler keeps the root logger unconfigured and a filter drops that line."""
    root = logging.getLogger()
    handler, quiet = logging.NullHandler(), _DropRandomInitWarning()
    root.addHandler(handler)
    root.addFilter(quiet)
    try:
        yield
    finally:
        root.removeFilter(quiet)
        root.removeHandler(handler)


def build_tokenizer(arch: str, model_cfg: dict[str, Any]) -> Callable[..., torch.Tensor]:
    """The SimpleTokenizer (vocab ships inside open_clip, so it works offline) at the model's
    context length; registry names use open_clip's own tokenizer choice."""
    import open_clip

    context_length = int(model_cfg.get("text_cfg", {}).get("context_length", 77))
    if arch in BUILTIN_ARCHS or arch.endswith(".json"):
        return open_clip.tokenizer.SimpleTokenizer(context_length=context_length)
    return open_clip.get_tokenizer(arch)


def build_preprocess(model: torch.nn.Module, train: bool = False, min_crop_scale: float = 1.0):
    """Eval: resize + center crop + normalise, as open_clip does; train adds a random crop."""
    import open_clip
    from torchvision import transforms as T

    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else int(size)
    if not train or min_crop_scale >= 1.0:
        return open_clip.image_transform(size, is_train=False)
    return T.Compose([
        T.RandomResizedCrop(size, scale=(min_crop_scale, 1.0), interpolation=T.InterpolationMode.BICUBIC),
        T.Lambda(lambda im: im.convert("RGB")),
        T.ToTensor(),
        T.Normalize(open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD),
    ])


def read_state_dict(url: str) -> dict[str, torch.Tensor]:
    """Read weights from a path or fsspec URL without executing pickled code.

    Accepts safetensors, or a torch checkpoint holding a state dict directly or under
    `state_dict` / `model` (open_clip training checkpoints); strips DDP's `module.` prefix."""
    with fsspec.open(url, "rb") as f:
        data = f.read()
    if url.endswith(".safetensors") or data[8:9] == b"{":
        from safetensors.torch import load as load_safetensors

        try:
            state = load_safetensors(data)
        except Exception:  # noqa: BLE001 - not a safetensors blob after all; try torch below
            if url.endswith(".safetensors"):
                raise
            state = None
        if state is not None:
            return state
    obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict):
        raise ValueError(f"{url}: checkpoint does not hold a state dict")
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def registry_name(arch: str) -> str | None:
    """`arch` when it is a plain name in open_clip's registry (or built in), else None (a JSON
    URL; and never a `hf-hub:` / `local-dir:` name, which would make open_clip fetch weights)."""
    import open_clip

    if arch in BUILTIN_ARCHS or (":" not in arch and arch in open_clip.list_models()):
        return arch
    return None


def load_clip(arch: str, weights_url: str | None = None, device: str = "auto"):
    """Build `arch`, load `weights_url` (strictly), put it in eval mode on `device`.

    Returns `(model, preprocess, tokenizer)` like open_clip's factory does."""
    model_cfg = model_config(arch)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # without weights, at least every worker gets the same model
        model = build_model(model_cfg, registry_name(arch))
    if weights_url:
        state = read_state_dict(weights_url)
        model.load_state_dict(state, strict=True)
        log.info("loaded CLIP %s weights from %s", arch, weights_url)
    else:
        log.warning("CLIP %s has no weights: random init (only useful for tests)", arch)
    model = model.to(resolve_device(device)).eval()
    return model, build_preprocess(model), build_tokenizer(arch, model_cfg)
