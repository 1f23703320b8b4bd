"""Triton kernels for SwiGLU: silu(gate) * up forward, both input gradients backward.

Both passes are memory-bound elementwise maps, so the layout is the simplest that streams
memory at full bandwidth: the tensors are flattened, and a 1-D grid of programs each takes
BLOCK consecutive elements (the last program masks the tail). A large block keeps per-program
overhead small next to the bytes moved; each thread handles several contiguous elements so
loads vectorise. Offsets are int64 because activations of large MLPs (tokens x hidden) can
pass 2^31 elements.

Forward reads gate and up once and writes the product. Backward reads gate, up and grad_out
once and writes d_gate and d_up from one kernel; sigmoid(gate) is recomputed there rather
than saved, so the autograd graph holds nothing but the two inputs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from stripes.kernels.swiglu.reference import check_swiglu_inputs

# Elements per program: 8 a thread at 4 warps, one 16-byte access per bf16 tensor. Chosen by
# bench/swiglu_sweep.py on an H200 (BLOCK 1024 .. 8192 x 4 .. 16 warps, graph-timed): the
# fastest setting, ahead of 2048 at 4 warps, the first choice (figures in BENCHMARKS.md).
BLOCK = 1024
NUM_WARPS = 4
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _swiglu_forward_kernel(gate_ptr, up_ptr, out_ptr, n_elements, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # [BLOCK]
    mask = offsets < n_elements
    g = tl.load(gate_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    out = g * tl.sigmoid(g) * u
    tl.store(out_ptr + offsets, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_backward_kernel(gate_ptr, up_ptr, grad_ptr, d_gate_ptr, d_up_ptr, n_elements,
                            BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # [BLOCK]
    mask = offsets < n_elements
    g = tl.load(gate_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    grad = tl.load(grad_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    silu = g * sig
    # d silu(g) / dg = sig + g * sig * (1 - sig) = sig * (1 + g * (1 - sig))
    d_gate = grad * u * sig * (1.0 + g * (1.0 - sig))
    d_up = grad * silu
    tl.store(d_gate_ptr + offsets, d_gate.to(d_gate_ptr.dtype.element_ty), mask=mask)
    tl.store(d_up_ptr + offsets, d_up.to(d_up_ptr.dtype.element_ty), mask=mask)


def _grid(n_elements: int) -> tuple[int]:
    return (triton.cdiv(n_elements, BLOCK),)


def swiglu_forward(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gate, up: contiguous [...] -> silu(gate) * up: [...] in gate's dtype."""
    out = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    n = gate.numel()
    if n:
        _swiglu_forward_kernel[_grid(n)](gate, up, out, n, BLOCK=BLOCK, num_warps=NUM_WARPS)
    return out


def swiglu_backward(gate: torch.Tensor, up: torch.Tensor,
                    grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """gate, up, grad: contiguous [...] -> (d_gate, d_up), each [...] in gate's dtype."""
    d_gate = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    d_up = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    n = gate.numel()
    if n:
        _swiglu_backward_kernel[_grid(n)](gate, up, grad, d_gate, d_up, n, BLOCK=BLOCK,
                                          num_warps=NUM_WARPS)
    return d_gate, d_up


class SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        # The flat kernels need contiguous memory; a gate/up pair chunked from one fused
        # projection is a strided view and gets copied here (a no-op when contiguous).
        gate, up = gate.contiguous(), up.contiguous()
        ctx.save_for_backward(gate, up)
        return swiglu_forward(gate, up)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gate, up = ctx.saved_tensors
        # Autograd hands grad_out in the output's dtype but possibly strided (e.g. from a
        # transpose downstream); the flat kernel needs it contiguous.
        return swiglu_backward(gate, up, grad_out.contiguous())


def swiglu_triton(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up through the Triton kernels; see stripes.kernels.swiglu.swiglu."""
    check_swiglu_inputs(gate, up)
    if gate.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"swiglu_triton: dtype {gate.dtype} is not supported, use float32, "
                         "bfloat16 or float16")
    return SwiGLUFunction.apply(gate, up)
