"""`parallel.backend: deepspeed`: ZeRO stages 1-3 behind the loop's Engine interface.

    parallel:
      backend: deepspeed
      deepspeed: {zero_stage: 2, offload_optimizer: false, config: null}

The DeepSpeed config is generated from the stripes config (`deepspeed_config`): batch sizes
from the batch plan, gradient clipping, the ZeRO stage, optional CPU offload of the optimizer.
A user's JSON (`config:`) is merged over it, key by key, and wins. What stays stripes':
- the optimizer: stripes' torch AdamW (parameter groups, fused on CUDA), handed to DeepSpeed,
  so nothing is compiled at start-up;
- the learning rate: set on the optimizer's groups every step from stripes' schedule;
- precision: DeepSpeed's own bf16/fp16 modes are off; its `torch_autocast` runs the forward
  in bf16 autocast over float32 parameters, as the other backends do. So parameters that
  mixers declare float32 stay float32, with float32 gradient reduction; the price is
  float32 all-gathers under ZeRO-3, where FSDP gathers most blocks in bf16;
- activation checkpointing and compile: applied to the blocks before DeepSpeed wraps them.

The guard: DeepSpeed checks the gradients for inf/NaN before each update and skips the update
when it finds one (a non-finite loss always gives such gradients); `step` reports that.

Checkpoints: DeepSpeed's own save (model, optimizer, ZeRO partitions) under `deepspeed/` in
the stripes checkpoint directory, beside stripes' trainer.json and RNG states. A stripes
(DCP) checkpoint starts a DeepSpeed run with its weights and a fresh optimizer; the other
way, `DcpStates` reads a DeepSpeed checkpoint's consolidated weights (train/checkpoint.py).
"""

from __future__ import annotations

import json
import os
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch

from stripes.arch.model import StripedLM
from stripes.core.config import ConfigError
from stripes.core.log import log
from stripes.train.config import TrainConfig
from stripes.train.dcp_states import CheckpointMismatch, check_shapes, read_dcp_weights
from stripes.train.distributed import World, join_one_rank_group
from stripes.train.optim import build_optimizer, canonical_name
from stripes.train.parallel import prepare_blocks
from stripes.train.schedule import apply_lr

TAG = "deepspeed"  # the subdirectory of a stripes checkpoint DeepSpeed writes into


def import_deepspeed(cpu: bool) -> Any:
    """deepspeed, or a one-line error naming the extra to install."""
    try:
        import deepspeed
    except ImportError:
        raise ConfigError("parallel.backend", "deepspeed", "pip install 'stripes[deepspeed]' "
                          "first, or another backend", "deepspeed is not installed") from None
    if cpu:
        # Its shared-memory CPU collective compiles a C++ op for ~1 minute on first use; gloo
        # does the same job without the wait.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    return deepspeed


def deepspeed_config(cfg: TrainConfig, world_size: int, accum: int,
                     bf16: bool) -> dict[str, Any]:
    """The DeepSpeed JSON for `cfg` on `world_size` ranks, the user's file merged over it."""
    ds = cfg.parallel.deepspeed
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    generated = {
        "train_batch_size": cfg.micro_batch * accum * world_size,
        "train_micro_batch_size_per_gpu": cfg.micro_batch,
        "gradient_accumulation_steps": accum,
        "gradient_clipping": cfg.grad_clip or 0.0,
        "zero_optimization": zero,
        "bf16": {"enabled": False},  # DeepSpeed's bf16 mode would cast the parameters
        "fp16": {"enabled": False},
        # The engine's forward replaces any outer autocast with this one (off unless enabled),
        # so the loop's bf16 autocast must be declared here. No module is listed as safe for
        # lower-precision communication: gradients reduce in float32, as under FSDP.
        "torch_autocast": {"enabled": bf16, "dtype": "bfloat16",
                           "lower_precision_safe_modules": []},
        "zero_allow_untested_optimizer": True,  # a torch AdamW under ZeRO
        "steps_per_print": 2**31 - 1,  # stripes logs
    }
    if ds.config is None:
        return generated
    try:
        user = json.loads(Path(ds.config).read_text())
    except (OSError, ValueError) as err:
        raise ConfigError("parallel.deepspeed.config", ds.config, "a readable DeepSpeed JSON "
                          "file", str(err).splitlines()[0]) from None
    if not isinstance(user, dict):
        raise ConfigError("parallel.deepspeed.config", ds.config, "a JSON object")
    return _merge(generated, user)


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in over.items():
        both_dicts = isinstance(value, dict) and isinstance(base.get(key), dict)
        merged[key] = _merge(base[key], value) if both_dicts else value
    return merged


