"""Fused RMSNorm, optionally with the pre-norm residual add in the same pass."""

from __future__ import annotations

import torch
from torch import Tensor

from stripes.kernels.dispatch import use_triton
from stripes.kernels.rmsnorm import reference

# What the Triton kernels take; anything else (float64 models on CUDA, rows wider than
# MAX_D, which a program keeps whole in registers) runs the reference.
TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_D = 65536

__all__ = ["rms_norm"]


def rms_norm(x: Tensor, weight: Tensor, eps: float, residual: Tensor | None = None,
             out_dtype: torch.dtype | None = None) -> Tensor | tuple[Tensor, Tensor]:
    """RMSNorm over the last dim (Zhang & Sennrich, 2019), optionally fused with a residual add.

    Shapes: x [..., D], weight [D], residual (optional) x's shape. ValueError otherwise.

    Without residual: returns y = x / sqrt(mean(x^2) + eps) * weight, in x's dtype.

    With residual: h = residual + x (added in float32, stored in residual's dtype) and
    y = rms_norm(h) in h's dtype; returns (y, h). This is the pre-norm block's "add the mixer
    output to the residual stream, then normalise for the MLP", in one read of x and residual;
    it equals the unfused `h = residual + x; y = rms_norm(h)`. h is an output in its own
    right (the next residual stream), so gradients reaching y and h both flow back to x and
    residual.

    out_dtype: y's dtype when given (h keeps residual's). The pre-norm block asks for the
    autocast dtype, so the projections that read y do not each cast a float32 copy of it.

    Numerics: the mean square, rstd and all products are float32 (float64 inputs stay float64
    in the reference). weight is read in its own dtype (a float32 weight with bfloat16 x under
    autocast is fine) and its gradient comes back in that dtype, summed in float32 over rows.
    Gradients of x and residual come back in their own dtypes.

    Dispatch: CUDA tensors in float32/bfloat16/float16 with D <= MAX_D and triton installed
    run the Triton kernels (the backward recomputes the normalised row from h, or x, and a
    saved float32 rstd per row); everything else runs the PyTorch reference, same signature.
    """
    tensors = (x, weight) if residual is None else (x, weight, residual)
    fits = x.shape[-1] <= MAX_D and all(t.dtype in TRITON_DTYPES for t in tensors)
    if fits and use_triton(*tensors):
        from stripes.kernels.rmsnorm.kernel import rms_norm_triton

        return rms_norm_triton(x, weight, eps, residual, out_dtype)
    return reference.rms_norm(x, weight, eps, residual, out_dtype)
