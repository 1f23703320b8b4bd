"""Mamba-2's gated output norm with the D skip fused in (formula in reference.py):
out = rmsnorm_per_group((y + x * skip) * silu(z)) * weight, one pass forward, one backward.

Unfused, this is seven elementwise ops over [B, T, d_inner] in float32, each a round trip
through memory and most of them saved for backward; fused, the forward reads y, x, z once and
writes out, and the backward recomputes everything from them and a float32 rstd per row.
"""

from __future__ import annotations

import torch
from torch import Tensor

from stripes.kernels.dispatch import use_triton
from stripes.kernels.gated_rmsnorm import reference

TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_GROUP = 8192  # a program keeps a whole group in registers; wider groups run the reference

__all__ = ["gated_rms_norm"]


def gated_rms_norm(y: Tensor, z: Tensor, weight: Tensor, group_size: int, eps: float,
                   x: Tensor | None = None, skip: Tensor | None = None) -> Tensor:
    """out [..., C] in z's dtype.

    y, z, x: [..., C] (x and skip together or neither); weight, skip: [C]; group_size
    divides C, and each row's channels are normalised in groups of group_size consecutive
    ones. Gradients flow to y, z, x, weight and skip (weight's and skip's summed in float32,
    returned in their dtypes).

    CUDA tensors all in float32, bfloat16 or float16, with groups of at most MAX_GROUP
    channels, run the Triton kernels (float32 math,
    views with channel stride 1 read in place); everything else runs the reference, whose
    math is in promote_types(y, z, float32). Bad shapes raise ValueError.
    """
    tensors = [t for t in (y, z, weight, x, skip) if t is not None]
    fits = group_size <= MAX_GROUP and all(t.dtype in TRITON_DTYPES for t in tensors)
    if fits and use_triton(*tensors):
        from stripes.kernels.gated_rmsnorm.kernel import gated_rms_norm_triton

        return gated_rms_norm_triton(y, z, weight, group_size, eps, x, skip)
    return reference.gated_rms_norm(y, z, weight, group_size, eps, x, skip)
