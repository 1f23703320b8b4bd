"""One Hyena decoding step in one Triton kernel: featurizer FIR, gate, long filter step
(LI's modal recurrence or SE/MR's FIR) and output gate, for a batch of states.

Each program owns BD channels of one sequence: it reads the token's q, k, v projections and
its slices of every history, computes in float32, shifts the histories by one token in
place and writes q y. The featurizer's output is not rounded to the activations' dtype
between the steps, as the composed reference does; the float32 result is closer to the
float64 one. The modal state is complex, read as interleaved (real, imaginary) float32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BD = 128


@triton.jit
def _fir_shift(hist_ptr, filt_ptr, cur, c, c_ok, K: tl.constexpr, C):
    """sum_j filt[c, j] x[t - j] with x[t] = cur and x[t - j] = hist[K - 1 - j] ([K-1, C]
    rows, oldest first); then hist <- (hist[1:], cur). Returns [BD] float32."""
    acc = cur * tl.load(filt_ptr + c * K, mask=c_ok, other=0.0).to(tl.float32)
    prev = cur
    for back in tl.static_range(1, K):  # newest history row first
        row = K - 1 - back
        old = tl.load(hist_ptr + row * C + c, mask=c_ok, other=0.0)
        acc += old.to(tl.float32) * tl.load(filt_ptr + c * K + back, mask=c_ok,
                                            other=0.0).to(tl.float32)
        tl.store(hist_ptr + row * C + c, prev.to(hist_ptr.dtype.element_ty), mask=c_ok)
        prev = old.to(tl.float32)
    return acc


@triton.jit
def _featurize(p_ptr, short_ptr, short_filter_ptr, b, c, c_ok, part: tl.constexpr, D,
               SHORT: tl.constexpr):
    """The featurizer's output for channels c of part (0 q, 1 k, 2 v) of sequence b."""
    ch = part * D + c
    cur = tl.load(p_ptr + b * 3 * D + ch, mask=c_ok, other=0.0).to(tl.float32)
    return _fir_shift(short_ptr + b * (SHORT - 1) * 3 * D, short_filter_ptr, cur, ch, c_ok,
                      SHORT, 3 * D)


@triton.jit
def _hyena_step_kernel(p_ptr, short_ptr, short_filter_ptr, state_ptr, long_filter_ptr,
                       poles_ptr, residues_ptr, out_ptr, D,
                       SHORT: tl.constexpr, LONG: tl.constexpr, N: tl.constexpr,
                       BN: tl.constexpr, MODAL: tl.constexpr, BD: tl.constexpr):
    """Grid (D / BD, B). p: [B, 3D]; short history [B, SHORT-1, 3D]; short filter [3D, SHORT];
    MODAL: state [B, D, N, 2] float32, poles and residues [D, N, 2] float32; else state
    [B, LONG-1, D] and long filter [D, LONG]. out: [B, D]."""
    pid, b = tl.program_id(0), tl.program_id(1).to(tl.int64)
    c = pid * BD + tl.arange(0, BD)
    c_ok = c < D
    q = _featurize(p_ptr, short_ptr, short_filter_ptr, b, c, c_ok, 0, D, SHORT)
    k = _featurize(p_ptr, short_ptr, short_filter_ptr, b, c, c_ok, 1, D, SHORT)
    v = _featurize(p_ptr, short_ptr, short_filter_ptr, b, c, c_ok, 2, D, SHORT)
    u = k * v
    if MODAL:
        n = tl.arange(0, BN)
        mask = c_ok[:, None] & (n < N)[None, :]
        at = (c[:, None] * N + n[None, :]) * 2  # [BD, BN] offsets of (real, imag) pairs
        s_at = state_ptr + b * D * N * 2 + at
        pr = tl.load(poles_ptr + at, mask=mask, other=0.0)
        pi = tl.load(poles_ptr + at + 1, mask=mask, other=0.0)
        sr = tl.load(s_at, mask=mask, other=0.0)
        si = tl.load(s_at + 1, mask=mask, other=0.0)
        sr, si = pr * sr - pi * si + u[:, None], pr * si + pi * sr  # s <- p s + u
        tl.store(s_at, sr, mask=mask)
        tl.store(s_at + 1, si, mask=mask)
        rr = tl.load(residues_ptr + at, mask=mask, other=0.0)
        ri = tl.load(residues_ptr + at + 1, mask=mask, other=0.0)
        y = tl.sum(rr * sr - ri * si, axis=1)  # Re(sum_n R_n s_n)
    else:
        y = _fir_shift(state_ptr + b * (LONG - 1) * D, long_filter_ptr, u, c, c_ok, LONG, D)
    tl.store(out_ptr + b * D + c, (q * y).to(out_ptr.dtype.element_ty), mask=c_ok)


def hyena_step_triton_(p, short_history, short_filter, long_state, long_filter=None,
                       poles=None, residues=None):
    """The Triton path of stripes.kernels.hyena_step.hyena_step_ (same contract)."""
    B, _, three_d = p.shape
    D = three_d // 3
    modal = poles is not None
    for name, t in (("short_history", short_history), ("long_state", long_state)):
        if not t.is_contiguous():
            raise ValueError(f"hyena_step_: {name} must be contiguous (it is updated in place)")
    out = torch.empty(B, 1, D, dtype=p.dtype, device=p.device)
    if modal:
        state = torch.view_as_real(long_state)  # [B, D, N, 2] float32, shares memory
        args = (state, short_filter, torch.view_as_real(poles.contiguous()).contiguous(),
                torch.view_as_real(residues.contiguous()).contiguous())
        n = long_state.shape[-1]
    else:
        args = (long_state, long_filter.contiguous(), short_filter, short_filter)
        n = 1
    _hyena_step_kernel[(triton.cdiv(D, BD), B)](
        p.contiguous(), short_history, short_filter.contiguous(), *args, out, D,
        SHORT=short_filter.shape[1], LONG=1 if modal else long_filter.shape[1], N=n,
        BN=triton.next_power_of_2(n), MODAL=modal, BD=BD, num_warps=4)
    return out
