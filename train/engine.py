"""What the training loop drives: one interface over every backend.

    engine = build_engine(model, cfg, backend, world, accum, bf16)
    for each micro-batch:
        with engine.accumulating(last=...):      # DDP no_sync / DeepSpeed's boundary /
                                                 # a single process's StepFusion
            loss = engine.module(ids, doc_ids, targets) / accum   # fused head + loss
            engine.backward(loss)
    grad_norm, applied = engine.step(lr, loss_finite)   # clip, guard, update, zero grads
    float(loss), float(grad_norm), bool(applied)        # one host read, after the next step
                                                        # is queued (train/outcomes.py)
    save_checkpoint(..., engine.states, ...)            # the backend's checkpoint format

`TorchEngine` serves single, ddp and fsdp (train/parallel.py wraps the model; a torch AdamW
steps it; DCP checkpoints). `DeepSpeedEngine` (train/deepspeed_engine.py) serves ZeRO 1-3.
The loop knows nothing else about either, so a backend is one class here and one entry in
`ENGINES`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Protocol

import torch
from torch import nn

from stripes.arch.model import StripedLM
from stripes.arch.projection import StepFusion
from stripes.train.checkpoint import DcpStates, States
from stripes.train.config import TrainConfig
from stripes.train.distributed import World
from stripes.train.optim import build_optimizer
from stripes.train.parallel import parallelize
from stripes.train.schedule import apply_lr


class Engine(Protocol):
    model: StripedLM  # the bare model: FLOPs, parameter names
    module: nn.Module  # what the forward calls
    states: States  # its checkpoint format

    def accumulating(self, last: bool) -> AbstractContextManager: ...

    def backward(self, loss: torch.Tensor) -> None: ...

    def step(self, lr: float, loss_finite: torch.Tensor, frozen: Sequence[nn.Parameter] = ()
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """Apply the accumulated gradients at `lr` unless the loss (`loss_finite`, a 0-dim
        bool tensor) or the gradient norm is not finite, leaving `frozen` parameters as they
        are; always clear the gradients. Returns 0-dim tensors: the global gradient norm
        before clipping (over the parameters that train) and whether the update was applied.
        Reading them is the caller's business, after the step has been queued."""
        ...


class TorchEngine:
    """single, ddp, fsdp: the model wrapped by train/parallel.py and a torch AdamW."""

    def __init__(self, model: StripedLM, cfg: TrainConfig, backend: str, world: World,
                 accum: int, bf16: bool) -> None:
        self.model = model
        self.module = parallelize(model, cfg.parallel, backend, world, bf16)
        # After wrapping: FSDP2 swaps the parameters for sharded ones.
        self.optimizer = build_optimizer(model, cfg.optim, world.device.type)
        self.fused = bool(self.optimizer.defaults.get("fused"))
        self.states = DcpStates(model, self.optimizer)
        self.grad_clip = cfg.grad_clip
        # A single process shares casts and .grad across a step's micro-batches (nothing
        # else watches its gradients arrive; arch/projection.py); compiled blocks do not.
        # Checkpointed blocks free their casts between forward and backward: not cached.
        self.fusion = (StepFusion(cache_casts=cfg.parallel.activation_checkpointing == "none")
                       if backend == "single" and not cfg.parallel.compile else None)

    @contextlib.contextmanager
    def accumulating(self, last: bool):
        """Skip DDP's gradient all-reduce on all but the last micro-batch (FSDP2 needs
        nothing); a single process's micro-batches share casts and .grad (StepFusion)."""
        no_sync = getattr(self.module, "no_sync", None)
        with (no_sync() if no_sync is not None and not last else contextlib.nullcontext(),
              self.fusion.micro_batch() if self.fusion is not None
              else contextlib.nullcontext()):
            yield

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self, lr: float, loss_finite: torch.Tensor, frozen: Sequence[nn.Parameter] = ()
             ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.fusion is not None:  # the weights are about to move: their casts go now
            self.fusion.clear()
        apply_lr(self.optimizer, lr)
        for param in frozen:  # AdamW skips a parameter without a gradient: no move, no decay
            param.grad = None
        params = [p for p in self.model.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])  # a DTensor on FSDP2
        grad_norm = (norm.full_tensor() if hasattr(norm, "full_tensor") else norm).float()
        applied = loss_finite.to(grad_norm.device) & torch.isfinite(grad_norm)
        if self.fused:
            # The verdict stays on the device: fused AdamW reads found_inf there and, when it
            # is 1, leaves parameters, moments and step counts as they were. No host sync
            # between backward and the update. Clipping rides along: the kernel divides each
            # gradient by grad_scale as it reads it (and stores the result back), one write
            # of every gradient instead of clipping's own read and write.
            self.optimizer.found_inf = (~applied).float()
            self.optimizer.grad_scale = _clip_divisor(grad_norm, self.grad_clip)
            self.optimizer.step()
        elif applied:  # the foreach kernels take no such flags: the host reads the verdict
            if self.grad_clip is not None:
                torch.nn.utils.clip_grads_with_norm_(params, self.grad_clip, norm)
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm, applied


def _clip_divisor(grad_norm: torch.Tensor, max_norm: float | None) -> torch.Tensor | None:
    """What to divide the gradients by to clip their norm to `max_norm`: the reciprocal of
    torch's clip_grad_norm_ coefficient (1 when the norm is within bounds)."""
    if max_norm is None:
        return None
    return torch.clamp((grad_norm + 1e-6) / max_norm, min=1.0)


def _deepspeed(model: StripedLM, cfg: TrainConfig, backend: str, world: World, accum: int,
               bf16: bool) -> Engine:
    from stripes.train.deepspeed_engine import DeepSpeedEngine  # deepspeed is optional

    return DeepSpeedEngine(model, cfg, world, accum, bf16)


ENGINES: dict[str, Callable[..., Engine]] = {
    "single": TorchEngine, "ddp": TorchEngine, "fsdp": TorchEngine, "deepspeed": _deepspeed}


def build_engine(model: StripedLM, cfg: TrainConfig, backend: str, world: World, accum: int,
                 bf16: bool) -> Engine:
    return ENGINES[backend](model, cfg, backend, world, accum, bf16)
