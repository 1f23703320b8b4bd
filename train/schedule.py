"""The learning-rate schedule: a pure function of the step.

`lr_at(step, ...)` computes the rate from the step index alone, and `apply_lr` writes it into
the optimizer before each step. There is no scheduler object (no `LambdaLR`) and so no
scheduler state: resuming needs only the step number the checkpoint already holds, and a run
resumed with a different `steps` or schedule simply follows the new curve from there.

Steps are 0-based optimizer-step indices in [0, total_steps). Every kind starts with the same
linear warmup: step s < warmup_steps gets peak x (s + 1) / warmup_steps, so the first step
already moves the weights and step warmup_steps - 1 is at the peak. After warmup:

    cosine    half a cosine from peak (at step warmup_steps) to peak x min_lr_ratio at the
              last step (Loshchilov & Hutter, 2017, without restarts)
    wsd       warmup-stable-decay: the peak until the last `decay_fraction` of all steps,
              which fall linearly to peak x min_lr_ratio at the last step (Hu et al., 2024,
              MiniCPM); the decay never starts before warmup ends
    constant  the peak

If warmup covers every step there is nothing after it, and the last step is at the peak.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from stripes.core.config import ConfigError
from stripes.train.config import ScheduleConfig


def _cosine(step: int, cfg: ScheduleConfig, total_steps: int) -> float:
    span = total_steps - 1 - cfg.warmup_steps  # steps after the first post-warmup one
    progress = (step - cfg.warmup_steps) / span if span > 0 else 1.0
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def _wsd(step: int, cfg: ScheduleConfig, total_steps: int) -> float:
    decay_steps = max(1, round(cfg.decay_fraction * total_steps))
    start = max(cfg.warmup_steps, total_steps - decay_steps)
    if step < start:
        return 1.0
    # Step `start` is already below the peak and the last step lands exactly on the minimum.
    done = (step - start + 1) / (total_steps - start)
    return 1.0 + (cfg.min_lr_ratio - 1.0) * done


def _constant(step: int, cfg: ScheduleConfig, total_steps: int) -> float:
    return 1.0


# Multiplier of the peak rate after warmup, by `schedule.kind`.
AFTER_WARMUP: dict[str, Callable[[int, ScheduleConfig, int], float]] = {
    "cosine": _cosine,
    "wsd": _wsd,
    "constant": _constant,
}


def lr_at(step: int, cfg: ScheduleConfig, peak_lr: float, total_steps: int) -> float:
    """The learning rate of 0-based optimizer step `step` of a `total_steps`-step run."""
    shape = AFTER_WARMUP.get(cfg.kind)
    if shape is None:
        raise ConfigError("schedule.kind", cfg.kind, ", ".join(AFTER_WARMUP))
    if total_steps < 1:
        raise ValueError(f"total_steps={total_steps}: the schedule needs at least one step")
    if not 0 <= step < total_steps:
        raise ValueError(f"step={step} is outside the schedule's steps 0..{total_steps - 1}")
    if not 0 <= cfg.warmup_steps <= total_steps:
        raise ConfigError("schedule.warmup_steps", cfg.warmup_steps, f"0..{total_steps}")
    if step < cfg.warmup_steps:
        return peak_lr * (step + 1) / cfg.warmup_steps
    return peak_lr * shape(step, cfg, total_steps)


def apply_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set `lr` on every parameter group (both AdamW groups share one schedule).

    A tensor learning rate (kept for CUDA-graph capture) is filled in place, because replacing
    it with a float would detach it from the captured graph.
    """
    for group in optimizer.param_groups:
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr
