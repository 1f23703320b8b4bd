"""Mamba-2's output norm with its skip term, in plain PyTorch: the readable definition the
Triton kernel must match. Autograd differentiates it, so it also defines the gradients.

    u   = y + x * skip                  (skip [C]: D_h repeated over the head's channels)
    h   = u * silu(z)
    out = h / sqrt(mean_group(h^2) + eps) * weight

over groups of `group_size` consecutive channels, in at least float32, returned in z's dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def check_inputs(y: Tensor, z: Tensor, weight: Tensor, group_size: int,
                 x: Tensor | None, skip: Tensor | None) -> None:
    """Raise ValueError on shapes that do not fit [..., C] with C split into groups."""
    C = y.shape[-1] if y.dim() else 0
    if y.dim() < 1 or C < 1:
        raise ValueError(f"gated_rms_norm: y must be [..., C] with C >= 1, got {tuple(y.shape)}")
    if z.shape != y.shape:
        raise ValueError(f"gated_rms_norm: z must have y's shape {tuple(y.shape)}, got "
                         f"{tuple(z.shape)}")
    if weight.shape != (C,):
        raise ValueError(f"gated_rms_norm: weight must be [C] = [{C}], got "
                         f"{tuple(weight.shape)}")
    if group_size < 1 or C % group_size:
        raise ValueError(f"gated_rms_norm: group_size {group_size} must divide C = {C}")
    if (x is None) != (skip is None):
        raise ValueError("gated_rms_norm: x and skip go together (both or neither)")
    if x is not None and x.shape != y.shape:
        raise ValueError(f"gated_rms_norm: x must have y's shape {tuple(y.shape)}, got "
                         f"{tuple(x.shape)}")
    if skip is not None and skip.shape != (C,):
        raise ValueError(f"gated_rms_norm: skip must be [C] = [{C}], got {tuple(skip.shape)}")


def gated_rms_norm(y: Tensor, z: Tensor, weight: Tensor, group_size: int, eps: float,
                   x: Tensor | None = None, skip: Tensor | None = None) -> Tensor:
    check_inputs(y, z, weight, group_size, x, skip)
    dtype = torch.promote_types(torch.promote_types(y.dtype, z.dtype), torch.float32)
    u = y.to(dtype)
    if x is not None:
        u = u + x.to(dtype) * skip.to(dtype)
    gated = u * F.silu(z.to(dtype))  # [..., C]
    groups = gated.unflatten(-1, (-1, group_size))  # [..., G, C / G]
    normed = F.rms_norm(groups, (group_size,), eps=eps).flatten(-2)  # [..., C]
    return (normed * weight.to(dtype)).to(z.dtype)
