"""Hyena-LI's modal filter in Triton: the taps h [G, T] from the poles and residues, and the
four parameter gradients from dh, without the complex [G, N, T] powers ever existing.

With e = exp(-rate t), c = cos(theta t), s = sin(theta t) for each mode n:

    h[t]          = sum_n e (R_re c - R_im s)
    dL/dR_re      = sum_t dh e c                  =  Sc
    dL/dR_im      = -sum_t dh e s                 = -Ss
    dL/drate      = -sum_t t dh e (R_re c - R_im s) = -(R_re Tc - R_im Ts)
    dL/dtheta     = -sum_t t dh e (R_re s + R_im c) = -(R_re Ts + R_im Tc)

where Tc, Ts are Sc, Ss with an extra factor t. Each program owns one filter and BLOCKS
blocks of BT taps. It builds the table p^j (j < BT) once, then writes each block from
p^(t0 + j) = p^t0 p^j: N transcendental triples a block instead of one a mode and tap (the
first version, all transcendental, spent 37% of a Hyena-LI layer's time here at 32k).
Backward writes each program's four partial sums per mode, which the host adds up
(deterministic: no atomics). Angles are reduced to [-pi, pi] in turns before
the sine and cosine: theta t reaches 4e5 rad at 128k taps, where an approximate sine loses
every digit; the reduction's rounding, |theta t| 2^-24, is the reference's own (it rounds
theta t to float32 too).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

BT = 256  # taps per block
BLOCKS = 16  # blocks per program: the table of p^j is built once for all of them
TWO_PI: tl.constexpr = tl.constexpr(2 * math.pi)
INV_TWO_PI: tl.constexpr = tl.constexpr(1 / (2 * math.pi))


@triton.jit
def _power(rate, theta, t):
    """p^t = exp(-rate t) (cos + i sin)(theta t) as (real, imag), broadcasting rate/theta
    against t; the angle is reduced to [-pi, pi] in turns first."""
    e = tl.exp(-rate * t)
    turns = theta * INV_TWO_PI * t
    angle = (turns - tl.floor(turns + 0.5)) * TWO_PI
    return e * tl.cos(angle), e * tl.sin(angle)


@triton.jit
def _table(rate_ptr, theta_ptr, g, N, BN: tl.constexpr, BT: tl.constexpr):
    """Filter g's rate, theta [BN] and the table p^j [BN, BT] for j < BT. Modes past N read
    rate = theta = 0 (p^j = 1); forward gives them zero residues and backward does not store
    them, so they add nothing."""
    n = tl.arange(0, BN)
    rate = tl.load(rate_ptr + g * N + n, mask=n < N, other=0.0)
    theta = tl.load(theta_ptr + g * N + n, mask=n < N, other=0.0)
    j = tl.arange(0, BT).to(tl.float32)
    pr, pi = _power(rate[:, None], theta[:, None], j[None, :])
    return rate, theta, pr, pi


@triton.jit
def _modal_filter_fwd(rate_ptr, theta_ptr, re_ptr, im_ptr, h_ptr, N, T,
                      BN: tl.constexpr, BT: tl.constexpr, BLOCKS: tl.constexpr):
    """Grid (cdiv(T, BT * BLOCKS), G). h: [G, T] float32. Block b starts at t0 and uses
    Re(R p^(t0 + j)) = Re((R p^t0) p^j): per block N powers, per tap two FMAs a mode."""
    part, g = tl.program_id(0), tl.program_id(1).to(tl.int64)
    rate, theta, pr, pi = _table(rate_ptr, theta_ptr, g, N, BN, BT)
    n = tl.arange(0, BN)
    re = tl.load(re_ptr + g * N + n, mask=n < N, other=0.0)
    im = tl.load(im_ptr + g * N + n, mask=n < N, other=0.0)
    j = tl.arange(0, BT)
    for b in range(BLOCKS):
        t0 = (part * BLOCKS + b) * BT
        if t0 < T:
            cr, ci = _power(rate, theta, t0.to(tl.float32))
            ar, ai = re * cr - im * ci, re * ci + im * cr  # R p^t0, [BN]
            h = tl.sum(ar[:, None] * pr - ai[:, None] * pi, axis=0)  # [BT]
            tl.store(h_ptr + g * T + t0 + j, h, mask=t0 + j < T)


@triton.jit
def _modal_filter_bwd(rate_ptr, theta_ptr, dh_ptr, part_ptr, N, T,
                      BN: tl.constexpr, BT: tl.constexpr, BLOCKS: tl.constexpr):
    """Grid (cdiv(T, BT * BLOCKS), G). dh: [G, T] float32; part: [G, programs, 4, N]
    float32, this program's Sc, Ss, Tc, Ts per mode. With Q = sum_t dh p^t = Sc + i Ss and
    Tq = sum_t t dh p^t = Tc + i Ts, a block at t0 adds p^t0 W and p^t0 (t0 W + V), where
    W = sum_j dh p^j and V = sum_j j dh p^j."""
    part, g = tl.program_id(0), tl.program_id(1).to(tl.int64)
    rate, theta, pr, pi = _table(rate_ptr, theta_ptr, g, N, BN, BT)
    j = tl.arange(0, BT)
    jf = j.to(tl.float32)[None, :]
    qr = tl.zeros((BN,), tl.float32)
    qi = tl.zeros((BN,), tl.float32)
    tr = tl.zeros((BN,), tl.float32)
    ti = tl.zeros((BN,), tl.float32)
    for b in range(BLOCKS):
        t0 = (part * BLOCKS + b) * BT
        if t0 < T:
            dh = tl.load(dh_ptr + g * T + t0 + j, mask=t0 + j < T, other=0.0)[None, :]
            wr, wi = tl.sum(dh * pr, axis=1), tl.sum(dh * pi, axis=1)
            vr, vi = tl.sum(jf * dh * pr, axis=1), tl.sum(jf * dh * pi, axis=1)
            t0f = t0.to(tl.float32)
            cr, ci = _power(rate, theta, t0f)
            qr += cr * wr - ci * wi
            qi += cr * wi + ci * wr
            xr, xi = t0f * wr + vr, t0f * wi + vi
            tr += cr * xr - ci * xi
            ti += cr * xi + ci * xr
    n = tl.arange(0, BN)
    out = part_ptr + ((g * tl.num_programs(0) + part) * 4) * N + n
    tl.store(out, qr, mask=n < N)
    tl.store(out + N, qi, mask=n < N)
    tl.store(out + 2 * N, tr, mask=n < N)
    tl.store(out + 3 * N, ti, mask=n < N)


def modal_filter_triton(rate: torch.Tensor, theta: torch.Tensor, residue_re: torch.Tensor,
                        residue_im: torch.Tensor, length: int) -> torch.Tensor:
    """h [G, length] float32. Parameters: float32 [G, N], rate > 0."""
    G, N = rate.shape
    rate, theta, re, im = (p.contiguous() for p in (rate, theta, residue_re, residue_im))
    h = torch.empty(G, length, device=rate.device, dtype=torch.float32)
    grid = (triton.cdiv(length, BT * BLOCKS), G)
    _modal_filter_fwd[grid](rate, theta, re, im, h, N, length,
                            BN=triton.next_power_of_2(N), BT=BT, BLOCKS=BLOCKS, num_warps=8)
    return h


def modal_filter_grads_triton(rate: torch.Tensor, theta: torch.Tensor,
                              residue_re: torch.Tensor, residue_im: torch.Tensor,
                              dh: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(d rate, d theta, d residue_re, d residue_im), each [G, N] float32, from dh [G, T]."""
    G, N = rate.shape
    T = dh.shape[1]
    programs = triton.cdiv(T, BT * BLOCKS)
    part = torch.empty(G, programs, 4, N, device=rate.device, dtype=torch.float32)
    _modal_filter_bwd[(programs, G)](rate.contiguous(), theta.contiguous(),
                                     dh.float().contiguous(), part, N, T,
                                     BN=triton.next_power_of_2(N), BT=BT, BLOCKS=BLOCKS,
                                     num_warps=8)
    sc, ss, tc, ts = part.sum(1).unbind(1)  # [G, N] each
    re, im = residue_re, residue_im
    return -(re * tc - im * ts), -(re * ts + im * tc), sc, -ss
