"""Hyena's gated causal conv with grouped filters, out = q * (h * (k v)), as block-Toeplitz
matmuls on tensor cores (formula in reference.py, method in kernel.py).

With one filter a channel, a causal conv is elementwise work: stripes.kernels.causal_conv
walks the taps on CUDA cores, about 0.28 ms a tap at B16 T4096 D2048 on an H200, so at
Hyena-MR's 128 taps it lost to an FFT (BENCHMARKS.md). When groups of channels share a
filter (StripedHyena 2 shares each SE and MR filter among a group of channels), the conv of
one block of steps is a matmul: a Toeplitz matrix of taps times the group's [steps,
channels] tile. Tensor
cores make the taps cheap: each 64 taps more add one [64, 64] piece, four matmuls per block
forward and backward, to a kernel that otherwise costs about what reading q, k, v and
writing out costs.
"""

from __future__ import annotations

import torch

from stripes.kernels.causal_conv import causal_conv
from stripes.kernels.dispatch import use_triton
from stripes.kernels.toeplitz_conv.reference import check_inputs

TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MIN_GROUP = 16  # channels a filter must cover: a tensor-core matmul's narrowest side


def fits(channels: int, groups: int) -> bool:
    """Whether C channels in G filter groups suit the kernel: groups of a multiple of 16."""
    return channels % groups == 0 and (channels // groups) % MIN_GROUP == 0


def toeplitz_gated_conv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, h: torch.Tensor,
                        positions: torch.Tensor | None = None) -> torch.Tensor:
    """q, k, v [B, T, C]; h [G, L] float, filter g shared by channels g C/G .. (g+1) C/G - 1,
    tap j multiplying (k v)[t - j]; positions [B, T] integers, steps since each token's
    document start (None: one document a row). Returns out [B, T, C] in q's dtype;
    gradients flow to q, k, v and h.

    CUDA activations of a Triton dtype, with C/G a multiple of 16 and channel stride 1, run
    the Triton kernels; everything else runs stripes.kernels.causal_conv with the filters
    spread to one a channel (its per-channel kernel on CUDA, its reference elsewhere). Bad
    shapes raise ValueError."""
    check_inputs(q, k, v, h, positions)
    acts = (q, k, v)
    if (use_triton(*acts, h) and all(t.dtype == q.dtype for t in acts)
            and q.dtype in TRITON_DTYPES and fits(q.shape[2], h.shape[0])
            and all(t.stride(2) == 1 for t in acts)):
        from stripes.kernels.toeplitz_conv.kernel import toeplitz_conv_triton

        return toeplitz_conv_triton(q, k, v, h, positions)
    spread = h.repeat_interleave(q.shape[2] // h.shape[0], dim=0)  # [C, L]
    return causal_conv(k, spread, x2=v, gate=q, positions=positions)
