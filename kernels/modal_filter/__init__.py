"""Hyena-LI's modal filter h[g, t] = Re(sum_n R p^t), p = exp(-rate + i theta), built for the
sequence at hand (formula in reference.py).

Built by its definition, the filter goes through complex [G, N, T] powers: at G = 2048,
N = 16, T = 32k that is 4 GiB a tensor, several of them under autograd, and one Hyena-LI
layer peaked at 50 GiB and took 4x an attention layer's time (H100, BENCHMARKS.md). The
Triton kernels compute each tap and each gradient sum in registers; memory is the filter
itself.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from stripes.kernels.dispatch import use_triton
from stripes.kernels.modal_filter.reference import modal_filter as modal_filter_reference


class _ModalFilterFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rate, theta, residue_re, residue_im, length):
        from stripes.kernels.modal_filter.kernel import modal_filter_triton

        ctx.save_for_backward(rate, theta, residue_re, residue_im)
        return modal_filter_triton(rate, theta, residue_re, residue_im, length)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dh):
        from stripes.kernels.modal_filter.kernel import modal_filter_grads_triton

        return (*modal_filter_grads_triton(*ctx.saved_tensors, dh), None)


def modal_filter(rate: torch.Tensor, theta: torch.Tensor, residue_re: torch.Tensor,
                 residue_im: torch.Tensor, length: int) -> torch.Tensor:
    """Taps [G, length] in the parameters' dtype; rate, theta, residue_re, residue_im: [G, N]
    real, rate > 0. Gradients flow to all four.

    float32 CUDA parameters run the Triton kernels; elsewhere the reference, with its powers
    recomputed in backward rather than saved (at G = 2048, N = 16, T = 4096 they would hold
    3 GiB per layer)."""
    params = (rate, theta, residue_re, residue_im)
    if use_triton(*params) and all(p.dtype == torch.float32 for p in params):
        return _ModalFilterFunction.apply(*params, length)
    if not torch.is_grad_enabled():
        return modal_filter_reference(*params, length)
    return checkpoint(modal_filter_reference, *params, length, use_reentrant=False)
