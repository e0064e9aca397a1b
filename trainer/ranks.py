"""Where a training process sits: one process, or one rank of torchrun's process group (gloo on
CPU, nccl on CUDA), and the device it trains on.
"""

from __future__ import annotations

import dataclasses
import os

import torch
import torch.distributed as dist

from trainer.config import TrainLMConfig


@dataclasses.dataclass(frozen=True)
class Ranks:
    """Where this process sits: torchrun's RANK / WORLD_SIZE / LOCAL_RANK, or one process."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False  # we initialised the process group, so we tear it down
    device: torch.device = torch.device("cpu")  # where collectives run (nccl needs CUDA tensors)

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """All-reduce (sum) over ranks, returned on the CPU; a no-op on one process."""
        if self.world_size == 1:
            return values.cpu()
        values = values.to(self.device)
        dist.all_reduce(values)
        return values.cpu()


def init_ranks(device_type: str) -> Ranks:
    """Join torchrun's process group (gloo on CPU, nccl on CUDA) when WORLD_SIZE > 1."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if dist.is_available() and dist.is_initialized():
        return Ranks(dist.get_rank(), dist.get_world_size(), local_rank)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Ranks()
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    return Ranks(dist.get_rank(), world_size, local_rank, owns_group=True)


def resolve_device(cfg: TrainLMConfig, local_rank: int = 0) -> torch.device:
    kind = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    return torch.device(kind, local_rank) if kind == "cuda" else torch.device("cpu")
