"""Triton kernels for the gated modal convolution (reference.py has the formula): the
recurrence s[t] = p s[t-1] + k[t] v[t], y[t] = Re(sum_n R_n s_n[t]), out = q y, walked by
segments of time.

Work split: a program owns BC channels (all N modes of each, BC x N complex states in
registers) over one segment of SEG tokens of one batch row, and walks it token by token.
Segments run in parallel; what crosses a segment boundary is the state, passed in three
launches, as the chunked scans of SSD and retention do:
    1. each segment's end state from a zero start                        (local)
    2. per (channel, mode), a scan over segments: S_(k+1) = p^SEG S_k + local_k (passing)
    3. each segment again from its entering state S_k, writing out = q y    (output)
Memory traffic is q, k, v read and out written once, plus B x segments x C x N states:
no filter [C, T], no FFT, no float32 copy of the activations.

Backward, with g = dout q (the gradient of y) and the adjoint a[t] = R g[t] + p a[t+1]
(a reverse scan, since y[t] depends on u[j <= t] through p^(t-j)):
    dq = dout y,  du[t] = Re sum_n a_n[t],  dk = du v,  dv = du k
    dL/dR_re = sum_t g s_re,   dL/dR_im = -sum_t g s_im
    dL/drate = Re(-p R W),     dL/dtheta = Re(i p R W),   W = sum_t g[t] s'[t]
where s' = ds/dp obeys s'[t] = p s'[t-1] + s[t-1] (s is holomorphic in p; dp/drate = -p,
dp/dtheta = i p). The pair (s, s') is again a linear recurrence, with the Jordan block
[[p, 0], [1, p]], whose power over a segment is [[p^L, 0], [L p^(L-1), p^L]]; so backward
runs the same three steps: local (s, s') end states and the local adjoint at each segment's
start, both passed across segments (forward and in reverse), then one pass per segment
that walks forward for dq and the parameter sums and backward for du. The parameter sums
are written per (row, segment) and added by torch (deterministic: no atomics).
All arithmetic is float32; modes past N get p = 0 and R = 0, so they add nothing.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from stripes.kernels.modal_filter.kernel import _power

BC = 32  # channels per program
PASS_BLOCK = 256  # (channel, mode) lanes per program of the passing scans
MIN_SEGMENT = 64  # tokens
PROGRAMS_PER_SM = 8  # segments are cut so that about this many programs per SM run


@triton.jit
def _param_lanes(lanes, N, CPG):
    """Channel lanes c N + n -> their filter's lanes (c // CPG) N + n."""
    return lanes // N // CPG * N + lanes % N


@triton.jit
def _poles(rate_ptr, theta_ptr, lanes, mask):
    """p = exp(-rate + i theta) as (real, imag) at parameter `lanes`, 0 where masked."""
    rate = tl.load(rate_ptr + lanes, mask=mask, other=0.0)
    theta = tl.load(theta_ptr + lanes, mask=mask, other=0.0)
    e = tl.where(mask, tl.exp(-rate), 0.0)
    return e * tl.cos(theta), e * tl.sin(theta)


