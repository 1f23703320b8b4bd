"""Triton kernels for the grouped gated causal conv as block-Toeplitz matmuls on tensor
cores, their launchers and autograd Function (the formula is causal_conv's, with h shared
by the channels of a group: reference.py).

Time is cut into blocks of S steps. For block n of outputs and channels of one group g,

    y[n] = sum_m  A_m @ u[n - m]          A_m[i, k] = h[g, m S + i - k]  (0 <= . < L)

with u[n - m] the [S, BC] tile of u = k v at the block m blocks earlier, so each piece is an
[S, S] @ [S, BC] matmul: the filter's taps stand on the diagonals of A_m, and the channels of
the group (which share them) are the matmul's columns. NM = (L + S - 2) // S + 1 pieces
cover taps 0..L-1. A packed document start at row t masks the pairs (t, s) with s < start(t)
out of A_m, so no tap crosses it.

Backward, with gy = dout q:
    dq[n] = dout[n] * y[n]                        (y recomputed, NM matmuls)
    du[n] = sum_m A_m^T @ gy[n + m]               (the transposed conv; dk = du v, dv = du k)
    D_m   = sum_n gy[n] @ u[n - m]^T  [S, S]      dh[g, m S + i - k] += D_m[i, k]
The D_m are summed over a span of SPAN blocks per program into float32 partials
[programs, NM, S, S] that torch adds up and folds along the diagonals (deterministic,
no atomics). The matmuls round their float32 operands (the filter, k v, dout q) to tf32's
10 mantissa bits for 16-bit activations, and run in full float32 for float32 ones; sums
are float32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from stripes.kernels.toeplitz_conv.reference import check_inputs

S = 64  # steps per block: each Toeplitz piece is [S, S]
# Blocks whose filter-gradient pieces one program sums (a multiple of the most blocks set
# side by side, 4): the float32 partials take NM S S 4 bytes per program, NM / 4 bytes per
# activation element at 16 channels a program and fewer at more.
SPAN = 64


def pieces(taps: int) -> int:
    """How many [S, S] Toeplitz pieces hold taps 0..taps-1."""
    return (taps + S - 2) // S + 1


def channel_block(group_size: int) -> int:
    """The widest channel tile (a matmul's columns, at least 16) inside one group."""
    for width in (64, 32, 16):
        if group_size % width == 0:
            return width
    raise ValueError(f"toeplitz_conv: channels per filter group must be a multiple of 16, "
                     f"got {group_size}")


@triton.jit
def _grid(n0, S: tl.constexpr, BC: tl.constexpr, NB: tl.constexpr):
    """Rows [S, NB BC] of the program's NB blocks n0.. set side by side (block j // BC in
    column j): each Toeplitz piece then multiplies all of them in one matmul."""
    block = tl.arange(0, NB * BC) // BC
    return (n0 + block)[None, :] * S + tl.arange(0, S)[:, None]


@triton.jit
def _tile(ptr, b, rows, ch, stride_b, stride_t, T):
    """[S, W] float32 tile of a [B, T, C] tensor: ptr[b, rows[i, j], ch[j]], zero outside
    0..T-1."""
    ok = (rows >= 0) & (rows < T)
    at = ptr + b.to(tl.int64) * stride_b + rows.to(tl.int64) * stride_t + ch[None, :]
    return tl.load(at, mask=ok, other=0.0).to(tl.float32)


@triton.jit
def _starts(pos_ptr, b, rows, T, HAS_POS: tl.constexpr):
    """The first row of each row's document (rows themselves past the end: no effect)."""
    if HAS_POS:
        ok = (rows >= 0) & (rows < T)
        return rows - tl.load(pos_ptr + b.to(tl.int64) * T + rows, mask=ok, other=0)
    return tl.zeros_like(rows)


@triton.jit
def _piece(h_ptr, g, L, m, out_start, in_rows, TRANSPOSED: tl.constexpr,
           HAS_POS: tl.constexpr, S: tl.constexpr):
    """A_m [S, S] (or its transpose) of group g: tap m S + i - k between output row i and
    input row k, zero where the tap is outside 0..L-1 or (with documents) input row k
    [in_rows] precedes output row i's document start [out_start]."""
    if TRANSPOSED:  # [k, i]
        i, k = tl.arange(0, S)[None, :], tl.arange(0, S)[:, None]
    else:
        i, k = tl.arange(0, S)[:, None], tl.arange(0, S)[None, :]
    tap = m * S + i - k
    ok = (tap >= 0) & (tap < L)
    if HAS_POS:
        if TRANSPOSED:
            ok &= in_rows[:, None] >= out_start[None, :]
        else:
            ok &= in_rows[None, :] >= out_start[:, None]
    return tl.load(h_ptr + g * L + tap, mask=ok, other=0.0).to(tl.float32)


@triton.jit
def _conv(k_ptr, v_ptr, h_ptr, pos_ptr, b, g, n0, rows, ch, T, L, NM, skb, skt, svb, svt,
          HAS_POS: tl.constexpr, PREC: tl.constexpr, S: tl.constexpr, W: tl.constexpr,
          NB: tl.constexpr):
    """y at the program's rows [S, W]: sum over the pieces m of A_m @ (k v)[rows - m S]."""
    t = n0 * S + tl.arange(0, S)  # block n0's rows: the documents' masks need NB = 1
    start = _starts(pos_ptr, b, t, T, HAS_POS)
    y = tl.zeros((S, W), dtype=tl.float32)
    for m in range(0, tl.minimum(NM, n0 + NB)):
        earlier = rows - m * S
        u = _tile(k_ptr, b, earlier, ch, skb, skt, T) * _tile(v_ptr, b, earlier, ch, svb, svt, T)
        a = _piece(h_ptr, g, L, m, start, t - m * S, False, HAS_POS, S)
        y += tl.dot(a, u, input_precision=PREC)
    return y


@triton.jit
def _program(pid_c, BC: tl.constexpr, NB: tl.constexpr, GROUP):
    """A program's channels per column [NB BC] and its filter group."""
    c0 = pid_c * BC
    return c0 + tl.arange(0, NB * BC) % BC, c0 // GROUP


@triton.jit
def _blocks_program(GROUP, S: tl.constexpr, BC: tl.constexpr, NB: tl.constexpr):
    """What a program of the (blocks, channel tile, batch row) grid covers: its first block
    n0, batch row b, channels per column, filter group g and rows [S, NB BC]."""
    n0, b = tl.program_id(0) * NB, tl.program_id(2)
    ch, g = _program(tl.program_id(1), BC, NB, GROUP)
    return n0, b, ch, g, _grid(n0, S, BC, NB)


@triton.jit
def _fwd_kernel(q_ptr, k_ptr, v_ptr, h_ptr, pos_ptr, out_ptr, T, C, L, NM, GROUP,
                sqb, sqt, skb, skt, svb, svt,
                HAS_POS: tl.constexpr, PREC: tl.constexpr, S: tl.constexpr, BC: tl.constexpr,
                NB: tl.constexpr):
    tl.static_assert(NB == 1 or not HAS_POS)
    n0, b, ch, g, rows = _blocks_program(GROUP, S, BC, NB)
    y = _conv(k_ptr, v_ptr, h_ptr, pos_ptr, b, g, n0, rows, ch, T, L, NM, skb, skt, svb, svt,
              HAS_POS, PREC, S, NB * BC, NB)
    out = y * _tile(q_ptr, b, rows, ch, sqb, sqt, T)
    at = out_ptr + (b.to(tl.int64) * T + rows.to(tl.int64)) * C + ch[None, :]
    tl.store(at, out.to(out_ptr.dtype.element_ty), mask=rows < T)


@triton.jit
def _bwd_kernel(q_ptr, k_ptr, v_ptr, h_ptr, pos_ptr, dout_ptr, dq_ptr, dk_ptr, dv_ptr,
                T, C, L, NM, GROUP, sqb, sqt, skb, skt, svb, svt, sdb, sdt,
                HAS_POS: tl.constexpr, PREC: tl.constexpr, S: tl.constexpr, BC: tl.constexpr,
                NB: tl.constexpr):
    """dq, dk, dv at the program's blocks (contiguous [B, T, C] outputs)."""
    tl.static_assert(NB == 1 or not HAS_POS)
    n0, b, ch, g, rows = _blocks_program(GROUP, S, BC, NB)
    y = _conv(k_ptr, v_ptr, h_ptr, pos_ptr, b, g, n0, rows, ch, T, L, NM, skb, skt, svb, svt,
              HAS_POS, PREC, S, NB * BC, NB)
    dout = _tile(dout_ptr, b, rows, ch, sdb, sdt, T)

    t = n0 * S + tl.arange(0, S)  # block n0's rows (for the documents' masks)
    du = tl.zeros((S, NB * BC), dtype=tl.float32)
    for m in range(0, tl.minimum(NM, tl.cdiv(T, S) - n0)):  # outputs m blocks later
        later = rows + m * S
        gy = _tile(dout_ptr, b, later, ch, sdb, sdt, T) * _tile(q_ptr, b, later, ch, sqb, sqt, T)
        a_t = _piece(h_ptr, g, L, m, _starts(pos_ptr, b, t + m * S, T, HAS_POS), t, True,
                     HAS_POS, S)
        du += tl.dot(a_t, gy, input_precision=PREC)

    here = rows < T
    at = (b.to(tl.int64) * T + rows.to(tl.int64)) * C + ch[None, :]
    tl.store(dq_ptr + at, (dout * y).to(dq_ptr.dtype.element_ty), mask=here)
    v = _tile(v_ptr, b, rows, ch, svb, svt, T)
    tl.store(dk_ptr + at, (du * v).to(dk_ptr.dtype.element_ty), mask=here)
    k = _tile(k_ptr, b, rows, ch, skb, skt, T)
    tl.store(dv_ptr + at, (du * k).to(dv_ptr.dtype.element_ty), mask=here)


@triton.jit
def _dh_kernel(q_ptr, k_ptr, v_ptr, pos_ptr, dout_ptr, part_ptr, T, NM,
               sqb, sqt, skb, skt, svb, svt, sdb, sdt,
               HAS_POS: tl.constexpr, PREC: tl.constexpr, S: tl.constexpr, BC: tl.constexpr,
               NB: tl.constexpr, SPAN: tl.constexpr):
    """part[program, m] = sum over the span's blocks n of gy[n] @ u[n - m]^T, [S, S] float32
    (NB blocks a matmul, their columns side by side), pairs across a document start left
    out. Programs: (span, channel block, batch row)."""
    tl.static_assert(SPAN % NB == 0 and (NB == 1 or not HAS_POS))
    pid_s, pid_c, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    ch, _ = _program(pid_c, BC, NB, 1)
    program = (b * tl.num_programs(1) + pid_c) * tl.num_programs(0) + pid_s
    first = pid_s * SPAN
    last = tl.minimum(first + SPAN, tl.cdiv(T, S))
    i, k = tl.arange(0, S)[:, None], tl.arange(0, S)[None, :]
    for m in range(0, NM):
        acc = tl.zeros((S, S), dtype=tl.float32)
        for n0 in range(first, last, NB):  # a span's last blocks past T load as zeros
            rows = _grid(n0, S, BC, NB)
            earlier = rows - m * S
            gy = _tile(dout_ptr, b, rows, ch, sdb, sdt, T) * _tile(q_ptr, b, rows, ch, sqb,
                                                                    sqt, T)
            u = _tile(k_ptr, b, earlier, ch, skb, skt, T) * _tile(v_ptr, b, earlier, ch, svb,
                                                                   svt, T)
            d = tl.dot(gy, tl.trans(u), input_precision=PREC)
            if HAS_POS:
                t = n0 * S + tl.arange(0, S)
                start = _starts(pos_ptr, b, t, T, HAS_POS)
                d = tl.where((t - m * S)[None, :] >= start[:, None], d, 0.0)
            acc += d
        tl.store(part_ptr + ((program.to(tl.int64) * NM + m) * S + i) * S + k, acc)


def side_by_side(bc: int, positions: torch.Tensor | None) -> int:
    """Blocks a program multiplies at once: enough for 64 columns, so each Toeplitz piece
    loaded serves as many outputs as with a 64-channel group; one block with documents,
    whose masks differ from block to block."""
    return 1 if positions is not None else 64 // bc


def _prec(x: torch.Tensor) -> str:
    return "ieee" if x.dtype == torch.float32 else "tf32"


def _fold_diagonals(part: torch.Tensor, groups: int, taps: int) -> torch.Tensor:
    """part [channel blocks, NM, S, S] summed to dh [G, taps]: D_m[i, k] adds to tap
    m S + i - k (a group's channel blocks are consecutive). Each piece's diagonals are
    summed by a gather (offsets -(S - 1)..S - 1, short ones padded with a zero), then the
    pieces overlap-added: no atomics, so the same inputs give the same bits."""
    nm = part.shape[1]
    d = part.reshape(groups, -1, nm, S * S).sum(1)  # [G, NM, S S]
    d = torch.cat([d, d.new_zeros(groups, nm, 1)], dim=2)
    offset = torch.arange(-(S - 1), S, device=d.device)[:, None]  # i - k, [2S - 1, 1]
    k = torch.arange(S, device=d.device)[None, :]
    i = offset + k
    flat = torch.where((i >= 0) & (i < S), i * S + k, S * S)  # [2S - 1, S]
    diagonals = d[:, :, flat].sum(-1)  # [G, NM, 2S - 1]
    dh = d.new_zeros(groups, max(nm * S, taps) + S - 1)  # tap + S - 1
    for m in range(nm):
        dh[:, m * S:m * S + 2 * S - 1] += diagonals[:, m]
    return dh[:, S - 1:S - 1 + taps]


def _plan(q: torch.Tensor, h: torch.Tensor, positions: torch.Tensor | None) -> dict:
    """The launch shape both passes share: channels a group, tile width, pieces, blocks
    side by side."""
    T, C = q.shape[1:]
    G, L = h.shape
    bc = channel_block(C // G)
    return {"group": C // G, "bc": bc, "nm": pieces(min(L, T)),
            "nb": side_by_side(bc, positions)}


def _strides(*tensors: torch.Tensor) -> list[int]:
    return [s for t in tensors for s in (t.stride(0), t.stride(1))]


class ToeplitzConvFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, h, positions):
        (B, T, C), L = q.shape, h.shape[1]
        p = _plan(q, h, positions)
        h_dtype, h = h.dtype, h.float().contiguous()
        out = torch.empty(B, T, C, dtype=q.dtype, device=q.device)
        if out.numel():
            _fwd_kernel[(triton.cdiv(triton.cdiv(T, S), p["nb"]), C // p["bc"], B)](
                q, k, v, h, q if positions is None else positions, out, T, C, L, p["nm"],
                p["group"], *_strides(q, k, v), HAS_POS=positions is not None, PREC=_prec(q),
                S=S, BC=p["bc"], NB=p["nb"])
        ctx.save_for_backward(q, k, v, h, positions)
        ctx.h_dtype = h_dtype
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        q, k, v, h, positions = ctx.saved_tensors
        (B, T, C), (G, L) = q.shape, h.shape
        p = _plan(q, h, positions)
        bc, nm = p["bc"], p["nm"]
        if dout.stride(2) != 1:
            dout = dout.contiguous()
        dq, dk, dv = (torch.empty(B, T, C, dtype=x.dtype, device=x.device) for x in (q, k, v))
        n_blocks = triton.cdiv(T, S)
        n_spans = triton.cdiv(n_blocks, SPAN)
        part = torch.empty(B, C // bc, n_spans, nm, S, S, dtype=torch.float32,
                           device=q.device)
        pos = q if positions is None else positions
        if dq.numel():
            flags = dict(HAS_POS=positions is not None, PREC=_prec(q), S=S, BC=bc, NB=p["nb"])
            _bwd_kernel[(triton.cdiv(n_blocks, p["nb"]), C // bc, B)](
                q, k, v, h, pos, dout, dq, dk, dv, T, C, L, nm, p["group"],
                *_strides(q, k, v, dout), **flags)
            _dh_kernel[(n_spans, C // bc, B)](
                q, k, v, pos, dout, part, T, nm, *_strides(q, k, v, dout), SPAN=SPAN, **flags)
        dh = (_fold_diagonals(part.sum((0, 2)), G, L) if dq.numel()
              else torch.zeros(G, L, device=q.device))
        return dq, dk, dv, dh.to(ctx.h_dtype), None


def toeplitz_conv_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, h: torch.Tensor,
                         positions: torch.Tensor | None = None) -> torch.Tensor:
    """The Triton path of stripes.kernels.toeplitz_conv.toeplitz_gated_conv (same contract;
    C/G a multiple of 16, channels contiguous)."""
    check_inputs(q, k, v, h, positions)
    channel_block(q.shape[2] // h.shape[0])  # raises for groups the matmuls can't take
    if positions is not None:
        positions = positions.to(torch.int32).contiguous()
    q, k, v = (t if t.stride(2) == 1 else t.contiguous() for t in (q, k, v))
    return ToeplitzConvFunction.apply(q, k, v, h, positions)
