"""The process group, from the environment torchrun (or Slurm via torchrun) sets.

One process without RANK/WORLD_SIZE is a world of one and needs no process group.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if dist.is_initialized():
            dist.barrier()


def init_world(device: str = "auto") -> World:
    """Join the process group torchrun described (NCCL on CUDA, gloo on CPU) and pick this
    rank's device. `device`: auto (cuda:LOCAL_RANK when CUDA is available, else cpu)."""
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    target = torch.device("cuda", local_rank) if use_cuda else torch.device(device if
                                                                             device != "auto"
                                                                             else "cpu")
    if use_cuda:
        torch.cuda.set_device(target)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", rank=rank,
                                world_size=world_size)
    return World(rank, world_size, local_rank, target)


def close_world(*, finished: bool) -> None:
    """Leave the process group. After a clean finish the ranks first meet at a barrier:
    gloo can abort a process (std::terminate) whose peer tears the group down while
    traffic is still in flight. After an error there is no barrier, since the other ranks
    may never arrive."""
    if dist.is_initialized():
        if finished:
            dist.barrier()
        dist.destroy_process_group()


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    """Mean of a scalar tensor over ranks (identity in a world of one)."""
    if dist.is_initialized():
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= dist.get_world_size()
    return value
