"""PyTorch reference for the grouped gated causal conv: causal_conv's formula with each
filter shared by a group of channels,

    out[b, t, c] = q[b, t, c] sum_{j < L, j <= pos[b, t]} h[c // (C / G), j] (k v)[b, t - j, c]

computed by expanding h to one filter a channel and running causal_conv's reference.
"""

from __future__ import annotations

import torch

from stripes.kernels.causal_conv.reference import causal_conv


def check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, h: torch.Tensor,
                 positions: torch.Tensor | None) -> None:
    if q.dim() != 3 or not q.shape == k.shape == v.shape:
        raise ValueError(f"toeplitz_gated_conv: q, k, v must be [B, T, C] alike, got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if h.dim() != 2 or h.shape[0] == 0 or q.shape[2] % h.shape[0]:
        raise ValueError(f"toeplitz_gated_conv: h must be [G, L] with G dividing C = "
                         f"{q.shape[2]}, got {tuple(h.shape)}")
    if positions is not None and positions.shape != q.shape[:2]:
        raise ValueError(f"toeplitz_gated_conv: positions must be [B, T] = "
                         f"{list(q.shape[:2])}, got {tuple(positions.shape)}")


def toeplitz_gated_conv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, h: torch.Tensor,
                        positions: torch.Tensor | None = None) -> torch.Tensor:
    check_inputs(q, k, v, h, positions)
    per_channel = h.repeat_interleave(q.shape[2] // h.shape[0], dim=0)  # [C, L]
    return causal_conv(k, per_channel, x2=v, gate=q, positions=positions)
