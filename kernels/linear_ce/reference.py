"""Plain PyTorch linear + cross-entropy: the full [N, V] logits, then F.cross_entropy.

This is the readable definition the Triton path is tested against, and what CPU (and float64)
runs. It materialises the logits in float32, so it needs N * V * 4 bytes (plus as much again
for their gradient): fine for tests and small vocabularies, not for a training step at scale.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

REDUCTIONS = ("mean", "sum")


def check_inputs(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                 ignore_index: int, reduction: str, chunk_tokens: int | None,
                 check_targets: bool = True) -> int | None:
    """Raise ValueError on bad shapes, dtypes or targets; return the number of counted targets
    (None without `check_targets`: shapes and dtypes only, nothing read back).

    The target check and the count are one fused reduction read back to the host: a single
    device synchronisation per call (on CUDA it waits for work already queued, typically the
    model's forward, before the loss can start; it adds no extra pass over large tensors).
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"x must be [N, D] and weight [V, D], got x {tuple(x.shape)} and "
                         f"weight {tuple(weight.shape)}")
    if targets.shape != (x.shape[0],) or targets.dtype != torch.int64:
        raise ValueError(f"targets must be int64 [N] with N = {x.shape[0]}, got "
                         f"{targets.dtype} {tuple(targets.shape)}")
    if x.dtype != weight.dtype or not x.is_floating_point():
        raise ValueError(f"x and weight must share one floating dtype, got {x.dtype} and "
                         f"{weight.dtype} (under autocast the public function casts both)")
    if chunk_tokens is not None and chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be a positive row count or None, got {chunk_tokens}")
    if not check_targets:
        return None
    vocab = weight.shape[0]
    counted = targets != ignore_index  # [N]
    out_of_range = counted & ((targets < 0) | (targets >= vocab))  # [N]
    count, bad = torch.stack((counted.sum(), out_of_range.sum())).tolist()  # the one sync
    if bad:
        raise ValueError(f"{bad} targets lie outside [0, {vocab}) and are not "
                         f"ignore_index={ignore_index}")
    return count


def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         ignore_index: int = -100, reduction: str = "mean",
                         chunk_tokens: int | None = None) -> torch.Tensor:
    """x [N, D], weight [V, D], targets [N] int64 -> float32 scalar loss (float64 for float64).

    logits = x @ weight^T in float32; "sum" adds the per-token cross-entropy of the targets
    that are not ignore_index, "mean" divides that sum by their count (0.0, with zero
    gradients, when every target is ignored). chunk_tokens is accepted for signature parity
    and ignored: this path always builds the whole [N, V] logits.
    """
    count = check_inputs(x, weight, targets, ignore_index, reduction, chunk_tokens)
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    # Autocast would run F.linear in bf16; the reference's point is float32 logits.
    with torch.autocast(x.device.type, enabled=False):
        logits = F.linear(x.to(dtype), weight.to(dtype))  # [N, V]
    total = F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction="sum")
    if reduction == "sum":
        return total
    return total / max(count, 1)
