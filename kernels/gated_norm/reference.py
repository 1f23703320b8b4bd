"""The gated output norms of Mamba-2 and RetNet, in plain PyTorch: the readable definition
the Triton kernel must match. Autograd differentiates it, so it also defines the gradients.

    u    = y + x * skip                      (skip [C] optional: Mamba-2's D_h per channel)
    gate = silu(z)
    gate_first (Mamba-2):   out = norm(u * gate) * weight
    otherwise (RetNet):     out = norm(u) * weight * gate
    norm: over groups of `group_size` consecutive channels, RMS (x / rms(x)) or, centered,
          a LayerNorm without affine ((x - mean) / std: GroupNorm with one group per head)

in at least float32, returned in z's dtype.
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
        raise ValueError(f"gated_norm: y must be [..., C] with C >= 1, got {tuple(y.shape)}")
    if z.shape != y.shape:
        raise ValueError(f"gated_norm: z must have y's shape {tuple(y.shape)}, got "
                         f"{tuple(z.shape)}")
    if weight.shape != (C,):
        raise ValueError(f"gated_norm: weight must be [C] = [{C}], got {tuple(weight.shape)}")
    if group_size < 1 or C % group_size:
        raise ValueError(f"gated_norm: group_size {group_size} must divide C = {C}")
    if (x is None) != (skip is None):
        raise ValueError("gated_norm: x and skip go together (both or neither)")
    if x is not None and x.shape != y.shape:
        raise ValueError(f"gated_norm: x must have y's shape {tuple(y.shape)}, got "
                         f"{tuple(x.shape)}")
    if skip is not None and skip.shape != (C,):
        raise ValueError(f"gated_norm: skip must be [C] = [{C}], got {tuple(skip.shape)}")


def gated_norm(y: Tensor, z: Tensor, weight: Tensor, group_size: int, eps: float,
               x: Tensor | None = None, skip: Tensor | None = None, *,
               centered: bool = False, gate_first: bool = True) -> Tensor:
    check_inputs(y, z, weight, group_size, x, skip)
    dtype = torch.promote_types(torch.promote_types(y.dtype, z.dtype), torch.float32)
    u = y.to(dtype)
    if x is not None:
        u = u + x.to(dtype) * skip.to(dtype)
    gate = F.silu(z.to(dtype))  # [..., C]
    groups = (u * gate if gate_first else u).unflatten(-1, (-1, group_size))  # [..., G, C/G]
    norm = F.layer_norm if centered else F.rms_norm
    normed = norm(groups, (group_size,), eps=eps).flatten(-2) * weight.to(dtype)  # [..., C]
    return (normed if gate_first else normed * gate).to(z.dtype)
