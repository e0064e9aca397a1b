"""The resumable training checkpoint of `trainer.train`: one safetensors file (weights, AdamW
moments, every rank's RNG states, reader state and run metadata), written atomically, and the
check that a resume uses the same settings.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import fsspec
import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes

from tokenizer.shards import write_bytes_atomic
from trainer.config import LMConfig, TrainLMConfig
from trainer.model import CM3LM
from trainer.ranks import Ranks

log = logging.getLogger(__name__)

CHECKPOINT = "lm-train.safetensors"  # everything a resume needs, in one atomically written file
CHECKPOINT_FORMAT = "cm3curate-lm-train/1"
# TrainLMConfig fields that shape the optimisation: a resumed run must agree on every one
RESUME_FIELDS = ("model", "global_batch_size", "lr", "warmup_steps", "min_lr_ratio", "weight_decay", "betas",
                 "grad_clip", "seed", "pack", "seq_len", "mask", "precision")


def url_exists(url: str) -> bool:
    fs, path = fsspec.core.url_to_fs(url)
    return fs.exists(path)


def save_checkpoint(url: str, model: CM3LM, opt: torch.optim.Optimizer, meta: dict[str, Any],
                    rng: dict[str, torch.Tensor]) -> None:
    """Weights, AdamW state (tensors; param_groups in the metadata), RNG states and `meta` in one
    safetensors file, written to a temp name and renamed: a kill never leaves half a checkpoint."""
    tensors = {f"model/{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    optim = opt.state_dict()
    for index, state in optim["state"].items():
        for name, value in state.items():
            tensors[f"optim/{index}/{name}"] = (value if torch.is_tensor(value) else torch.tensor(value)).detach().cpu()
    tensors.update({f"rng/{k}": v.cpu() for k, v in rng.items()})
    meta = {**meta, "param_groups": optim["param_groups"]}
    metadata = {"format": CHECKPOINT_FORMAT, "meta": json.dumps(meta)}
    write_bytes_atomic(url, save_safetensors_bytes(tensors, metadata=metadata))


def read_checkpoint(url: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, meta) of a checkpoint written by `save_checkpoint`."""
    with fsspec.open(url, "rb") as handle:
        data = handle.read()
    header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])  # safetensors: u64 size, JSON header
    if header.get("__metadata__", {}).get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{url} is not a {CHECKPOINT_FORMAT} checkpoint")
    return load_safetensors_bytes(data), json.loads(header["__metadata__"]["meta"])


def restore_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], param_groups: list) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        if name.startswith("optim/"):
            _, index, key = name.split("/", 2)
            state.setdefault(int(index), {})[key] = value
    opt.load_state_dict({"state": state, "param_groups": param_groups})


def gather_rng(ranks: Ranks, device: torch.device) -> dict[str, torch.Tensor]:
    """Every rank's torch RNG state (CPU and CUDA), keyed by rank: dropout draws from them."""
    mine = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        mine["cuda"] = torch.cuda.get_rng_state(device)
    states = [mine]
    if ranks.world_size > 1:
        states = [None] * ranks.world_size  # type: ignore[list-item]
        dist.all_gather_object(states, mine)
    return {f"torch/{kind}/{rank}": state for rank, got in enumerate(states) for kind, state in got.items()}


def restore_rng(tensors: dict[str, torch.Tensor], meta: dict[str, Any], ranks: Ranks, device: torch.device) -> None:
    if meta["world_size"] != ranks.world_size:
        log.warning("resuming %d ranks from a checkpoint of %d: torch RNG states are reseeded (the run is "
                    "equivalent, not bit-identical)", ranks.world_size, meta["world_size"])
        torch.manual_seed(meta["seed"] * 1_000_003 + meta["step"] * 101 + ranks.rank)
    else:
        torch.set_rng_state(tensors[f"rng/torch/cpu/{ranks.rank}"])
        if device.type == "cuda" and f"rng/torch/cuda/{ranks.rank}" in tensors:
            torch.cuda.set_rng_state(tensors[f"rng/torch/cuda/{ranks.rank}"], device)
    kind, keys, pos, has_gauss, gauss = meta["numpy_rng"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))


def check_resumable(saved: dict[str, Any], cfg: TrainLMConfig, lm_cfg: LMConfig, url: str) -> None:
    """Refuse, naming every difference, a checkpoint trained with other settings."""
    mine = cfg.to_dict()
    wrong = [f"{k}: checkpoint {saved['train'][k]!r} vs now {mine[k]!r}"
             for k in RESUME_FIELDS if saved["train"][k] != mine[k]]
    old_cfg = TrainLMConfig.from_dict(saved["train"])
    if old_cfg.schedule_steps != cfg.schedule_steps:
        wrong.append(f"LR schedule length (decay_steps or max_steps): checkpoint {old_cfg.schedule_steps} vs now "
                     f"{cfg.schedule_steps}; keep it with decay_steps={old_cfg.schedule_steps}")
    if saved["lm"] != lm_cfg.to_dict():
        wrong.append(f"model config: checkpoint {saved['lm']} vs now {lm_cfg.to_dict()}")
    if wrong:
        raise ValueError(f"{url} was trained with other settings; use a new output folder or the same settings: "
                         + "; ".join(wrong))
