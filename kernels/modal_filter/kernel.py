"""Hyena-LI's modal filter in Triton: the taps h [G, T] from the poles and residues, and the
four parameter gradients from dh, without the complex [G, N, T] powers ever existing.

With e = exp(-rate t), c = cos(theta t), s = sin(theta t) for each mode n:

    h[t]          = sum_n e (R_re c - R_im s)
    dL/dR_re      = sum_t dh e c                  =  Sc
    dL/dR_im      = -sum_t dh e s                 = -Ss
    dL/drate      = -sum_t t dh e (R_re c - R_im s) = -(R_re Tc - R_im Ts)
    dL/dtheta     = -sum_t t dh e (R_re s + R_im c) = -(R_re Ts + R_im Tc)

where Tc, Ts are Sc, Ss with an extra factor t. Each program owns one filter and BT taps:
forward writes its taps; backward writes its block's four partial sums per mode, which the
host adds up (deterministic: no atomics). Angles are reduced to [-pi, pi] in turns before
the sine and cosine: theta t reaches 4e5 rad at 128k taps, where an approximate sine loses
every digit; the reduction's rounding, |theta t| 2^-24, is the reference's own (it rounds
theta t to float32 too).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

BT = 256  # taps per program
TWO_PI: tl.constexpr = tl.constexpr(2 * math.pi)
INV_TWO_PI: tl.constexpr = tl.constexpr(1 / (2 * math.pi))


@triton.jit
def _modes(rate_ptr, theta_ptr, g, N, BN: tl.constexpr, t):
    """e, c, s: [BN, BT] float32 for filter g's modes at taps t; modes past N give e = 0."""
    n = tl.arange(0, BN)
    n_ok = n < N
    rate = tl.load(rate_ptr + g * N + n, mask=n_ok, other=0.0)
    theta = tl.load(theta_ptr + g * N + n, mask=n_ok, other=0.0)
    e = tl.where(n_ok[:, None], tl.exp(-rate[:, None] * t[None, :]), 0.0)
    turns = (theta * INV_TWO_PI)[:, None] * t[None, :]
    angle = (turns - tl.floor(turns + 0.5)) * TWO_PI  # [-pi, pi]
    return e, tl.cos(angle), tl.sin(angle)


@triton.jit
def _modal_filter_fwd(rate_ptr, theta_ptr, re_ptr, im_ptr, h_ptr, N, T,
                      BN: tl.constexpr, BT: tl.constexpr):
    """Grid (cdiv(T, BT), G). h: [G, T] float32."""
    tb, g = tl.program_id(0), tl.program_id(1).to(tl.int64)
    t_int = tb * BT + tl.arange(0, BT)
    e, c, s = _modes(rate_ptr, theta_ptr, g, N, BN, t_int.to(tl.float32))
    n = tl.arange(0, BN)
    re = tl.load(re_ptr + g * N + n, mask=n < N, other=0.0)
    im = tl.load(im_ptr + g * N + n, mask=n < N, other=0.0)
    h = tl.sum(e * (re[:, None] * c - im[:, None] * s), axis=0)  # [BT]
    tl.store(h_ptr + g * T + t_int, h, mask=t_int < T)


@triton.jit
def _modal_filter_bwd(rate_ptr, theta_ptr, dh_ptr, part_ptr, N, T,
                      BN: tl.constexpr, BT: tl.constexpr):
    """Grid (cdiv(T, BT), G). dh: [G, T] float32; part: [G, cdiv(T, BT), 4, N] float32, this
    block's Sc, Ss, Tc, Ts per mode."""
    tb, g = tl.program_id(0), tl.program_id(1).to(tl.int64)
    t_int = tb * BT + tl.arange(0, BT)
    t = t_int.to(tl.float32)
    e, c, s = _modes(rate_ptr, theta_ptr, g, N, BN, t)
    dh = tl.load(dh_ptr + g * T + t_int, mask=t_int < T, other=0.0)
    w = e * dh[None, :]  # [BN, BT]
    wt = w * t[None, :]
    n = tl.arange(0, BN)
    out = part_ptr + ((g * tl.num_programs(0) + tb) * 4) * N + n
    tl.store(out, tl.sum(w * c, axis=1), mask=n < N)
    tl.store(out + N, tl.sum(w * s, axis=1), mask=n < N)
    tl.store(out + 2 * N, tl.sum(wt * c, axis=1), mask=n < N)
    tl.store(out + 3 * N, tl.sum(wt * s, axis=1), mask=n < N)


def modal_filter_triton(rate: torch.Tensor, theta: torch.Tensor, residue_re: torch.Tensor,
                        residue_im: torch.Tensor, length: int) -> torch.Tensor:
    """h [G, length] float32. Parameters: float32 [G, N], rate > 0."""
    G, N = rate.shape
    rate, theta, re, im = (p.contiguous() for p in (rate, theta, residue_re, residue_im))
    h = torch.empty(G, length, device=rate.device, dtype=torch.float32)
    grid = (triton.cdiv(length, BT), G)
    _modal_filter_fwd[grid](rate, theta, re, im, h, N, length,
                            BN=triton.next_power_of_2(N), BT=BT)
    return h


def modal_filter_grads_triton(rate: torch.Tensor, theta: torch.Tensor,
                              residue_re: torch.Tensor, residue_im: torch.Tensor,
                              dh: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(d rate, d theta, d residue_re, d residue_im), each [G, N] float32, from dh [G, T]."""
    G, N = rate.shape
    T = dh.shape[1]
    blocks = triton.cdiv(T, BT)
    part = torch.empty(G, blocks, 4, N, device=rate.device, dtype=torch.float32)
    _modal_filter_bwd[(blocks, G)](rate.contiguous(), theta.contiguous(),
                                   dh.float().contiguous(), part, N, T,
                                   BN=triton.next_power_of_2(N), BT=BT)
    sc, ss, tc, ts = part.sum(1).unbind(1)  # [G, N] each
    re, im = residue_re, residue_im
    return -(re * tc - im * ts), -(re * ts + im * tc), sc, -ss
