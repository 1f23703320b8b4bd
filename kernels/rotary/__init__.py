"""Rotary position embedding (Su et al., 2021) applied to [B, T, H, Dh] in one kernel.

Unfused, PyTorch materialises the two halves, four products and a concatenation, and
autograd keeps the upcast input. The kernel reads x once (any strides on B, T and H, so q
and k split from a fused qkv projection are read in place) and writes the rotated copy once;
its backward is the same kernel turning the other way, so nothing but the angle tables is
kept for it.
"""

from __future__ import annotations

import torch

from stripes.kernels.dispatch import use_triton
from stripes.kernels.rotary.reference import apply_rotary as apply_rotary_reference
from stripes.kernels.rotary.reference import apply_rotary_qk as apply_rotary_qk_reference

# The Triton kernel computes in float32, so float64 inputs (tests, numerics checks) run the
# reference even on CUDA, where they keep their float64 precision.
TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, offset: int = 0,
                 interleaved: bool = False) -> torch.Tensor:
    """Rotate each channel pair of every head of x by its position's angle.

    x: [B, T, H, Dh] with Dh even, float32, bfloat16 or float16 on the Triton path (any
    floating dtype in the reference); the last dim should be contiguous (otherwise x is
    copied), B, T and H may have any strides. cos, sin: [L, Dh/2] float32 tables (e.g. from
    stripes.arch.rope.rope_angles) with L >= offset + T; token t uses row offset + t, so a
    decoding step at position p passes T = 1 and offset = p.
    interleaved=False pairs (x[i], x[i + Dh/2]) (Llama / rotate-half, what stripes uses);
    interleaved=True pairs (x[2i], x[2i+1]) (GPT-J / RoFormer). Each pair (a, b) becomes
    (a cos - b sin, b cos + a sin), computed in float32 and rounded once to x's dtype.
    Returns a new contiguous tensor; x is not modified.
    Gradient flows to x only: the Triton path treats cos and sin as constant tables and
    raises ValueError if they require grad. CUDA tensors of a Triton dtype run the kernel;
    everything else runs the PyTorch reference in stripes.kernels.rotary.reference.
    """
    if use_triton(x, cos, sin) and x.dtype in TRITON_DTYPES:
        from stripes.kernels.rotary.kernel import apply_rotary_triton

        return apply_rotary_triton(x, cos, sin, offset, interleaved)
    return apply_rotary_reference(x, cos, sin, offset, interleaved)


def apply_rotary_qk(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                    offset: int = 0, interleaved: bool = False
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """`apply_rotary` of q [B, T, H, Dh] and k [B, T, H_kv, Dh] with the same tables: the
    same numbers as two calls, but on the Triton path one launch each way instead of two.
    Pairs of different dtypes, or any the Triton path does not take, run the reference."""
    if use_triton(q, k, cos, sin) and q.dtype in TRITON_DTYPES and k.dtype == q.dtype:
        from stripes.kernels.rotary.kernel import apply_rotary_qk_triton

        return apply_rotary_qk_triton(q, k, cos, sin, offset, interleaved)
    return apply_rotary_qk_reference(q, k, cos, sin, offset, interleaved)
