"""Which implementation a public kernel function runs: Triton on CUDA tensors, the PyTorch
reference everywhere else (CPU, MPS).

Tests reach the Triton kernels on CPU by calling each kernel module's `*_triton` function
directly under `TRITON_INTERPRET=1`; the public functions never route CPU tensors there, so
CPU training does not pay the interpreter.
"""

from __future__ import annotations

import importlib.util

import torch

from stripes.core.log import note_once


def use_triton(*tensors: torch.Tensor) -> bool:
    """True when every tensor is on a CUDA device and triton is importable. A CUDA tensor
    without triton falls back to the reference, said once in the log."""
    if not all(t.is_cuda for t in tensors):
        return False
    if importlib.util.find_spec("triton") is None:
        note_once("triton is not installed: fused kernels fall back to their PyTorch "
                  "references (pip install triton)")
        return False
    return True