@triton.jit
def _row(ptr, b, t, c, sb, st, mask):
    """[BC] float32: one token's channels c of a [B, T, C] tensor with strides (sb, st, 1)."""
    at = ptr + b.to(tl.int64) * sb + t.to(tl.int64) * st + c
    return tl.load(at, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _store_row(ptr, b, t, c, T, C, value, mask):
    """One token's channels of a contiguous [B, T, C] output."""
    at = ptr + (b.to(tl.int64) * T + t) * C + c
    tl.store(at, value.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _states_at(ptr, b, seg, n_seg, part, n_parts, lanes, C, N):
    """Pointers into a [B, n_seg, n_parts, C, N] float32 state buffer."""
    return ptr + ((b.to(tl.int64) * n_seg + seg) * n_parts + part) * C * N + lanes


@triton.jit
def _tile(pid_c, N, C, CPG, BC: tl.constexpr, BN: tl.constexpr):
    """This program's channels c [BC]; their state lanes c N + n and their filters' lanes
    (c // CPG) N + n, [BC, BN] each; masks."""
    c = pid_c * BC + tl.arange(0, BC)
    n = tl.arange(0, BN)
    c_ok = c < C
    mask = c_ok[:, None] & (n < N)[None, :]
    return c, c_ok, c[:, None] * N + n[None, :], (c // CPG)[:, None] * N + n[None, :], mask


# -- forward ----------------------------------------------------------------------------------
@triton.jit
def _input(k_ptr, v_ptr, b, t, c, skb, skt, svb, svt, ok, HAS_V: tl.constexpr):
    """u = k v at token t ([BC]), or k alone."""
    u = _row(k_ptr, b, t, c, skb, skt, ok)
    if HAS_V:
        u *= _row(v_ptr, b, t, c, svb, svt, ok)
    return u


@triton.jit
def _local_fwd(k_ptr, v_ptr, rate_ptr, theta_ptr, state_ptr, T, C, N, CPG, SEG, n_seg,
               skb, skt, svb, svt, HAS_V: tl.constexpr, BC: tl.constexpr,
               BN: tl.constexpr):
    """Each segment's end state from a zero start -> state[b, seg, 0:2]."""
    seg, pid_c, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    c, c_ok, lanes, plane, mask = _tile(pid_c, N, C, CPG, BC, BN)
    pr, pi = _poles(rate_ptr, theta_ptr, plane, mask)
    sr = tl.zeros((BC, BN), tl.float32)
    si = tl.zeros((BC, BN), tl.float32)
    for i in range(tl.minimum(SEG, T - seg * SEG)):  # the last segment may be short
        u = _input(k_ptr, v_ptr, b, seg * SEG + i, c, skb, skt, svb, svt, c_ok, HAS_V)
        sr, si = pr * sr - pi * si + u[:, None], pr * si + pi * sr
    tl.store(_states_at(state_ptr, b, seg, n_seg, 0, 2, lanes, C, N), sr, mask=mask)
    tl.store(_states_at(state_ptr, b, seg, n_seg, 1, 2, lanes, C, N), si, mask=mask)


@triton.jit
def _pass_fwd(rate_ptr, theta_ptr, state_ptr, init_ptr, final_ptr, T, C, N, CPG, SEG, n_seg,
              HAS_INIT: tl.constexpr, HAS_FINAL: tl.constexpr, BLOCK: tl.constexpr):
    """In place over state[b]: each segment's local end state becomes its entering state,
    starting from init[b] ([C, N] complex as (real, imag) pairs) or zero; the state after
    the last token goes to final[b] (same layout)."""
    pid, b = tl.program_id(0), tl.program_id(1)
    lanes = pid * BLOCK + tl.arange(0, BLOCK)
    ok = lanes < C * N
    rate = tl.load(rate_ptr + _param_lanes(lanes, N, CPG), mask=ok, other=0.0)
    theta = tl.load(theta_ptr + _param_lanes(lanes, N, CPG), mask=ok, other=0.0)
    pairs = (b.to(tl.int64) * C * N + lanes) * 2
    if HAS_INIT:
        sr = tl.load(init_ptr + pairs, mask=ok, other=0.0)
        si = tl.load(init_ptr + pairs + 1, mask=ok, other=0.0)
    else:
        sr = tl.zeros((BLOCK,), tl.float32)
        si = tl.zeros((BLOCK,), tl.float32)
    wr, wi = _power(rate, theta, SEG * 1.0)  # p^SEG
    for seg in range(n_seg):
        at_r = _states_at(state_ptr, b, seg, n_seg, 0, 2, lanes, C, N)
        at_i = _states_at(state_ptr, b, seg, n_seg, 1, 2, lanes, C, N)
        lr = tl.load(at_r, mask=ok, other=0.0)
        li = tl.load(at_i, mask=ok, other=0.0)
        tl.store(at_r, sr, mask=ok)
        tl.store(at_i, si, mask=ok)
        if seg == n_seg - 1:  # the last segment: T - seg SEG tokens
            wr, wi = _power(rate, theta, (T - seg * SEG) * 1.0)
        sr, si = wr * sr - wi * si + lr, wr * si + wi * sr + li
    if HAS_FINAL:
        tl.store(final_ptr + pairs, sr, mask=ok)
        tl.store(final_ptr + pairs + 1, si, mask=ok)


@triton.jit
def _output_fwd(q_ptr, k_ptr, v_ptr, rate_ptr, theta_ptr, re_ptr, im_ptr, state_ptr, out_ptr,
                T, C, N, CPG, SEG, n_seg, sqb, sqt, skb, skt, svb, svt,
                HAS_Q: tl.constexpr, HAS_V: tl.constexpr, BC: tl.constexpr,
                BN: tl.constexpr):
    """out = q y (or y) over each segment, from its entering state."""
    seg, pid_c, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    c, c_ok, lanes, plane, mask = _tile(pid_c, N, C, CPG, BC, BN)
    pr, pi = _poles(rate_ptr, theta_ptr, plane, mask)
    rr = tl.load(re_ptr + plane, mask=mask, other=0.0)
    ri = tl.load(im_ptr + plane, mask=mask, other=0.0)
    sr = tl.load(_states_at(state_ptr, b, seg, n_seg, 0, 2, lanes, C, N), mask=mask, other=0.0)
    si = tl.load(_states_at(state_ptr, b, seg, n_seg, 1, 2, lanes, C, N), mask=mask, other=0.0)
    for i in range(tl.minimum(SEG, T - seg * SEG)):
        t = seg * SEG + i
        u = _input(k_ptr, v_ptr, b, t, c, skb, skt, svb, svt, c_ok, HAS_V)
        sr, si = pr * sr - pi * si + u[:, None], pr * si + pi * sr
        y = tl.sum(rr * sr - ri * si, axis=1)
        if HAS_Q:
            y *= _row(q_ptr, b, t, c, sqb, sqt, c_ok)
        _store_row(out_ptr, b, t, c, T, C, y, c_ok)


# -- backward ---------------------------------------------------------------------------------
@triton.jit
def _local_bwd(q_ptr, k_ptr, v_ptr, dout_ptr, rate_ptr, theta_ptr, re_ptr, im_ptr,
               fstate_ptr, rstate_ptr, T, C, N, CPG, SEG, n_seg,
               sqb, sqt, skb, skt, svb, svt, sdb, sdt, BC: tl.constexpr, BN: tl.constexpr):
    """From zero starts: each segment's end (s, s') -> fstate[b, seg, 0:4], and its adjoint
    at the segment's first token, walking back from its end -> rstate[b, seg, 0:2]."""
    seg, pid_c, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    c, c_ok, lanes, plane, mask = _tile(pid_c, N, C, CPG, BC, BN)
    pr, pi = _poles(rate_ptr, theta_ptr, plane, mask)
    rr = tl.load(re_ptr + plane, mask=mask, other=0.0)
    ri = tl.load(im_ptr + plane, mask=mask, other=0.0)
    sr = tl.zeros((BC, BN), tl.float32)
    si = tl.zeros((BC, BN), tl.float32)
    dr = tl.zeros((BC, BN), tl.float32)  # s' = ds/dp
    di = tl.zeros((BC, BN), tl.float32)
    rows = tl.minimum(SEG, T - seg * SEG)
    for i in range(rows):
        u = _input(k_ptr, v_ptr, b, seg * SEG + i, c, skb, skt, svb, svt, c_ok, True)
        dr, di = pr * dr - pi * di + sr, pr * di + pi * dr + si
        sr, si = pr * sr - pi * si + u[:, None], pr * si + pi * sr
    tl.store(_states_at(fstate_ptr, b, seg, n_seg, 0, 4, lanes, C, N), sr, mask=mask)
    tl.store(_states_at(fstate_ptr, b, seg, n_seg, 1, 4, lanes, C, N), si, mask=mask)
    tl.store(_states_at(fstate_ptr, b, seg, n_seg, 2, 4, lanes, C, N), dr, mask=mask)
    tl.store(_states_at(fstate_ptr, b, seg, n_seg, 3, 4, lanes, C, N), di, mask=mask)
    ar = tl.zeros((BC, BN), tl.float32)
    ai = tl.zeros((BC, BN), tl.float32)
    for i in range(rows):
        t = seg * SEG + rows - 1 - i
        g = _input(dout_ptr, q_ptr, b, t, c, sdb, sdt, sqb, sqt, c_ok, True)[:, None]
        ar, ai = rr * g + pr * ar - pi * ai, ri * g + pr * ai + pi * ar
    tl.store(_states_at(rstate_ptr, b, seg, n_seg, 0, 2, lanes, C, N), ar, mask=mask)
    tl.store(_states_at(rstate_ptr, b, seg, n_seg, 1, 2, lanes, C, N), ai, mask=mask)


@triton.jit
def _pass_bwd(rate_ptr, theta_ptr, fstate_ptr, rstate_ptr, C, N, CPG, SEG, n_seg,
              BLOCK: tl.constexpr):
    """In place: fstate's local (s, s') end states become each segment's entering (s, s');
    rstate's local adjoints become the adjoint entering each segment from its right."""
    pid, b = tl.program_id(0), tl.program_id(1)
    lanes = pid * BLOCK + tl.arange(0, BLOCK)
    ok = lanes < C * N
    rate = tl.load(rate_ptr + _param_lanes(lanes, N, CPG), mask=ok, other=0.0)
    theta = tl.load(theta_ptr + _param_lanes(lanes, N, CPG), mask=ok, other=0.0)
    wr, wi = _power(rate, theta, SEG * 1.0)  # p^SEG
    vr, vi = _power(rate, theta, SEG - 1.0)
    vr, vi = SEG * vr, SEG * vi  # SEG p^(SEG-1): how s reaches s' over a segment
    sr = tl.zeros((BLOCK,), tl.float32)
    si = tl.zeros((BLOCK,), tl.float32)
    dr = tl.zeros((BLOCK,), tl.float32)
    di = tl.zeros((BLOCK,), tl.float32)
    for seg in range(n_seg):
        at = _states_at(fstate_ptr, b, seg, n_seg, 0, 4, lanes, C, N)
        lsr = tl.load(at, mask=ok, other=0.0)
        lsi = tl.load(at + C * N, mask=ok, other=0.0)
        ldr = tl.load(at + 2 * C * N, mask=ok, other=0.0)
        ldi = tl.load(at + 3 * C * N, mask=ok, other=0.0)
        tl.store(at, sr, mask=ok)
        tl.store(at + C * N, si, mask=ok)
        tl.store(at + 2 * C * N, dr, mask=ok)
        tl.store(at + 3 * C * N, di, mask=ok)
        dr, di = (wr * dr - wi * di + vr * sr - vi * si + ldr,
                  wr * di + wi * dr + vr * si + vi * sr + ldi)
        sr, si = wr * sr - wi * si + lsr, wr * si + wi * sr + lsi
    ar = tl.zeros((BLOCK,), tl.float32)
    ai = tl.zeros((BLOCK,), tl.float32)
    for back in range(n_seg):
        seg = n_seg - 1 - back
        at = _states_at(rstate_ptr, b, seg, n_seg, 0, 2, lanes, C, N)
        lar = tl.load(at, mask=ok, other=0.0)
        lai = tl.load(at + C * N, mask=ok, other=0.0)
        tl.store(at, ar, mask=ok)
        tl.store(at + C * N, ai, mask=ok)
        # Only the last segment can be short, and nothing enters it from the right.
        ar, ai = wr * ar - wi * ai + lar, wr * ai + wi * ar + lai


@triton.jit
def _grads_bwd(q_ptr, k_ptr, v_ptr, dout_ptr, rate_ptr, theta_ptr, re_ptr, im_ptr,
               fstate_ptr, rstate_ptr, dq_ptr, dk_ptr, dv_ptr, part_ptr, T, C, N, CPG, SEG,
               n_seg, sqb, sqt, skb, skt, svb, svt, sdb, sdt, BC: tl.constexpr, BN: tl.constexpr):
    """Per segment from its entering states: forward for dq and the parameter sums
    (sum g s, sum g s' -> part[b, seg, 0:4]), then backward for du, dk and dv."""
    seg, pid_c, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    c, c_ok, lanes, plane, mask = _tile(pid_c, N, C, CPG, BC, BN)
    pr, pi = _poles(rate_ptr, theta_ptr, plane, mask)
    rr = tl.load(re_ptr + plane, mask=mask, other=0.0)
    ri = tl.load(im_ptr + plane, mask=mask, other=0.0)
    at = _states_at(fstate_ptr, b, seg, n_seg, 0, 4, lanes, C, N)
    sr = tl.load(at, mask=mask, other=0.0)
    si = tl.load(at + C * N, mask=mask, other=0.0)
    dr = tl.load(at + 2 * C * N, mask=mask, other=0.0)
    di = tl.load(at + 3 * C * N, mask=mask, other=0.0)
    gsr = tl.zeros((BC, BN), tl.float32)  # sum_t g s
    gsi = tl.zeros((BC, BN), tl.float32)
    gdr = tl.zeros((BC, BN), tl.float32)  # sum_t g s'
    gdi = tl.zeros((BC, BN), tl.float32)
    rows = tl.minimum(SEG, T - seg * SEG)
    for i in range(rows):
        t = seg * SEG + i
        u = _input(k_ptr, v_ptr, b, t, c, skb, skt, svb, svt, c_ok, True)
        dout = _row(dout_ptr, b, t, c, sdb, sdt, c_ok)
        g = (dout * _row(q_ptr, b, t, c, sqb, sqt, c_ok))[:, None]
        dr, di = pr * dr - pi * di + sr, pr * di + pi * dr + si
        sr, si = pr * sr - pi * si + u[:, None], pr * si + pi * sr
        _store_row(dq_ptr, b, t, c, T, C, dout * tl.sum(rr * sr - ri * si, axis=1), c_ok)
        gsr += g * sr
        gsi += g * si
        gdr += g * dr
        gdi += g * di
    out = _states_at(part_ptr, b, seg, n_seg, 0, 4, lanes, C, N)
    tl.store(out, gsr, mask=mask)
    tl.store(out + C * N, gsi, mask=mask)
    tl.store(out + 2 * C * N, gdr, mask=mask)
    tl.store(out + 3 * C * N, gdi, mask=mask)

    at = _states_at(rstate_ptr, b, seg, n_seg, 0, 2, lanes, C, N)
    ar = tl.load(at, mask=mask, other=0.0)
    ai = tl.load(at + C * N, mask=mask, other=0.0)
    for i in range(rows):
        t = seg * SEG + rows - 1 - i
        g = _input(dout_ptr, q_ptr, b, t, c, sdb, sdt, sqb, sqt, c_ok, True)[:, None]
        ar, ai = rr * g + pr * ar - pi * ai, ri * g + pr * ai + pi * ar
        du = tl.sum(ar, axis=1)
        _store_row(dk_ptr, b, t, c, T, C, du * _row(v_ptr, b, t, c, svb, svt, c_ok), c_ok)
        _store_row(dv_ptr, b, t, c, T, C, du * _row(k_ptr, b, t, c, skb, skt, c_ok), c_ok)


# -- launchers --------------------------------------------------------------------------------
def _strides(*tensors: torch.Tensor) -> list[int]:
    return [s for t in tensors for s in (t.stride(0), t.stride(1))]


def _channels_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(2) == 1 else t.contiguous()


def segment_length(batch: int, T: int, C: int, device: torch.device) -> int:
    """Tokens a program walks: segments enough for PROGRAMS_PER_SM programs per SM (more
    segments cost more state passing, fewer leave SMs idle), none under MIN_SEGMENT."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count \
        if device.type == "cuda" else 1
    blocks = batch * triton.cdiv(C, BC)
    segments = max(1, min(triton.cdiv(PROGRAMS_PER_SM * sms, blocks), T // MIN_SEGMENT))
    return triton.cdiv(T, segments)


def _forward(q: torch.Tensor | None, k: torch.Tensor, v: torch.Tensor | None,
             params: list[torch.Tensor], segment: int, initial: torch.Tensor | None = None,
             final: torch.Tensor | None = None) -> torch.Tensor:
    """out = q y with u = k v (q, v None: y, u = k), from `initial` and into `final` (float32
    [B, C, N, 2] views of complex states) when given. params: float32 [G, N], contiguous."""
    B, T, C = k.shape
    G, N = params[0].shape
    n_seg, cpg = triton.cdiv(T, segment), C // G
    out = torch.empty(B, T, C, dtype=k.dtype, device=k.device)
    if out.numel():
        state = torch.empty(B, n_seg, 2, C, N, dtype=torch.float32, device=k.device)
        grid, BN = (n_seg, triton.cdiv(C, BC), B), triton.next_power_of_2(N)
        k_v = [k, k if v is None else v]
        _local_fwd[grid](*k_v, params[0], params[1], state, T, C, N, cpg, segment, n_seg,
                         *_strides(*k_v), HAS_V=v is not None, BC=BC, BN=BN)
        _pass_fwd[(triton.cdiv(C * N, PASS_BLOCK), B)](
            params[0], params[1], state, state if initial is None else initial,
            state if final is None else final, T, C, N, cpg, segment, n_seg,
            HAS_INIT=initial is not None, HAS_FINAL=final is not None, BLOCK=PASS_BLOCK)
        q_k_v = [k if q is None else q, *k_v]
        _output_fwd[grid](*q_k_v, *params, state, out, T, C, N, cpg, segment, n_seg,
                          *_strides(*q_k_v), HAS_Q=q is not None, HAS_V=v is not None,
                          BC=BC, BN=BN)
    elif final is not None and initial is not None:
        final.copy_(initial)
    return out


class ModalConvFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, rate, theta, residue_re, residue_im, segment):
        q, k, v = (_channels_contiguous(t) for t in (q, k, v))
        params = [p.float().contiguous() for p in (rate, theta, residue_re, residue_im)]
        out = _forward(q, k, v, params, segment)
        ctx.save_for_backward(q, k, v, *params)
        ctx.segment = segment
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        q, k, v, rate, theta, re, im = ctx.saved_tensors
        dout = _channels_contiguous(dout)
        B, T, C = q.shape
        (G, N), segment = rate.shape, ctx.segment
        n_seg, cpg = triton.cdiv(T, segment), C // G
        dq, dk, dv = (torch.empty(B, T, C, dtype=t.dtype, device=t.device) for t in (q, k, v))
        part = torch.zeros(B, n_seg, 4, C, N, dtype=torch.float32, device=q.device)
        if dq.numel():
            fstate = torch.empty(B, n_seg, 4, C, N, dtype=torch.float32, device=q.device)
            rstate = torch.empty(B, n_seg, 2, C, N, dtype=torch.float32, device=q.device)
            grid, BN = (n_seg, triton.cdiv(C, BC), B), triton.next_power_of_2(N)
            strides = _strides(q, k, v, dout)
            _local_bwd[grid](q, k, v, dout, rate, theta, re, im, fstate, rstate, T, C, N,
                             cpg, segment, n_seg, *strides, BC=BC, BN=BN)
            _pass_bwd[(triton.cdiv(C * N, PASS_BLOCK), B)](rate, theta, fstate, rstate, C, N,
                                                          cpg, segment, n_seg,
                                                          BLOCK=PASS_BLOCK)
            _grads_bwd[grid](q, k, v, dout, rate, theta, re, im, fstate, rstate, dq, dk, dv,
                             part, T, C, N, cpg, segment, n_seg, *strides, BC=BC, BN=BN)
        # Per channel, then per filter: every sum is linear in the channels' W and s sums.
        sums = part.sum((0, 1)).view(4, G, cpg, N).sum(2)
        gsr, gsi, gdr, gdi = sums.unbind(0)  # [G, N] each
        p = torch.exp(torch.complex(-rate, theta))
        prw = p * torch.complex(re, im) * torch.complex(gdr, gdi)  # p R W
        return dq, dk, dv, -prw.real, -prw.imag, gsr, -gsi, None


def modal_gated_conv_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            rate: torch.Tensor, theta: torch.Tensor, residue_re: torch.Tensor,
                            residue_im: torch.Tensor, segment: int | None = None
                            ) -> torch.Tensor:
    """The Triton path of stripes.kernels.modal_conv.modal_gated_conv (same contract);
    `segment`: tokens per program (None: segment_length's choice)."""
    from stripes.kernels.modal_conv.reference import check_inputs

    check_inputs(q, k, v, rate, theta, residue_re, residue_im)
    B, T, C = q.shape
    if segment is None:
        segment = segment_length(B, T, C, q.device)
    return ModalConvFunction.apply(q, k, v, rate, theta, residue_re, residue_im,
                                   max(1, segment))


def modal_conv_continue_triton(u: torch.Tensor, rate: torch.Tensor, theta: torch.Tensor,
                               residue_re: torch.Tensor, residue_im: torch.Tensor,
                               state: torch.Tensor, segment: int | None = None
                               ) -> tuple[torch.Tensor, torch.Tensor]:
    """The Triton path of stripes.kernels.modal_conv.modal_conv_continue (same contract)."""
    from stripes.kernels.modal_conv.reference import check_continue_inputs

    check_continue_inputs(u, rate, theta, residue_re, residue_im, state)
    B, T, C = u.shape
    if segment is None:
        segment = segment_length(B, T, C, u.device) if T else 1
    params = [p.float().contiguous() for p in (rate, theta, residue_re, residue_im)]
    initial = torch.view_as_real(state.to(torch.complex64).contiguous())
    final = torch.empty_like(initial)
    y = _forward(None, _channels_contiguous(u), None, params, max(1, segment), initial, final)
    return y, torch.view_as_complex(final).to(state.dtype)
