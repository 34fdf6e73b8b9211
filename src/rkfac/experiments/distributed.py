"""The CLI under ``torchrun``: process group, device, data shard and who writes.

``torchrun --nproc_per_node=N -m rkfac train ...`` sets WORLD_SIZE, RANK and LOCAL_RANK; the
trainer then initialises torch.distributed (gloo on CPU, nccl on CUDA), wraps the model in
DistributedDataParallel, gives each rank a contiguous 1/N of every global batch of
``batch_size`` samples, and lets rank 0 alone write the run directory and show progress. All
ranks keep identical parameters (DDP averages gradients; the preconditioners average their
statistics and share their decompositions). Without WORLD_SIZE > 1 nothing changes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Placement:
    world_size: int = 1
    rank: int = 0
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def shard(self, batch_size: int) -> slice:
        """This rank's part of a global batch."""
        if batch_size % self.world_size:
            raise ValueError(f"batch_size {batch_size} must be divisible by the number of processes {self.world_size}")
        share = batch_size // self.world_size
        return slice(self.rank * share, (self.rank + 1) * share)


def placement_from_environment() -> Placement:
    """The placement torchrun describes in the environment (one process when it says nothing)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Placement()
    return Placement(world_size, int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0")))


def start(placement: Placement, device: torch.device) -> torch.device:
    """Initialise the process group if needed; the device this rank trains on."""
    if not placement.active:
        return device
    if device.type == "cuda":
        device = torch.device("cuda", placement.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def mean_over_ranks(value: float, placement: Placement, device: torch.device) -> float:
    """The mean of a float over ranks (the logged loss is the global batch's)."""
    if not placement.active:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return float(tensor) / placement.world_size
