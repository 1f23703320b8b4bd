"""Reference for Hyena's gated long convolution by FFT: the composition the mixer used to
run, q * (h * (k v)) with stripes.arch.hyena_filters.fft_causal_conv, under autograd."""

from __future__ import annotations

import torch

from stripes.arch.hyena_filters import fft_causal_conv


def fft_gated_conv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   h: torch.Tensor) -> torch.Tensor:
    """q, k, v [B, T, C], h [C, L] -> q * (h * (k v)) [B, T, C] in q's dtype."""
    return q * fft_causal_conv(k * v, h)
