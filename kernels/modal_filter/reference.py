"""Hyena-LI's modal filter from its poles and residues, by its definition (the reference the
Triton kernel is tested against):

    h[g, t] = Re( sum_n R[g, n] p[g, n]^t ),   p = exp(-rate + i theta),   t < length

All four parameters are real [G, N]; R = residue_re + i residue_im. The powers are formed
as exp(t (-rate + i theta)), so the error does not grow with t. This materialises the
complex [G, N, length] powers: 8 bytes a mode, a tap and a filter, 4 GiB at G = 2048,
N = 16, T = 32k, which is why training on a GPU uses the kernel.
"""

from __future__ import annotations

import torch


def rate_powers(rate: torch.Tensor, theta: torch.Tensor, times: torch.Tensor) -> torch.Tensor:
    """p^t = exp(t (-rate + i theta)) for each mode and each t in `times` ([K]): complex
    [G, N, K] in the parameters' precision."""
    t = times.to(rate.dtype)  # [K]
    return torch.exp(torch.complex(-rate[..., None] * t, theta[..., None] * t))


def modal_filter(rate: torch.Tensor, theta: torch.Tensor, residue_re: torch.Tensor,
                 residue_im: torch.Tensor, length: int) -> torch.Tensor:
    """[G, length] in the parameters' dtype (float32 or float64). rate > 0."""
    powers = rate_powers(rate, theta, torch.arange(length, device=rate.device))  # [G, N, T]
    residues = torch.complex(residue_re, residue_im)[..., None]  # [G, N, 1]
    return (residues * powers).real.sum(1)  # [G, T]
