"""Triton kernel for rotary position embedding, forward and backward in one body.

Work split: one program per (token row (b, t), block of BLOCK_H heads). The program loads
its row of the cos/sin tables once ([Dh/2] float32) and reuses it for every head in the
block, and for typical sizes (H * Dh up to a few thousand) one block covers all heads, so
it is one program per token. Blocking heads rather than always taking all of them keeps the
tile (BLOCK_H x Dh/2 pairs) bounded for models with many heads, where a whole row would
spill registers. Grid axis 0 is B*T (up to 2^31 - 1), axis 1 the few head blocks.

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
def _rotary_kernel(x_ptr, cos_ptr, sin_ptr, out_ptr,
                   T, H, HALF, offset,
                   stride_xb, stride_xt, stride_xh,
                   stride_ob, stride_ot, stride_oh,
                   stride_cos, stride_sin,
                   INTERLEAVED: tl.constexpr, INVERSE: tl.constexpr,
                   BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    row = tl.program_id(0)  # b * T + t
    batch = (row // T).to(tl.int64)
    t = (row % T).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)  # [BLOCK_H]
    pairs = tl.arange(0, BLOCK_HALF)  # [BLOCK_HALF]
    pair_mask = pairs < HALF

    position = offset + t
    cos = tl.load(cos_ptr + position * stride_cos + pairs, mask=pair_mask, other=0.0)
    sin = tl.load(sin_ptr + position * stride_sin + pairs, mask=pair_mask, other=0.0)
    cos = cos.to(tl.float32)[None, :]  # [1, BLOCK_HALF]
    sin = sin.to(tl.float32)[None, :]
    if INVERSE:  # the transpose of a rotation is the rotation by the opposite angle
        sin = -sin

    head_mask = (heads < H)[:, None]  # [BLOCK_H, 1]
    x_head = x_ptr + batch * stride_xb + t * stride_xt + heads[:, None].to(tl.int64) * stride_xh
    o_head = out_ptr + batch * stride_ob + t * stride_ot + heads[:, None].to(tl.int64) * stride_oh
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

def rotary_launch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, offset: int,
                  interleaved: bool, inverse: bool) -> torch.Tensor:
    """x: [B, T, H, Dh] (B, T, H any strides); cos, sin: [L, Dh/2] -> [B, T, H, Dh] rotated
    by +angle (inverse=False) or -angle (inverse=True), contiguous, in x's dtype."""
    if x.stride(-1) != 1:  # the kernel addresses channels as consecutive elements
        x = x.contiguous()
    cos, sin = cos.contiguous(), sin.contiguous()  # tables are small: a copy is cheap
    B, T, H, Dh = x.shape
    out = torch.empty((B, T, H, Dh), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    half = Dh // 2
    block_half = triton.next_power_of_2(half)
    block_h = min(triton.next_power_of_2(H), max(1, MAX_PAIRS // block_half))
    num_warps = 4 if block_h * block_half <= 1024 else 8
    grid = (B * T, triton.cdiv(H, block_h))
    _rotary_kernel[grid](
        x, cos, sin, out, T, H, half, offset,
        x.stride(0), x.stride(1), x.stride(2), out.stride(0), out.stride(1), out.stride(2),
        cos.stride(0), sin.stride(0),
        INTERLEAVED=interleaved, INVERSE=inverse, BLOCK_H=block_h, BLOCK_HALF=block_half,
        num_warps=num_warps)
    return out


class RotaryFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, offset: int,
                interleaved: bool) -> torch.Tensor:
        ctx.save_for_backward(cos, sin)
        ctx.offset, ctx.interleaved = offset, interleaved
        return rotary_launch(x, cos, sin, offset, interleaved, inverse=False)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        cos, sin = ctx.saved_tensors
        grad_x = rotary_launch(grad_out, cos, sin, ctx.offset, ctx.interleaved, inverse=True)
        return grad_x, None, None, None, None  # tables, offset and layout take no gradient


def apply_rotary_triton(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                        offset: int = 0, interleaved: bool = False) -> torch.Tensor:
    """Rotary embedding through the Triton kernel; see stripes.kernels.rotary.apply_rotary."""
    check_rotary_inputs(x, cos, sin, offset)
    if x.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"apply_rotary_triton: dtype {x.dtype} is not supported, use "
                         "float32, bfloat16 or float16")
    if cos.requires_grad or sin.requires_grad:
        raise ValueError("apply_rotary_triton: cos and sin are constant tables and take no "
                         "gradient here; pass them detached")
    return RotaryFunction.apply(x, cos, sin, offset, interleaved)
