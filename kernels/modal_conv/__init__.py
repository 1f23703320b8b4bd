"""Hyena-LI's gated long convolution, out = q * (h * (k v)) with the modal filter
h[c, t] = Re(sum_n R p^t), as the recurrence that filter is: s[t] = p s[t-1] + k[t] v[t],
y[t] = Re(sum_n R_n s_n[t]) (formula in reference.py).

Done by its definition, the filter is built at the sequence's length ([C, T], from [C, N, T]
complex powers or stripes.kernels.modal_filter) and the convolution runs by FFT at n = 2T:
at hybrid-1b's width and 32k tokens that was about 29 of the layer's 37 ms forward and
backward on an H100 (the hyena_li row less the hyena_se row, whose only difference is the
long filter; BENCHMARKS.md); with this kernel the layer took 17.4 ms. The recurrence needs
neither: each token costs N complex multiply-adds a channel, and q, k, v are read and out
written once. The Triton kernels walk it by segments of time in parallel, passing states
between segments (kernel.py); backward is the adjoint recurrence, so nothing but the inputs
and the states entering each segment (a few MB) is kept.
"""

from __future__ import annotations

import torch

from stripes.kernels.dispatch import use_triton
from stripes.kernels.fft_conv import fft_gated_conv
from stripes.kernels.modal_conv.reference import (
    check_inputs,
    modal_gated_recurrence,
    per_channel,
)
from stripes.kernels.modal_conv.reference import modal_conv_continue as continue_reference
from stripes.kernels.modal_filter import modal_filter

TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def modal_gated_conv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rate: torch.Tensor,
                     theta: torch.Tensor, residue_re: torch.Tensor, residue_im: torch.Tensor,
                     positions: torch.Tensor | None = None) -> torch.Tensor:
    """q, k, v [B, T, C]; rate (> 0), theta, residue_re, residue_im [G, N] real: G filters,
    each shared by C / G channels; positions: [B, T] integers, the steps since each token's
    document start (None: one document a row). Returns out [B, T, C] in q's dtype;
    gradients flow to q, k, v and the four parameters.

    CUDA activations of a Triton dtype with float32 parameters run the Triton kernels
    (float32 math; q, k, v may be views with channel stride 1, e.g. chunks of one
    projection). Elsewhere, without positions, the filter is built
    (stripes.kernels.modal_filter) and convolved by FFT (stripes.kernels.fft_conv), as
    reference.py does but with those modules' memory-saving backward passes; with positions,
    the token-by-token recurrence runs (correct but slow: stripes.arch.hyena runs documents
    as separate rows there instead). Bad shapes raise ValueError."""
    params = (rate, theta, residue_re, residue_im)
    if runs_triton(q, k, v, *params):
        from stripes.kernels.modal_conv.function import modal_gated_conv_triton

        return modal_gated_conv_triton(q, k, v, *params, positions)
    check_inputs(q, k, v, *params, positions)
    if positions is not None:
        return modal_gated_recurrence(q, k, v, *params, positions)
    h = modal_filter(*params, q.shape[1])  # [G, T]
    return fft_gated_conv(q, k, v, per_channel(h, q.shape[2]))


def runs_triton(*tensors: torch.Tensor) -> bool:
    """Whether modal_gated_conv on these activations (then parameters) runs the Triton
    kernels: CUDA, activations of a Triton dtype, float32 parameters."""
    acts, params = tensors[:-4], tensors[-4:]
    return (use_triton(*tensors) and all(t.dtype in TRITON_DTYPES for t in acts)
            and all(p.dtype == torch.float32 for p in params))


def modal_conv_continue(u: torch.Tensor, rate: torch.Tensor, theta: torch.Tensor,
                        residue_re: torch.Tensor, residue_im: torch.Tensor,
                        state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Decoding's prefill: y = h * u for u [B, T, C] continuing from state (complex
    [B, C, N], the recurrence's state after the tokens before u), and the state after u.
    No gradients: under autograd, or off CUDA, or with a complex128 state, the reference
    (parallel form by FFT, [C, N, T] powers in memory) runs; otherwise the Triton kernels,
    whose memory does not grow with T beyond y itself."""
    params = (rate, theta, residue_re, residue_im)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (u, *params, state))
    if not needs_grad and state.dtype == torch.complex64 and runs_triton(u, *params):
        from stripes.kernels.modal_conv.function import modal_conv_continue_triton

        return modal_conv_continue_triton(u, *params, state)
    return continue_reference(u, *params, state)
