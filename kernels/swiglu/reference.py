"""SwiGLU activation in plain PyTorch: the readable definition the Triton kernel must match.

silu(gate) * up, computed in at least float32 (float64 stays float64) and returned in the
inputs' dtype. Autograd provides the backward. The input checks live here so the public
function, this reference and the Triton path reject the same inputs with the same message.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def check_swiglu_inputs(gate: torch.Tensor, up: torch.Tensor) -> None:
    """gate and up must be floating point tensors of equal shape, dtype and device."""
    if gate.shape != up.shape:
        raise ValueError(f"swiglu: gate {tuple(gate.shape)} and up {tuple(up.shape)} must "
                         "have the same shape")
    if gate.dtype != up.dtype:
        raise ValueError(f"swiglu: gate ({gate.dtype}) and up ({up.dtype}) must have the same "
                         "dtype")
    if not gate.is_floating_point():
        raise ValueError(f"swiglu: gate and up must be floating point, got {gate.dtype}")
    if gate.device != up.device:
        raise ValueError(f"swiglu: gate ({gate.device}) and up ({up.device}) must be on the "
                         "same device")


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gate, up: [...] -> silu(gate) * up: [...] in gate's dtype."""
    check_swiglu_inputs(gate, up)
    compute = torch.promote_types(gate.dtype, torch.float32)
    return (F.silu(gate.to(compute)) * up.to(compute)).to(gate.dtype)
