"""Gated causal depthwise convolution with document resets (formula in reference.py):
out = gate * act(bias + h * (x x2)), act the identity or SiLU, every tap kept inside its
token's document.

It is Hyena's featurizer (short_len taps over q, k, v), Hyena-SE's long filter with both
gates fused (q * (h * (k v)), one pass instead of three), and Mamba-2's short conv with its
bias and SiLU (the activation's input is never stored: backward recomputes it); packed
documents need no padding, only `positions`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from stripes.kernels.causal_conv.reference import causal_conv as causal_conv_reference
from stripes.kernels.dispatch import use_triton

TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def causal_conv(x: torch.Tensor, h: torch.Tensor, bias: torch.Tensor | None = None,
                x2: torch.Tensor | None = None, gate: torch.Tensor | None = None,
                positions: torch.Tensor | None = None, silu: bool = False,
                split: Sequence[int] | None = None) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """out [B, T, C] in x's dtype, or with `split` (1 to 3 sizes adding up to C) its pieces
    out.split(split, dim=-1), whose gradients backward reads where they lie. The pieces are
    views of one output: none may be modified in place.

    x, x2, gate: [B, T, C] (x2 and gate optional: u = x * x2, out = gate * y); h: [C, L],
    tap j multiplies u[t - j] (tap 0 the current token); bias: [C] or None; positions:
    [B, T] integers, the steps since the start of each token's document (None: every row is
    one document); silu: apply SiLU to the conv's output (before the gate). Gradients flow
    to x, x2, gate, h and bias.

    CUDA tensors with x, x2, gate of a Triton dtype run the Triton kernels (float32 math,
    views with channel stride 1 read in place, h's and bias's gradients summed in float32);
    everything else runs the reference. Bad shapes raise ValueError.
    """
    tensors = [t for t in (x, x2, gate) if t is not None]
    if use_triton(*tensors, h) and all(t.dtype in TRITON_DTYPES for t in tensors):
        from stripes.kernels.causal_conv.kernel import causal_conv_triton

        return causal_conv_triton(x, h, bias, x2, gate, positions, silu, split)
    return causal_conv_reference(x, h, bias, x2, gate, positions, silu, split)
