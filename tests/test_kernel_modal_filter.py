"""Hyena-LI's modal filter kernels (Triton's interpreter on CPU) against the float64
reference: the taps, and the gradients of all four parameters."""

from __future__ import annotations

import math

import pytest
import torch

from stripes.kernels.modal_filter import modal_filter
from stripes.kernels.modal_filter.kernel import (
    BLOCKS,
    BT,
    modal_filter_grads_triton,
    modal_filter_triton,
)
from stripes.kernels.modal_filter.reference import modal_filter as modal_filter_reference

from numerics import rel_error

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def params(G: int, N: int, seed: int) -> list[torch.Tensor]:
    """rate log-uniform in [1e-4, 1] (slow and fast modes), theta in [-pi, pi], residues
    N(0, 1): float64 [G, N] each."""
    g = torch.Generator().manual_seed(seed)
    log_rate = torch.empty(G, N, dtype=torch.float64).uniform_(math.log(1e-4), 0, generator=g)
    theta = torch.empty(G, N, dtype=torch.float64).uniform_(-math.pi, math.pi, generator=g)
    return [log_rate.exp(), theta, torch.randn(G, N, generator=g, dtype=torch.float64),
            torch.randn(G, N, generator=g, dtype=torch.float64)]


# Lengths: below one block, not a multiple of it, several blocks, several programs; N not a
# power of two.
@pytest.mark.parametrize("G, N, T", [(3, 5, 7), (2, 16, BT + 37), (4, 3, 3 * BT),
                                     (2, 3, BT * BLOCKS + 100)])
def test_taps_and_gradients_match_the_float64_reference(G, N, T):
    exact = [p.requires_grad_() for p in params(G, N, seed=T)]
    want = modal_filter_reference(*exact, T)
    dh = torch.randn(G, T, dtype=torch.float64, generator=torch.Generator().manual_seed(T))
    want_grads = torch.autograd.grad(want, exact, dh)

    # The float32 reference's own error is the bar: a phase theta t rounded to float32 is off
    # by |theta t| 2^-24, whoever computes it. The kernel rounds it three times (theta / 2 pi,
    # times t, the fraction times 2 pi) to the reference's once, and forms p^t as a product.
    # With three modes the gradients cancel, and both errors wander between 1e-5 and 6e-4
    # from one dh to the next, hence the floor.
    single = [p.detach().float().requires_grad_() for p in exact]
    ref32 = modal_filter_reference(*single, T)
    ref32_grads = torch.autograd.grad(ref32, single, dh.float())
    single = [p.detach().to(DEVICE) for p in single]
    got = modal_filter_triton(*single, T)
    assert got.shape == (G, T) and got.dtype == torch.float32
    assert rel_error(got, want) < max(4 * rel_error(ref32, want), 3e-4)
    got_grads = modal_filter_grads_triton(*single, dh.float().to(DEVICE))
    for name, g, g32, w in zip(("rate", "theta", "residue_re", "residue_im"), got_grads,
                               ref32_grads, want_grads, strict=True):
        assert g.shape == (G, N), name
        assert rel_error(g, w) < max(4 * rel_error(g32, w), 3e-4), name


def test_taps_do_not_depend_on_the_length_asked_for():
    single = [p.float().to(DEVICE) for p in params(2, 4, seed=0)]
    short, long = modal_filter_triton(*single, 24), modal_filter_triton(*single, BT + 9)
    assert torch.equal(short, long[:, :24])


def test_public_function_keeps_no_powers_for_backward_on_cpu():
    """Off CUDA the reference runs under checkpoint: what autograd saves is the parameters
    (and the output's shape), not the [G, N, T] powers."""
    ps = [p.float().requires_grad_() for p in params(2, 3, seed=1)]
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t,
                                                  lambda t: t):
        h = modal_filter(*ps, 50)
    assert max(saved) < 2 * 3 * 50
    grads = torch.autograd.grad(h.sum(), ps)
    want = torch.autograd.grad(modal_filter_reference(*ps, 50).sum(), ps)
    for g, w in zip(grads, want, strict=True):
        assert rel_error(g, w) < 1e-6
