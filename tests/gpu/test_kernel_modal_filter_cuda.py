"""Hyena-LI's modal filter kernels on a CUDA device at hybrid-1b's size (2048 filters, 16
modes) and a long filter, against the float64 reference: taps and the four gradients, held
to the float32 reference's own error (the phase theta t rounds the same way in both)."""

from __future__ import annotations

import math

import pytest
import torch

from stripes.kernels.modal_filter import modal_filter
from stripes.kernels.modal_filter.reference import modal_filter as modal_filter_reference

from numerics import rel_error

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("T", [1000, 20_000])
def test_taps_and_gradients_at_width(T):
    torch.manual_seed(0)
    G, N = 2048 if T < 10_000 else 256, 16
    rand = lambda lo, hi: torch.empty(G, N, device="cuda", dtype=torch.float64).uniform_(lo, hi)
    exact = [rand(math.log(1e-4), 0).exp(), rand(1e-3, math.pi),
             torch.randn(G, N, device="cuda", dtype=torch.float64),
             torch.randn(G, N, device="cuda", dtype=torch.float64)]
    dh = torch.randn(G, T, device="cuda", dtype=torch.float64)
    results = {}
    for name, params in (("float64", exact), ("float32", [p.float() for p in exact])):
        params = [p.clone().requires_grad_() for p in params]
        h = modal_filter_reference(*params, T)
        results[name] = (h, *torch.autograd.grad(h, params, dh.to(h.dtype)))
    params = [p.float().requires_grad_() for p in exact]
    h = modal_filter(*params, T)  # the Triton path
    got = (h, *torch.autograd.grad(h, params, dh.float()))
    for name, g, g32, want in zip(("h", "rate", "theta", "re", "im"), got, results["float32"],
                                  results["float64"], strict=True):
        assert rel_error(g, want) < max(4 * rel_error(g32, want), 1e-4), name
