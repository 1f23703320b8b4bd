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
kept (a wrapped index lands in the padding). Taps at or beyond T reach no output and get zero
gradient. Everything runs in float32 (float64 for float64 inputs) with autocast off.

Every step but the filter's gradient is independent per sequence, so both passes walk the
batch in chunks of at most CHUNK_ELEMENTS padded elements: the padded float32 copy, the
spectra and the inverse transform exist for one chunk at a time, and the results are written
straight into the outputs in their own dtype. The transient memory is then a fixed workspace
instead of several float32 copies of the whole activation.

The product k v is written time-last into the padded buffer, [R, C, n], so every transform
runs over contiguous rows. Transforming along time where [B, T, C] lies (stride C) kept one
copy less but ran the whole op at 0.58x the plain composition's speed on an H200
(BENCHMARKS.md, 2026-12-02).
"""

from __future__ import annotations

import torch

from stripes.arch.hyena_filters import compute_dtype
from stripes.kernels.dispatch import recomputes_in_backward

CHUNK_ELEMENTS = 1 << 25  # padded elements per batch chunk: 128 MiB in float32


def _batch_chunks(batch: int, n: int, channels: int) -> list[slice]:
    rows = max(1, CHUNK_ELEMENTS // (n * channels))
    return [slice(i, min(i + rows, batch)) for i in range(0, batch, rows)]


def _spectrum(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype, n: int) -> torch.Tensor:
    """rfft along time of a * b zero-padded to n: a, b [R, T, C] -> [R, C, n/2+1] complex.
    The product is written time-last into the padded buffer, so it is materialised once."""
    R, T, C = a.shape
    padded = torch.empty((R, C, n), dtype=dtype, device=a.device)
    torch.mul(a.transpose(1, 2), b.transpose(1, 2), out=padded[..., :T])
    padded[..., T:].zero_()
    return torch.fft.rfft(padded)


def _filter_spectrum(h: torch.Tensor, T: int, dtype: torch.dtype, n: int) -> torch.Tensor:
    return torch.fft.rfft(h[:, :T].to(dtype), n=n)  # [C, n/2+1]


def _time_major(y: torch.Tensor, T: int) -> torch.Tensor:
    """The first T outputs of an inverse transform [R, C, n], as [R, T, C] (a view)."""
    return y[..., :T].transpose(1, 2)


class FFTGatedConvFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, h):
        (B, T, C), out = q.shape, torch.empty_like(q)
        with torch.autocast(q.device.type, enabled=False), recomputes_in_backward():
            dtype, n = compute_dtype(q, k, v, h), 2 * T
            H = _filter_spectrum(h, T, dtype, n)
            for rows in _batch_chunks(B, n, C):
                U = _spectrum(k[rows], v[rows], dtype, n).mul_(H)
                y = _time_major(torch.fft.irfft(U, n=n), T)  # [R, T, C]
                del U
                torch.mul(q[rows], y, out=out[rows])
        ctx.save_for_backward(q, k, v, h)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        q, k, v, h = ctx.saved_tensors
        (B, T, C), L = q.shape, h.shape[1]
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        with torch.autocast(q.device.type, enabled=False):
            dtype, n = compute_dtype(q, k, v, h), 2 * T
            H = _filter_spectrum(h, T, dtype, n)
            cross = None  # sum over the batch of G conj(U): [C, n/2+1]
            for rows in _batch_chunks(B, n, C):
                G = _spectrum(dout[rows], q[rows], dtype, n)
                U = _spectrum(k[rows], v[rows], dtype, n)
                part = (G * U.conj()).sum(0)
                cross = part if cross is None else cross.add_(part)
                y = _time_major(torch.fft.irfft(U.mul_(H), n=n), T)
                del U
                torch.mul(dout[rows], y, out=dq[rows])
                del y
                du = _time_major(torch.fft.irfft(G.mul_(H.conj()), n=n), T)
                del G
                torch.mul(du, v[rows], out=dk[rows])
                torch.mul(du, k[rows], out=dv[rows])
                del du
            taps = torch.fft.irfft(cross, n=n)  # [C, n]
            dh = torch.zeros(h.shape, dtype=h.dtype, device=h.device)
            dh[:, :min(L, T)] = taps[:, :min(L, T)].to(h.dtype)
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
