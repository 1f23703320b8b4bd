"""Numerical helpers for tests: errors are relative, measured in float64."""

from __future__ import annotations

import torch


def rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected||, computed in float64."""
    a, e = actual.detach(), expected.detach()
    if a.is_complex() or e.is_complex():  # .double() would drop the imaginary part
        a, e = (torch.view_as_real(t.to(torch.complex128)) for t in (a, e))
    a, e = a.double(), e.double()
    return float((a - e).norm() / e.norm().clamp_min(1e-300))
