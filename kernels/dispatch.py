"""Which implementation a public kernel function runs: Triton on CUDA tensors, the PyTorch
reference everywhere else (CPU, MPS).

Tests reach the Triton kernels on CPU by calling each kernel module's `*_triton` function
directly under `TRITON_INTERPRET=1`; the public functions never route CPU tensors there, so
CPU training does not pay the interpreter.

Also here: `recomputes_in_backward`, the mark a fused function puts around intermediates its
own backward recomputes, so activation checkpointing does not keep them.
"""

from __future__ import annotations

import importlib.util
import threading
from collections.abc import Iterator
from contextlib import contextmanager

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


_marks = threading.local()


@contextmanager
def recomputes_in_backward() -> Iterator[None]:
    """Ops run inside are intermediates of a fused autograd function whose backward
    recomputes them from its inputs (stripes.kernels.fft_conv): a selective activation-
    checkpointing policy (train/recompute.py) must neither keep their outputs, which would
    undo the function's memory saving, nor forbid the function to work on them in place."""
    _marks.depth = getattr(_marks, "depth", 0) + 1
    try:
        yield
    finally:
        _marks.depth -= 1


def inside_self_recomputing() -> bool:
    return getattr(_marks, "depth", 0) > 0
