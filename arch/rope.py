"""Rotary position embedding (Su et al., 2021, RoFormer), rotate-half layout.

Pairs are (x[i], x[i + Dh/2]), the layout of Hugging Face Llama checkpoints, so grafted
q/k projections need no permutation. Angles are computed in float64 for the positions at
hand (a float32 position x frequency product is off by ~0.1 rad at position 10^6) and the
rotation (kernels/rotary: `apply_rotary`) runs in at least float32: nothing depends on a
maximum length stored in the model.
`inv_frequencies` is the one place a frequency-scaling rule (long-context extension) plugs in.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from stripes.core.config import ConfigError


@dataclass
class RopeConfig:
    theta: float = 10000.0  # base of the frequencies theta^(-2i/Dh)


def check_rotary_heads(key: str, n_heads: int, d_model: int) -> None:
    """`n_heads` must split d_model into heads of even size (RoPE turns pairs of channels)."""
    if n_heads <= 0 or d_model % n_heads:
        raise ConfigError(key, n_heads, f"a divisor of d_model={d_model}",
                          "heads split d_model evenly")
    if (d_model // n_heads) % 2:
        raise ConfigError(key, n_heads, "a head size d_model/n_heads that is even",
                          "RoPE rotates pairs of channels")


def inv_frequencies(head_dim: int, theta: float,
                    device: torch.device | None = None) -> torch.Tensor:
    """theta^(-2i/Dh) for i in [0, Dh/2): [Dh/2] float64."""
    exponents = torch.arange(0, head_dim, 2, device=device, dtype=torch.float64) / head_dim
    return theta ** (-exponents)


def rope_angles(positions: torch.Tensor, head_dim: int, theta: float,
                dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """positions: [T] integer positions -> (cos, sin), each [T, Dh/2] in `dtype`."""
    freqs = torch.outer(positions.double(), inv_frequencies(head_dim, theta, positions.device))
    return freqs.cos().to(dtype), freqs.sin().to(dtype)
