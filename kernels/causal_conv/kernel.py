"""Triton kernels for the gated causal depthwise convolution (reference.py has the formula),
its launchers and autograd Function.

Work split: one program per (block of BT steps, block of BC channels, batch row); it loops
over the L taps, loading the rows t - j of its block for each (the block's inputs plus an
(L-1)-row halo, re-read from L1/L2 rather than from memory). Backward, with
gy = dout * gate (the gradient of y) and the same tiling:
    loop over taps j, rows t - j:  y (again, for dgate),  dh[c, j] += sum_t gy[t] u[t - j]
    loop over taps j, rows s + j:  du[s] += h[c, j] gy[s + j]       (the transposed conv)
then dx = du * x2, dx2 = du * x, dgate = dout * y, dbias = sum gy. With the SiLU, gy also
carries silu'(pre) at its row, pre being the conv's output before the activation: pre is
recomputed (L taps) at rows t rather than stored forward, and backward runs in two passes,
the taps' loop storing gy (float32 [B, T, C]) and the transposed loop reading it, since the
transposed loop would otherwise recompute pre at every row s + j. dh and dbias are summed
per program into float32 partials [B * T-blocks, C, L] that torch adds up: a tap's gradient
is a reduction over every token, and partials keep it deterministic without atomics.
A tap j contributes at t only when j <= pos[t] (pos: steps since t's document start); in
the transposed loop, row s + j counts when pos[s + j] >= j, the same pairs.
Inputs may be views with any batch and time strides (q, k and v chunked out of one
projection are read in place); channels must be contiguous. With `split`, the output is
handed on as up to three pieces of its channels (Hyena's q | k | v, Mamba's x | B | C), and
backward reads each piece's gradient where it lies: autograd's split would first copy them
into one [B, T, C] gradient (0.10-0.13 ms a layer at hybrid-1b's shapes in an H100 profile).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

BT, BC = 64, 64  # steps x channels per program
BWD_WARPS = 4  # warps of a backward program


@triton.jit
def _load_rows(ptr, b, rows, c, stride_b, stride_t, mask):
    """[BT, BC] float32 tile of a [B, T, C] tensor at rows `rows`, channels c."""
    at = ptr + b.to(tl.int64) * stride_b + rows.to(tl.int64)[:, None] * stride_t + c[None, :]
    return tl.load(at, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _load_dout(d0_ptr, d1_ptr, d2_ptr, b, rows, c, c1, c2, s0b, s0t, s1b, s1t, s2b, s2t,
               mask, PIECES: tl.constexpr):
    """The output's gradient at rows `rows`, channels c, [BT, BC] float32, read from its
    pieces: channels [0, c1) from d0, [c1, c2) from d1 and [c2, C) from d2, as many pieces
    as PIECES (c2 = C for two), each at its own strides."""
    if PIECES == 1:
        return _load_rows(d0_ptr, b, rows, c, s0b, s0t, mask)
    g = _load_rows(d0_ptr, b, rows, c, s0b, s0t, mask & (c < c1)[None, :])
    g += _load_rows(d1_ptr, b, rows, c - c1, s1b, s1t, mask & ((c >= c1) & (c < c2))[None, :])
    if PIECES == 3:
        g += _load_rows(d2_ptr, b, rows, c - c2, s2b, s2t, mask & (c >= c2)[None, :])
    return g


@triton.jit
def _tap_input(x_ptr, x2_ptr, b, t, t_ok, pos, j, c, c_ok, sxb, sxt, sx2b, sx2t,
               HAS_X2: tl.constexpr):
    """u = x x2 at rows t - j [BT, BC], zero where the tap leaves the sequence or t's
    document (j > pos)."""
    rows = t - j
    mask = ((rows >= 0) & (pos >= j) & t_ok)[:, None] & c_ok[None, :]
    u = _load_rows(x_ptr, b, rows, c, sxb, sxt, mask)
    if HAS_X2:
        u *= _load_rows(x2_ptr, b, rows, c, sx2b, sx2t, mask)
    return u


@triton.jit
def _tap(h_ptr, c, c_ok, j, L):
    """h[c, j] as a [1, BC] float32 row."""
    return tl.load(h_ptr + c * L + j, mask=c_ok, other=0.0).to(tl.float32)[None, :]


@triton.jit
def _conv_rows(x_ptr, x2_ptr, h_ptr, bias_ptr, b, t, t_ok, pos, c, c_ok, L,
               sxb, sxt, sx2b, sx2t, HAS_X2: tl.constexpr, HAS_BIAS: tl.constexpr,
               BT: tl.constexpr, BC: tl.constexpr):
    """The conv's output before activation and gate, bias + sum_j h[c, j] u[t - j], [BT, BC]
    float32 at rows t (pos: their steps since their documents' starts)."""
    y = tl.zeros((BT, BC), dtype=tl.float32)
    for j in range(L):
        u = _tap_input(x_ptr, x2_ptr, b, t, t_ok, pos, j, c, c_ok, sxb, sxt, sx2b, sx2t, HAS_X2)
        y += u * _tap(h_ptr, c, c_ok, j, L)
    if HAS_BIAS:
        y += tl.load(bias_ptr + c, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    return y


@triton.jit
def _silu_and_slope(pre):
    """silu(pre) and its derivative sigmoid(pre) (1 + pre (1 - sigmoid(pre)))."""
    sig = tl.sigmoid(pre)
    return pre * sig, sig * (1.0 + pre * (1.0 - sig))


@triton.jit
def _conv_fwd_kernel(x_ptr, x2_ptr, gate_ptr, h_ptr, bias_ptr, pos_ptr, out_ptr, T, C, L,
                     sxb, sxt, sx2b, sx2t, sgb, sgt, sob, sot,
                     HAS_X2: tl.constexpr, HAS_GATE: tl.constexpr, HAS_BIAS: tl.constexpr,
                     HAS_POS: tl.constexpr, SILU: tl.constexpr, BT: tl.constexpr,
                     BC: tl.constexpr):
    pid_t, pid_c, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    t = pid_t * BT + tl.arange(0, BT)  # [BT]
    c = pid_c * BC + tl.arange(0, BC)  # [BC]
    t_ok, c_ok = t < T, c < C
    pos = tl.load(pos_ptr + b.to(tl.int64) * T + t, mask=t_ok, other=0) if HAS_POS else t
    y = _conv_rows(x_ptr, x2_ptr, h_ptr, bias_ptr, b, t, t_ok, pos, c, c_ok, L,
                   sxb, sxt, sx2b, sx2t, HAS_X2, HAS_BIAS, BT, BC)
    if SILU:
        y = y * tl.sigmoid(y)
    mask = t_ok[:, None] & c_ok[None, :]
    if HAS_GATE:
        y *= _load_rows(gate_ptr, b, t, c, sgb, sgt, mask)
    at = out_ptr + b.to(tl.int64) * sob + t.to(tl.int64)[:, None] * sot + c[None, :]
    tl.store(at, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _conv_bwd_kernel(x_ptr, x2_ptr, gate_ptr, h_ptr, bias_ptr, pos_ptr, d0_ptr, d1_ptr,
                     d2_ptr, dx_ptr, dx2_ptr, dgate_ptr, dh_ptr, dbias_ptr, gy_ptr, T, C, L,
                     c1, c2, sxb, sxt, sx2b, sx2t, sgb, sgt, s0b, s0t, s1b, s1t, s2b, s2t,
                     syb, syt, HAS_X2: tl.constexpr, HAS_GATE: tl.constexpr,
                     HAS_BIAS: tl.constexpr, HAS_POS: tl.constexpr, SILU: tl.constexpr,
                     PASS: tl.constexpr, PIECES: tl.constexpr, BT: tl.constexpr,
                     BC: tl.constexpr):
    """dx, dx2, dgate: contiguous [B, T, C]; dh: [B * n_tblocks, C, L] and dbias:
    [B * n_tblocks, C] float32 partials. The output's gradient comes in PIECES pieces
    (_load_dout), gy has strides (syb, syt).
    Without the SiLU, PASS 0 does everything; with it, PASS 1 (the taps, dgate) stores gy
    float32 in gy [B, T, C] and PASS 2 (the transposed conv, dx) reads it (see the top of
    the file)."""
    tl.static_assert(PASS != 0 or not SILU, "the SiLU's backward takes passes 1 and 2")
    pid_t, pid_c, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    t = pid_t * BT + tl.arange(0, BT)
    c = pid_c * BC + tl.arange(0, BC)
    t_ok, c_ok = t < T, c < C
    here = t_ok[:, None] & c_ok[None, :]
    pos = tl.load(pos_ptr + b.to(tl.int64) * T + t, mask=t_ok, other=0) if HAS_POS else t
    out_at = b.to(tl.int64) * T * C + t.to(tl.int64)[:, None] * C + c[None, :]

    if PASS != 2:
        part = (b * tl.num_programs(0) + pid_t).to(tl.int64)
        dout = _load_dout(d0_ptr, d1_ptr, d2_ptr, b, t, c, c1, c2, s0b, s0t, s1b, s1t, s2b,
                          s2t, here, PIECES)
        gy = dout * _load_rows(gate_ptr, b, t, c, sgb, sgt, here) if HAS_GATE else dout
        if SILU:  # y is the activation's output (for dgate); gy moves to its input
            y, slope = _silu_and_slope(_conv_rows(x_ptr, x2_ptr, h_ptr, bias_ptr, b, t, t_ok,
                                                  pos, c, c_ok, L, sxb, sxt, sx2b, sx2t,
                                                  HAS_X2, HAS_BIAS, BT, BC))
            gy *= slope
        else:  # y is summed in the taps' loop below, where it costs no extra read
            y = tl.zeros((BT, BC), dtype=tl.float32)
            if HAS_BIAS:
                y += tl.load(bias_ptr + c, mask=c_ok, other=0.0).to(tl.float32)[None, :]
        # Taps reading rows t - j: dh's partial sums (and y, without the SiLU).
        for j in range(L):
            u = _tap_input(x_ptr, x2_ptr, b, t, t_ok, pos, j, c, c_ok, sxb, sxt, sx2b, sx2t,
                           HAS_X2)
            if HAS_GATE and not SILU:
                y += u * _tap(h_ptr, c, c_ok, j, L)
            tl.store(dh_ptr + (part * C + c) * L + j, tl.sum(gy * u, axis=0), mask=c_ok)
        if HAS_BIAS:
            tl.store(dbias_ptr + part * C + c, tl.sum(gy, axis=0), mask=c_ok)
        if HAS_GATE:
            tl.store(dgate_ptr + out_at, (dout * y).to(dgate_ptr.dtype.element_ty), mask=here)
        if PASS == 1:
            tl.store(gy_ptr + out_at, gy, mask=here)

    if PASS != 1:  # taps read from rows s + j: the transposed convolution gives du
        du = tl.zeros((BT, BC), dtype=tl.float32)
        for j in range(L):
            rows = t + j
            row_ok = (rows < T) & t_ok
            if HAS_POS:
                later = tl.load(pos_ptr + b.to(tl.int64) * T + rows, mask=row_ok, other=-1)
                row_ok = row_ok & (later >= j)
            mask = row_ok[:, None] & c_ok[None, :]
            if PASS == 2:
                g = _load_rows(gy_ptr, b, rows, c, syb, syt, mask)
            else:
                g = _load_dout(d0_ptr, d1_ptr, d2_ptr, b, rows, c, c1, c2, s0b, s0t, s1b,
                               s1t, s2b, s2t, mask, PIECES)
                if HAS_GATE:
                    g *= _load_rows(gate_ptr, b, rows, c, sgb, sgt, mask)
            du += g * _tap(h_ptr, c, c_ok, j, L)
        if HAS_X2:
            x = _load_rows(x_ptr, b, t, c, sxb, sxt, here)
            x2 = _load_rows(x2_ptr, b, t, c, sx2b, sx2t, here)
            tl.store(dx_ptr + out_at, (du * x2).to(dx_ptr.dtype.element_ty), mask=here)
            tl.store(dx2_ptr + out_at, (du * x).to(dx2_ptr.dtype.element_ty), mask=here)
        else:
            tl.store(dx_ptr + out_at, du.to(dx_ptr.dtype.element_ty), mask=here)


def _strides(t: torch.Tensor | None, like: torch.Tensor) -> tuple[int, int]:
    t = like if t is None else t
    return t.stride(0), t.stride(1)


def _channels_contiguous(t: torch.Tensor | None) -> torch.Tensor | None:
    return t if t is None or t.stride(2) == 1 else t.contiguous()


class CausalConvFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, h, bias, x2, gate, positions, silu, split):
        x, x2, gate = (_channels_contiguous(t) for t in (x, x2, gate))
        h = h.contiguous()
        B, T, C = x.shape
        out = torch.empty(B, T, C, dtype=x.dtype, device=x.device)
        grid = (triton.cdiv(T, BT), triton.cdiv(C, BC), B)
        if out.numel():
            _conv_fwd_kernel[grid](
                x, x if x2 is None else x2, x if gate is None else gate, h,
                h if bias is None else bias, x if positions is None else positions, out,
                T, C, h.shape[1], *_strides(x, x), *_strides(x2, x), *_strides(gate, x),
                *_strides(out, out), HAS_X2=x2 is not None, HAS_GATE=gate is not None,
                HAS_BIAS=bias is not None, HAS_POS=positions is not None, SILU=silu, BT=BT,
                BC=BC)
        ctx.save_for_backward(x, h, bias, x2, gate, positions)
        ctx.silu = silu
        return out if split is None else out.split(split, dim=-1)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *douts):
        x, h, bias, x2, gate, positions = ctx.saved_tensors
        B, T, C = x.shape
        L = h.shape[1]
        douts = [_channels_contiguous(d) for d in douts]  # one a piece (zeros if unused)
        starts = [0]
        for d in douts[:-1]:
            starts.append(starts[-1] + d.shape[2])
        c1, c2 = (starts + [C, C])[1:3]
        pieces = (douts + douts[:1] * 2)[:3]  # unused pointer slots repeat the first piece
        n_tblocks = triton.cdiv(T, BT)
        dx = torch.empty(B, T, C, dtype=x.dtype, device=x.device)
        dx2 = torch.empty_like(dx, dtype=x2.dtype) if x2 is not None else None
        dgate = torch.empty_like(dx, dtype=gate.dtype) if gate is not None else None
        dh = torch.zeros(B * n_tblocks, C, L, dtype=torch.float32, device=x.device)
        dbias = (torch.zeros(B * n_tblocks, C, dtype=torch.float32, device=x.device)
                 if bias is not None else None)
        if dx.numel():
            # The SiLU's two passes share gy through memory (see the kernel).
            gy = torch.empty(B, T, C, dtype=torch.float32, device=x.device) if ctx.silu else dx
            for pass_ in (1, 2) if ctx.silu else (0,):
                _conv_bwd_kernel[(n_tblocks, triton.cdiv(C, BC), B)](
                    x, x if x2 is None else x2, x if gate is None else gate, h,
                    h if bias is None else bias, x if positions is None else positions,
                    *pieces, dx, dx if dx2 is None else dx2, dx if dgate is None else dgate,
                    dh, dh if dbias is None else dbias, gy, T, C, L, c1, c2,
                    *_strides(x, x), *_strides(x2, x), *_strides(gate, x),
                    *(s for d in pieces for s in _strides(d, d)), *_strides(gy, gy),
                    HAS_X2=x2 is not None, HAS_GATE=gate is not None,
                    HAS_BIAS=bias is not None, HAS_POS=positions is not None, SILU=ctx.silu,
                    PASS=pass_, PIECES=len(douts), BT=BT, BC=BC, num_warps=BWD_WARPS)
        return (dx, dh.sum(0).to(h.dtype), None if dbias is None else dbias.sum(0).to(bias.dtype),
                dx2, dgate, None, None, None)


def causal_conv_triton(x: torch.Tensor, h: torch.Tensor, bias: torch.Tensor | None = None,
                       x2: torch.Tensor | None = None, gate: torch.Tensor | None = None,
                       positions: torch.Tensor | None = None, silu: bool = False,
                       split: Sequence[int] | None = None
                       ) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """The Triton path of stripes.kernels.causal_conv.causal_conv (same contract)."""
    from stripes.kernels.causal_conv.reference import check_inputs

    check_inputs(x, h, bias, x2, gate, positions, split)
    if positions is not None:
        positions = positions.to(torch.int32).contiguous()
    return CausalConvFunction.apply(x, h, bias, x2, gate, positions, silu,
                                    None if split is None else tuple(split))
