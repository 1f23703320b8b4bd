"""Rotary position embedding (Su et al., 2021, RoFormer), rotate-half layout.

Pairs are (x[i], x[i + Dh/2]), the layout of Hugging Face Llama checkpoints, so grafted
q/k projections need no permutation. Angles are computed in float32 for the positions at
hand: nothing depends on a maximum length stored in the model. `inv_frequencies` is the one
place a frequency-scaling rule (long-context extension) plugs in.
"""

from __future__ import annotations

import torch


def inv_frequencies(head_dim: int, theta: float, device: torch.device | None = None) -> torch.Tensor:
    """theta^(-2i/Dh) for i in [0, Dh/2): [Dh/2] float32."""
    exponents = torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim
    return theta ** (-exponents)


def rope_angles(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """positions: [T] integer positions -> (cos, sin), each [T, Dh/2] float32."""
    freqs = torch.outer(positions.float(), inv_frequencies(head_dim, theta, positions.device))
    return freqs.cos(), freqs.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, T, H, Dh]; cos, sin: [T, Dh/2]. Rotates each (x1, x2) pair by its angle."""
    x1, x2 = x.float().chunk(2, dim=-1)  # each [B, T, H, Dh/2]
    cos, sin = cos[:, None, :], sin[:, None, :]  # [T, 1, Dh/2], broadcast over B and H
    out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return out.to(x.dtype)
