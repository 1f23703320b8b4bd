"""The gated output norms of Mamba-2 and RetNet in one pass each way (formula in
reference.py): Mamba-2's rmsnorm((y + D x) * silu(z)) * w per group of heads, and RetNet's
GroupNorm(y) * w * silu(g) per head.

Unfused, each is six or seven elementwise ops over [B, T, C] in float32, every one a round
trip through memory and most of them saved for backward; fused, the forward reads y, z (and
x) once and writes out, and the backward recomputes the rest from them and a float32 rstd
(and mean) per row and group.
"""

from __future__ import annotations

import torch
from torch import Tensor

from stripes.kernels.dispatch import use_triton
from stripes.kernels.gated_norm import reference

TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_GROUP = 8192  # a program keeps a whole group in registers; wider groups run the reference

__all__ = ["gated_norm"]


def gated_norm(y: Tensor, z: Tensor, weight: Tensor, group_size: int, eps: float,
               x: Tensor | None = None, skip: Tensor | None = None, *,
               centered: bool = False, gate_first: bool = True) -> Tensor:
    """out [..., C] in z's dtype.

    y, z, x: [..., C] (x and skip together or neither); weight, skip: [C]; group_size
    divides C, and each row's channels are normalised in groups of group_size consecutive
    ones: RMS, or centered (mean removed first, GroupNorm's way). gate_first: the gate
    silu(z) multiplies before the norm (Mamba-2), else after it (RetNet). Gradients flow to
    y, z, x, weight and skip (weight's and skip's summed in float32, returned in their
    dtypes).

    CUDA tensors all in float32, bfloat16 or float16, with groups of at most MAX_GROUP
    channels, run the Triton kernels (float32 math, views with channel stride 1 read in
    place); everything else runs the reference, whose math is in promote_types(y, z,
    float32). Bad shapes raise ValueError.
    """
    tensors = [t for t in (y, z, weight, x, skip) if t is not None]
    fits = group_size <= MAX_GROUP and all(t.dtype in TRITON_DTYPES for t in tensors)
    if fits and use_triton(*tensors):
        from stripes.kernels.gated_norm.kernel import gated_norm_triton

        return gated_norm_triton(y, z, weight, group_size, eps, x, skip, centered=centered,
                                 gate_first=gate_first)
    return reference.gated_norm(y, z, weight, group_size, eps, x, skip, centered=centered,
                                gate_first=gate_first)
