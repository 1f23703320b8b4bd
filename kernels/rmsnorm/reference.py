"""RMSNorm (+ residual add) in plain PyTorch: the readable definition the Triton kernel must
match. Autograd differentiates it, so it also defines the gradients."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def check_inputs(x: Tensor, weight: Tensor, residual: Tensor | None) -> None:
    """Raise ValueError when weight is not [D] for x [..., D] or residual's shape is not x's."""
    if x.dim() < 1 or x.shape[-1] < 1:
        raise ValueError(f"rms_norm: x must be [..., D] with D >= 1, got {tuple(x.shape)}")
    if weight.shape != (x.shape[-1],):
        raise ValueError(f"rms_norm: weight must be [D] = [{x.shape[-1]}] for x "
                         f"{tuple(x.shape)}, got {tuple(weight.shape)}")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"rms_norm: residual must have x's shape {tuple(x.shape)}, got "
                         f"{tuple(residual.shape)}")


def _norm(x: Tensor, weight: Tensor, eps: float, out_dtype: torch.dtype | None) -> Tensor:
    """x / sqrt(mean(x^2) + eps) * weight over the last dim, in at least float32, returned
    in out_dtype (None: x's)."""
    compute = torch.promote_types(x.dtype, torch.float32)  # float64 stays float64
    y = F.rms_norm(x.to(compute), (x.shape[-1],), weight.to(compute), eps)  # one fused op
    return y.to(out_dtype or x.dtype)


def rms_norm(x: Tensor, weight: Tensor, eps: float, residual: Tensor | None = None,
             out_dtype: torch.dtype | None = None) -> Tensor | tuple[Tensor, Tensor]:
    """Without residual: y = x / sqrt(mean(x^2) + eps) * weight in x's dtype.
    With residual: h = residual + x (added in at least float32, stored in residual's dtype),
    returns (rms_norm(h), h). out_dtype, when given, is y's dtype instead."""
    check_inputs(x, weight, residual)
    if residual is None:
        return _norm(x, weight, eps, out_dtype)
    compute = torch.promote_types(torch.promote_types(x.dtype, residual.dtype), torch.float32)
    h = (residual.to(compute) + x.to(compute)).to(residual.dtype)  # [..., D]
    return _norm(h, weight, eps, out_dtype), h
