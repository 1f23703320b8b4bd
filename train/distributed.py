"""The process group, from the environment torchrun or a Slurm step sets.

One process started by neither is a world of one and needs no process group.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.rendezvous import rendezvous

from stripes.core.config import ConfigError
from stripes.core.log import log
from stripes.train.launch_env import detect_launch_env, multicast_settings


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
    """Join the process group of whichever launcher started this process (torchrun or a
    Slurm step; train/launch_env.py), NCCL on CUDA and gloo on CPU, and pick this rank's
    device. `device`: auto (cuda:LOCAL_RANK when CUDA is available, else cpu)."""
    env = detect_launch_env()
    for key, value in env.torch_variables().items():
        os.environ.setdefault(key, value)  # a Slurm task looks like a torchrun worker
    os.environ.update(multicast_settings())  # before NCCL reads its environment
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    target = (_local_gpu(env.local_rank) if use_cuda
              else torch.device("cpu" if device == "auto" else device))
    if use_cuda:
        torch.cuda.set_device(target)
    if env.world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", rank=env.rank,
                                world_size=env.world_size, store=_attempt_store())
    if env.world_size > 1:  # every rank says where it runs: a failing node is found by name
        log.info(f"rank {env.rank} of {env.world_size} ({env.launcher}) on "
                 f"{socket.gethostname()}, {target}")
    return World(env.rank, env.world_size, env.local_rank, target)


def join_one_rank_group(world: World) -> None:
    """A process group of this process alone when there is none: DDP, FSDP2 and DeepSpeed
    need one even for a world of one (`stripes train` without a launcher)."""
    if world.world_size == 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if world.device.type == "cuda" else "gloo",
                                store=dist.HashStore(), rank=0, world_size=1)


def _local_gpu(local_rank: int) -> torch.device:
    """This rank's GPU: cuda:LOCAL_RANK when the process sees the node's GPUs, cuda:0 when
    the launcher bound it to one (srun --gpus-per-task=1 sets CUDA_VISIBLE_DEVICES)."""
    count = torch.cuda.device_count()
    if count == 1:
        return torch.device("cuda", 0)
    if local_rank >= count:
        raise ConfigError("LOCAL_RANK", local_rank, f"below the {count} GPUs this process "
                          "sees", "one rank per GPU")
    return torch.device("cuda", local_rank)


def _attempt_store() -> dist.Store | None:
    """Under torchrun, a key space of this attempt's own in the rendezvous store. torchrun
    keeps one store across `--max-restarts` restarts, and without a prefix the restarted
    ranks read the addresses the dead attempt left there (gloo: "connectFullMesh failed ...
    Connection refused", torch 2.13). None elsewhere: the env:// rendezvous as usual."""
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if attempt is None:
        return None
    store, _, _ = next(rendezvous("env://"))
    return dist.PrefixStore(f"stripes-attempt-{attempt}", store)


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
    """Mean of a tensor over ranks, elementwise (identity in a world of one)."""
    if dist.is_initialized():
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= dist.get_world_size()
    return value