class DeepSpeedEngine:
    """The model inside a DeepSpeed engine, stepped by stripes' AdamW and schedule."""

    def __init__(self, model: StripedLM, cfg: TrainConfig, world: World, accum: int,
                 bf16: bool) -> None:
        cpu = world.device.type == "cpu"
        deepspeed = import_deepspeed(cpu)
        join_one_rank_group(world)
        os.environ.setdefault("LOCAL_RANK", str(world.local_rank))  # DeepSpeed reads it
        prepare_blocks(model, cfg.parallel)
        optimizer = build_optimizer(model, cfg.optim, world.device.type)
        config = deepspeed_config(cfg, world.world_size, accum, bf16)
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config,
                                               dist_init_required=False)
        self.model, self.module = model, engine
        self.states = DeepSpeedStates(engine, cfg.parallel.deepspeed.zero_stage)
        log.info("deepspeed: ZeRO stage %d%s, %d micro-batches per step, autocast %s",
                 cfg.parallel.deepspeed.zero_stage,
                 " with the optimizer offloaded to CPU" if cfg.parallel.deepspeed.offload_optimizer
                 else "", accum, "bf16" if bf16 else "off")

    def accumulating(self, last: bool) -> AbstractContextManager:
        self.module.set_gradient_accumulation_boundary(last)
        return nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        self.module.backward(loss, scale_wrt_gas=False)  # the loop already divided by accum

    def step(self, lr: float, loss_finite: torch.Tensor, frozen=()
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """DeepSpeed's own step (its clipping and its overflow check; `loss_finite` is not
        consulted: its boundary bookkeeping needs the step taken)."""
        if frozen:  # TrainConfig refuses `freeze` with this backend
            raise ValueError("DeepSpeedEngine cannot freeze parameters")
        apply_lr(self.module.optimizer, lr)
        self.module.step()
        norm = self.module.get_global_grad_norm()
        return (torch.tensor(float("nan") if norm is None else float(norm)),
                torch.tensor(self.module.was_step_applied()))


class DeepSpeedStates:
    """Checkpoint part written and read by DeepSpeed (`kind` "deepspeed")."""

    kind = "deepspeed"

    def __init__(self, engine: Any, zero_stage: int) -> None:
        self.engine, self.zero_stage = engine, zero_stage

    def save(self, directory: Path) -> None:
        self.engine.save_checkpoint(str(directory), tag=TAG, client_state={},
                                    save_latest=False)

    def load(self, directory: Path, saved_kind: str) -> None:
        if saved_kind == "dcp":
            self._load_weights(read_dcp_weights(directory))
            log.info("%s: a %s checkpoint: weights loaded, the optimizer starts fresh",
                     directory, saved_kind)
            return
        if saved_kind != self.kind:
            raise CheckpointMismatch(f"{directory}: a {saved_kind!r} checkpoint, which the "
                                     "deepspeed backend cannot read")
        path, _ = self.engine.load_checkpoint(str(directory), tag=TAG,
                                              load_optimizer_states=True,
                                              load_lr_scheduler_states=False)
        if path is None:
            raise CheckpointMismatch(f"{directory / TAG}: DeepSpeed found no checkpoint there")

    def _load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """Copy full tensors into the engine's parameters, then into ZeRO's float32 copies."""
        import deepspeed

        params = {canonical_name(n): p for n, p in self.engine.module.named_parameters()}
        # Under ZeRO-3 a parameter's own shape is its empty local stub; ds_shape is the full one.
        check_shapes(TAG, "model", {k: tuple(v.shape) for k, v in weights.items()},
                     {k: tuple(getattr(p, "ds_shape", p.shape)) for k, p in params.items()})
        gathered = (deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=0)
                    if self.zero_stage == 3 else nullcontext())
        with gathered, torch.no_grad():
            for name, param in params.items():
                param.copy_(weights[name])
        self.engine.optimizer.refresh_fp32_params()
