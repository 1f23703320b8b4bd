"""SwiGLU activation silu(gate) * up (Shazeer, 2020) as one fused elementwise kernel.

Unfused, PyTorch writes silu(gate) to memory, reads it back for the product, and autograd
keeps it for the backward. The kernel reads gate and up once and writes the product once;
its backward reads gate, up and grad_out once and writes both input gradients, recomputing
sigmoid(gate) instead of saving anything beyond the two inputs.
"""

from __future__ import annotations

import torch

from stripes.kernels.dispatch import use_triton
from stripes.kernels.swiglu.reference import swiglu as swiglu_reference

# The Triton kernel computes in float32, so float64 inputs (tests, numerics checks) run the
# reference even on CUDA, where they keep their float64 precision.
TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, elementwise.

    gate, up: [...] of equal shape and dtype (float32, bfloat16 or float16 on the Triton
    path; any floating dtype in the reference). Returns [...] in that dtype. The math runs
    in float32 (float64 in float64); the result is rounded once to the output dtype.
    Gradients flow to both gate and up:
        d_gate = grad * up * sigmoid(g) * (1 + g * (1 - sigmoid(g))),  d_up = grad * silu(g).
    CUDA tensors of a Triton dtype run the fused kernel; everything else runs the PyTorch
    reference in stripes.kernels.swiglu.reference.
    """
    if use_triton(gate, up) and gate.dtype in TRITON_DTYPES:
        from stripes.kernels.swiglu.kernel import swiglu_triton

        return swiglu_triton(gate, up)
    return swiglu_reference(gate, up)
