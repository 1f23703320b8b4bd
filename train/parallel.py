"""Wrap an unmodified StripedLM for training, from outside, in one documented order:

    1. activation checkpointing   per block: `block` recomputes the whole block in backward,
                                  `selective` only its cheap ops (train/recompute.py)
    2. torch.compile              per block (small graphs, compiled once, reused by every block
                                  of the same kind and shape; the first block, called with no
                                  previous output to add, gets its own)
    3. data parallelism           `ddp`: DistributedDataParallel over the whole model;
                                  `fsdp`: FSDP2 `fully_shard` on each block, then the root

The order matters: checkpointing wraps the eager block so that compile sees the recompute
region, and FSDP goes last so that its all-gathers surround the compiled, checkpointed block.

Precision under FSDP: by default parameters are all-gathered in float32 and the loop's bf16
autocast does the casting, exactly as in one process. `parallel.fsdp.bf16_params: true`
all-gathers bf16 copies instead (half the traffic; blocks whose mixer declares float32
parameters, such as poles, decays and A_log, stay float32), which also puts the residual
stream and the norms in bf16. Gradients are reduced in float32 either way.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from stripes.arch.model import StripedLM
from stripes.core.log import note_once
from stripes.train.config import ParallelConfig
from stripes.train.distributed import World, join_one_rank_group
from stripes.train.recompute import apply_activation_checkpointing


def resolve_backend(requested: str, world: World) -> str:
    """`auto`: one process -> single; several -> fsdp."""
    if requested != "auto":
        return requested
    return "single" if world.world_size == 1 else "fsdp"


def parallelize(model: StripedLM, cfg: ParallelConfig, backend: str, world: World,
                bf16: bool) -> nn.Module:
    """Return the module the training step calls; `model` stays the bare StripedLM."""
    if backend == "single" and world.world_size > 1:
        raise ValueError(f"parallel.backend=single with {world.world_size} processes: use "
                         "ddp or fsdp (or auto)")
    if backend != "single":
        join_one_rank_group(world)
    prepare_blocks(model, cfg)
    wrap = _WRAPPERS[backend]
    wrapped = wrap(model, cfg, world, bf16)
    note_once(f"parallel: backend={backend}, world={world.world_size}, "
              f"activation_checkpointing={cfg.activation_checkpointing}, compile={cfg.compile}")
    return wrapped


def prepare_blocks(model: StripedLM, cfg: ParallelConfig) -> None:
    """Steps 1 and 2, in place: activation checkpointing, then compile, per block."""
    apply_activation_checkpointing(model, cfg.activation_checkpointing)
    if cfg.compile:
        for block in model.blocks:
            block.compile()


def _single(model: StripedLM, cfg: ParallelConfig, world: World, bf16: bool) -> nn.Module:
    return model


def _ddp(model: StripedLM, cfg: ParallelConfig, world: World, bf16: bool) -> nn.Module:
    ids = [world.device.index] if world.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def _fsdp(model: StripedLM, cfg: ParallelConfig, world: World, bf16: bool) -> nn.Module:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    def policy(keep_fp32: bool) -> MixedPrecisionPolicy:
        cast = bf16 and cfg.fsdp.bf16_params and not keep_fp32
        param_dtype = torch.bfloat16 if cast else None
        return MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)

    for block in model.blocks:
        mixer = getattr(block, "_checkpoint_wrapped_module", block).mixer
        fully_shard(block, mp_policy=policy(bool(mixer.fp32_params)))
    fully_shard(model, mp_policy=policy(keep_fp32=False))
    return model


_WRAPPERS = {"single": _single, "ddp": _ddp, "fsdp": _fsdp}
