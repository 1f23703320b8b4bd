"""Hyena's gated long convolution, out = q * (h * (k v)), by FFT with a hand-written
backward that keeps nothing but its inputs.

Under plain autograd the composition saves k v in float32, its spectrum and the product of
spectra (complex, [B, T + 1, C] each at n = 2T) for backward: about 10 float32 copies of the
activation per layer. Here forward saves q, k, v and h (which exist anyway) and backward
recomputes the spectra it needs:

    y  = irfft(U H)[:T],  U = rfft(k v, 2T),  H = rfft(h, 2T)        out = q y
    g  = dout q           dq = dout y
    du = irfft(G conj(H))[:T]   (the transposed convolution, G = rfft(g, 2T))
    dk = du v,  dv = du k,  dh[c, j] = irfft(sum_b G conj(U))[j] for j < min(L, T)

Zero padding to n = 2T keeps every circular product equal to the linear one on the outputs
kept (a wrapped index lands in the padding). Transforms run along time on [B, T, C] as it
lies (no transposed copies), in float32 (float64 for float64 inputs) with autocast off.
Taps at or beyond T reach no output and get zero gradient.
"""

from __future__ import annotations

import torch

from stripes.arch.hyena_filters import compute_dtype


def _spectra(q, k, v, h):
    """(dtype, n, U [B, n/2+1, C], H [n/2+1, C]) in the compute dtype."""
    T = q.shape[1]
    dtype, n = compute_dtype(q, k, v, h), 2 * T
    u = k.to(dtype) * v.to(dtype)  # [B, T, C]
    U = torch.fft.rfft(u, n=n, dim=1)  # [B, n/2+1, C]
    H = torch.fft.rfft(h[:, :T].to(dtype), n=n, dim=1).T  # [n/2+1, C]
    return dtype, n, U, H


class FFTGatedConvFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, h):
        with torch.autocast(q.device.type, enabled=False):
            dtype, n, U, H = _spectra(q, k, v, h)
            y = torch.fft.irfft(U * H, n=n, dim=1)[:, :q.shape[1]]  # [B, T, C]
            out = (q.to(dtype) * y).to(q.dtype)
        ctx.save_for_backward(q, k, v, h)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        q, k, v, h = ctx.saved_tensors
        T, L = q.shape[1], h.shape[1]
        with torch.autocast(q.device.type, enabled=False):
            dtype, n, U, H = _spectra(q, k, v, h)
            y = torch.fft.irfft(U * H, n=n, dim=1)[:, :T]
            dout = dout.to(dtype)
            dq = (dout * y).to(q.dtype)
            del y
            G = torch.fft.rfft(dout * q.to(dtype), n=n, dim=1)  # [B, n/2+1, C]
            du = torch.fft.irfft(G * H.conj(), n=n, dim=1)[:, :T]  # [B, T, C]
            dk = (du * v.to(dtype)).to(k.dtype)
            dv = (du * k.to(dtype)).to(v.dtype)
            del du
            # sum_b G conj(U) without a [B, n/2+1, C] product tensor
            taps = torch.fft.irfft(torch.einsum("bfc,bfc->fc", G, U.conj()), n=n, dim=0)
            dh = torch.zeros(h.shape, dtype=h.dtype, device=h.device)
            dh[:, :min(L, T)] = taps[:min(L, T)].T.to(h.dtype)
        return dq, dk, dv, dh


def fft_gated_conv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   h: torch.Tensor) -> torch.Tensor:
    """q * (h * (k v)): q, k, v [B, T, C] (any floating dtype), h [C, L] with tap j
    multiplying (k v)[t - j]; returns [B, T, C] in q's dtype. Gradients flow to all four."""
    shapes_agree = q.shape == k.shape == v.shape and q.dim() == 3
    if not shapes_agree or h.dim() != 2 or h.shape[0] != q.shape[2]:
        raise ValueError(f"fft_gated_conv: q, k, v must be [B, T, C] and h [C, L], got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}, "
                         f"{tuple(h.shape)}")
    return FFTGatedConvFunction.apply(q, k, v, h)
