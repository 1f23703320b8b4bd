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


def poison_empty(monkeypatch) -> None:
    """Make torch.empty hand out NaN-filled memory (until the test ends), so that any output
    element a kernel leaves unwritten shows up as NaN in the comparison."""
    real_empty = torch.empty

    def nan_empty(*args, **kwargs):
        out = real_empty(*args, **kwargs)
        return out.fill_(float("nan")) if out.is_floating_point() else out

    monkeypatch.setattr(torch, "empty", nan_empty)
