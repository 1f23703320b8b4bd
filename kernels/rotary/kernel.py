"""Triton kernel for rotary position embedding, forward and backward in one body.

Work split: one program per (token row (b, t), block of BLOCK_H heads). The program loads
its row of the cos/sin tables once ([Dh/2] float32) and reuses it for every head in the
block, and for typical sizes (H * Dh up to a few thousand) one block covers all heads, so
it is one program per token. Blocking heads rather than always taking all of them keeps the
tile (BLOCK_H x Dh/2 pairs) bounded for models with many heads, where a whole row would
spill registers. Grid axis 0 is B*T (up to 2^31 - 1), axis 1 the few head blocks: of q,
then of k when the pair is rotated together, so attention pays one launch each way for
both (launched eagerly, these kernels are short enough for the host's launch cost to show).

x is addressed through its B, T, H strides, so q or k sliced out of a fused qkv projection
is read in place; only the last dim must be contiguous. The output is a new contiguous
tensor. The rotation is orthogonal, so the backward is this kernel with the angle negated
(sin -> -sin) applied to grad_out: nothing but the tables is kept for it.

interleaved=False pairs channel i with i + Dh/2: the two halves are two contiguous loads.
interleaved=True pairs 2i with 2i + 1: the whole head is one contiguous load, split into
even and odd channels in registers (reshape to [.., Dh/2, 2] + split), and joined back the
same way for the store, so both layouts move memory in wide vector accesses.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from stripes.kernels.rotary.reference import check_rotary_inputs

MAX_PAIRS = 2048  # pairs (BLOCK_H * BLOCK_HALF) per program: 4096 elements of x
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# offset changes every decoding step: do not compile a variant per value of it.
@triton.jit(do_not_specialize=["offset"])
def _rotary_kernel(a_ptr, b_ptr, a_out_ptr, b_out_ptr, cos_ptr, sin_ptr,
                   T, H_A, H_B, HALF, offset, blocks_a,
                   stride_ab, stride_at, stride_ah, stride_bb, stride_bt, stride_bh,
                   stride_cos, stride_sin,
                   INTERLEAVED: tl.constexpr, INVERSE: tl.constexpr,
                   BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    row = tl.program_id(0)  # b * T + t
    batch = (row // T).to(tl.int64)
    t = (row % T).to(tl.int64)
    # Head blocks [0, blocks_a) rotate tensor a (q), the rest tensor b (k): one launch for both.
    block = tl.program_id(1)
    if block < blocks_a:
        x_row = a_ptr + batch * stride_ab + t * stride_at
        stride_h = stride_ah
        n_heads = H_A
        out_ptr = a_out_ptr
    else:
        block -= blocks_a
        x_row = b_ptr + batch * stride_bb + t * stride_bt
        stride_h = stride_bh
        n_heads = H_B
        out_ptr = b_out_ptr
    heads = block * BLOCK_H + tl.arange(0, BLOCK_H)  # [BLOCK_H]
    pairs = tl.arange(0, BLOCK_HALF)  # [BLOCK_HALF]
    pair_mask = pairs < HALF

    position = offset + t
    cos = tl.load(cos_ptr + position * stride_cos + pairs, mask=pair_mask, other=0.0)
    sin = tl.load(sin_ptr + position * stride_sin + pairs, mask=pair_mask, other=0.0)
    cos = cos.to(tl.float32)[None, :]  # [1, BLOCK_HALF]
    sin = sin.to(tl.float32)[None, :]
    if INVERSE:  # the transpose of a rotation is the rotation by the opposite angle
        sin = -sin

    head_mask = (heads < n_heads)[:, None]  # [BLOCK_H, 1]
    x_head = x_row + heads[:, None].to(tl.int64) * stride_h
    # The output is a new contiguous [B, T, H, Dh] tensor: its strides follow from the shape.
    o_head = out_ptr + ((batch * T + t) * n_heads + heads[:, None].to(tl.int64)) * (2 * HALF)
    if INTERLEAVED:
        # Load each head's Dh channels as one contiguous (vectorisable) run and split the
        # pairs in registers: two stride-2 loads would each move single elements.
        cols = tl.arange(0, 2 * BLOCK_HALF)  # [2 * BLOCK_HALF]
        mask = head_mask & (cols < 2 * HALF)[None, :]  # [BLOCK_H, 2 * BLOCK_HALF]
        x = tl.load(x_head + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        x_a, x_b = tl.split(tl.reshape(x, (BLOCK_H, BLOCK_HALF, 2)))  # [BLOCK_H, BLOCK_HALF]
    else:
        mask = head_mask & pair_mask[None, :]  # [BLOCK_H, BLOCK_HALF]
        x_a = tl.load(x_head + pairs[None, :], mask=mask, other=0.0).to(tl.float32)
        x_b = tl.load(x_head + HALF + pairs[None, :], mask=mask, other=0.0).to(tl.float32)

    out_a = x_a * cos - x_b * sin  # [BLOCK_H, BLOCK_HALF]
    out_b = x_b * cos + x_a * sin

    if INTERLEAVED:
        out = tl.reshape(tl.join(out_a, out_b), (BLOCK_H, 2 * BLOCK_HALF))  # pairs side by side
        tl.store(o_head + cols[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(o_head + pairs[None, :], out_a.to(out_ptr.dtype.element_ty), mask=mask)
        tl.store(o_head + HALF + pairs[None, :], out_b.to(out_ptr.dtype.element_ty), mask=mask)


def rotary_launch(xs: tuple[torch.Tensor, ...], cos: torch.Tensor, sin: torch.Tensor,
                  offset: int, interleaved: bool, inverse: bool) -> tuple[torch.Tensor, ...]:
    """xs: one or two [B, T, H_i, Dh] tensors of one dtype, B, T and Dh shared (B, T, H any
    strides); cos, sin: [L, Dh/2]. Returns each rotated by +angle (inverse=False) or -angle,
    contiguous, in one launch."""
    xs = tuple(x if x.stride(-1) == 1 else x.contiguous() for x in xs)  # channels consecutive
    cos, sin = cos.contiguous(), sin.contiguous()  # tables are small: a copy is cheap
    outs = tuple(torch.empty(x.shape, dtype=x.dtype, device=x.device) for x in xs)
    a, b = xs if len(xs) == 2 else (xs[0], xs[0])
    a_out, b_out = outs if len(outs) == 2 else (outs[0], outs[0])
    if all(x.numel() == 0 for x in xs):
        return outs
    B, T, _, Dh = a.shape
    half = Dh // 2
    block_half = triton.next_power_of_2(half)
    heads = max(x.shape[2] for x in xs)
    block_h = min(triton.next_power_of_2(heads), max(1, MAX_PAIRS // block_half))
    num_warps = 4 if block_h * block_half <= 1024 else 8
    blocks = [triton.cdiv(x.shape[2], block_h) for x in xs]
    grid = (B * T, sum(blocks))
    _rotary_kernel[grid](
        a, b, a_out, b_out, cos, sin, T, a.shape[2], b.shape[2], half, offset, blocks[0],
        a.stride(0), a.stride(1), a.stride(2), b.stride(0), b.stride(1), b.stride(2),
        cos.stride(0), sin.stride(0),
        INTERLEAVED=interleaved, INVERSE=inverse, BLOCK_H=block_h, BLOCK_HALF=block_half,
        num_warps=num_warps)
    return outs


class RotaryFunction(torch.autograd.Function):
    """Rotates one tensor or a pair (q, k): each direction is one launch."""

    @staticmethod
    def forward(ctx, cos: torch.Tensor, sin: torch.Tensor, offset: int, interleaved: bool,
                *xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        ctx.save_for_backward(cos, sin)
        ctx.offset, ctx.interleaved = offset, interleaved
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None
        return rotary_launch(xs, cos, sin, offset, interleaved, inverse=False)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor | None):
        cos, sin = ctx.saved_tensors
        used = [g for g in grads if g is not None]
        rotated = iter(rotary_launch(tuple(used), cos, sin, ctx.offset, ctx.interleaved,
                                     inverse=True) if used else ())
        grad_xs = [None if g is None else next(rotated) for g in grads]
        return None, None, None, None, *grad_xs  # tables, offset and layout take no gradient


def _check_triton_inputs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                         offset: int) -> None:
    check_rotary_inputs(x, cos, sin, offset)
    if x.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"apply_rotary_triton: dtype {x.dtype} is not supported, use "
                         "float32, bfloat16 or float16")
    if cos.requires_grad or sin.requires_grad:
        raise ValueError("apply_rotary_triton: cos and sin are constant tables and take no "
                         "gradient here; pass them detached")


def apply_rotary_triton(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                        offset: int = 0, interleaved: bool = False) -> torch.Tensor:
    """Rotary embedding through the Triton kernel; see stripes.kernels.rotary.apply_rotary."""
    _check_triton_inputs(x, cos, sin, offset)
    return RotaryFunction.apply(cos, sin, offset, interleaved, x)[0]


def apply_rotary_qk_triton(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                           sin: torch.Tensor, offset: int = 0, interleaved: bool = False
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """q and k rotated in one launch each way; see stripes.kernels.rotary.apply_rotary_qk."""
    for x in (q, k):
        _check_triton_inputs(x, cos, sin, offset)
    if q.dtype != k.dtype or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"apply_rotary_qk_triton: q {q.dtype} {tuple(q.shape)} and k "
                         f"{k.dtype} {tuple(k.shape)} must share dtype, B, T and Dh")
    return RotaryFunction.apply(cos, sin, offset, interleaved, q, k)
