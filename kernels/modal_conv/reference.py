"""References for Hyena-LI's gated long convolution with its modal filter,

    out[b, t, c] = q[b, t, c] * y[b, t, c],   y = h_c * (k v) (causal),
    h_c[t] = Re( sum_n R[c, n] p[c, n]^t ),   p = exp(-rate + i theta),

two ways: by its definition, the filter built at the sequence's length and the convolution
done by FFT (what the mixer ran before the kernel; differentiable in every input), and as
the recurrence the kernel walks, one token at a time:

    s[t] = p s[t-1] + u[t]  (u = k v, s[-1] = 0, complex per channel and mode)
    y[t] = Re( sum_n R_n s_n[t] )

since sum_{j<=t} Re(R p^(t-j)) u[j] = Re(R sum_{j<=t} p^(t-j) u[j]). The recurrence is slow in
PyTorch (a Python loop over time) and is there for tests.

Decoding's prefill continues the recurrence from a carried state s[-1] (`modal_conv_continue`,
ungated): y[t] = (h * u)[t] + Re(sum_n R_n p_n^(t+1) s_n[-1]), and the state after the chunk
is p^T s[-1] + sum_{j<T} p^(T-1-j) u[j].
"""

from __future__ import annotations

import torch

from stripes.arch.hyena_filters import fft_causal_conv
from stripes.kernels.fft_conv.reference import fft_gated_conv
from stripes.kernels.modal_filter.reference import modal_filter, rate_powers


def check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rate: torch.Tensor,
                 theta: torch.Tensor, residue_re: torch.Tensor, residue_im: torch.Tensor,
                 positions: torch.Tensor | None = None) -> None:
    if q.dim() != 3 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"modal_gated_conv: q, k, v must be [B, T, C] of one shape, got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    C = q.shape[2]
    if rate.dim() != 2 or rate.shape[0] == 0 or C % rate.shape[0]:
        raise ValueError(f"modal_gated_conv: rate must be [G, N] with G dividing C = {C}, got "
                         f"{tuple(rate.shape)}")
    for name, p in (("theta", theta), ("residue_re", residue_re), ("residue_im", residue_im)):
        if p.shape != rate.shape:
            raise ValueError(f"modal_gated_conv: {name} must have rate's shape "
                             f"{tuple(rate.shape)}, got {tuple(p.shape)}")
    if positions is not None and positions.shape != q.shape[:2]:
        raise ValueError(f"modal_gated_conv: positions must be [B, T] = {list(q.shape[:2])}, "
                         f"got {tuple(positions.shape)}")


def per_channel(param: torch.Tensor, channels: int) -> torch.Tensor:
    """[G, ...] -> [C, ...]: channel c uses filter c // (C / G)."""
    return param.repeat_interleave(channels // param.shape[0], dim=0)


def modal_gated_conv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rate: torch.Tensor,
                     theta: torch.Tensor, residue_re: torch.Tensor,
                     residue_im: torch.Tensor) -> torch.Tensor:
    """q, k, v [B, T, C]; rate (> 0), theta, residue_re, residue_im [G, N] real, G filters
    shared by C / G channels each. Returns [B, T, C] in q's dtype: the filter by its
    definition, the convolution by FFT."""
    check_inputs(q, k, v, rate, theta, residue_re, residue_im)
    h = modal_filter(rate, theta, residue_re, residue_im, q.shape[1])  # [G, T]
    return fft_gated_conv(q, k, v, per_channel(h, q.shape[2]))


def modal_gated_recurrence(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           rate: torch.Tensor, theta: torch.Tensor, residue_re: torch.Tensor,
                           residue_im: torch.Tensor, positions: torch.Tensor | None = None
                           ) -> torch.Tensor:
    """The same output, token by token through the complex state [B, C, N]; with positions
    ([B, T], steps since each token's document start) the state restarts at every document
    start, so packed documents are convolved as if alone."""
    check_inputs(q, k, v, rate, theta, residue_re, residue_im, positions)
    C = q.shape[2]
    p = per_channel(torch.exp(torch.complex(-rate, theta)), C)  # [C, N]
    R = per_channel(torch.complex(residue_re, residue_im), C)
    u = k * v
    s = torch.zeros(q.shape[0], *p.shape, dtype=p.dtype, device=q.device)  # [B, C, N]
    ys = []
    for t in range(q.shape[1]):
        if positions is not None:  # a document starts: nothing carries over
            s = torch.where((positions[:, t] > 0)[:, None, None], s, 0)
        s = p * s + u[:, t, :, None]
        ys.append((R * s).real.sum(-1))  # [B, C]
    return q * torch.stack(ys, dim=1).to(q.dtype)


def check_continue_inputs(u: torch.Tensor, rate: torch.Tensor, theta: torch.Tensor,
                          residue_re: torch.Tensor, residue_im: torch.Tensor,
                          state: torch.Tensor) -> None:
    check_inputs(u, u, u, rate, theta, residue_re, residue_im)
    B, _, C = u.shape
    if state.shape != (B, C, rate.shape[1]) or not state.is_complex():
        raise ValueError(f"modal_conv_continue: state must be complex [B, C, N] = "
                         f"[{B}, {C}, {rate.shape[1]}], got {state.dtype} "
                         f"{tuple(state.shape)}")


def modal_conv_continue(u: torch.Tensor, rate: torch.Tensor, theta: torch.Tensor,
                        residue_re: torch.Tensor, residue_im: torch.Tensor,
                        state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """u [B, T, C] continuing from state (complex [B, C, N], s[-1]): (y [B, T, C] in u's
    dtype, the state after u), in parallel form: the filter by its definition convolved by
    FFT, plus the carried state's decay, in the state's precision."""
    check_continue_inputs(u, rate, theta, residue_re, residue_im, state)
    T, C = u.shape[1], u.shape[2]
    if T == 0:  # nothing read: the state stays (an FFT of length 0 is an error)
        return u.clone(), state.clone()
    real = state.real.dtype  # float32, or float64
    powers = rate_powers(rate.to(real), theta.to(real), torch.arange(T + 1, device=u.device))
    powers = per_channel(powers, C)  # [C, N, T + 1]
    R = per_channel(torch.complex(residue_re.to(real), residue_im.to(real)), C)[..., None]
    u_r = u.to(real)
    y = fft_causal_conv(u_r, (R * powers[..., :T]).real.sum(1))  # [B, T, C]
    carry = torch.einsum("cnt,bcn->btc", R * powers[..., 1:], state)
    inject = torch.einsum("btc,cnt->bcn", u_r.to(state.dtype), powers[..., :T].flip(-1))
    return (y + carry.real).to(u.dtype), powers[..., T] * state + inject
