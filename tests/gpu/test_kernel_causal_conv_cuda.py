"""The gated causal conv kernel on a CUDA device at Hyena's and Mamba's sizes, against the
float64 reference, with and without packed documents."""

from __future__ import annotations

import functools

import pytest
import torch

from stripes.arch.packing import document_positions
from stripes.kernels.causal_conv import causal_conv
from stripes.kernels.causal_conv.reference import causal_conv as causal_conv_reference

from numerics import rel_error

pytestmark = pytest.mark.gpu


def forward_backward(fn, tensors, grad):
    leaves = {n: (t.detach().clone().requires_grad_() if t is not None and t.is_floating_point()
                  else t) for n, t in tensors.items()}
    out = fn(**leaves)
    out.backward(grad.to(out.dtype))
    return [out] + [t.grad for t in leaves.values() if t is not None and t.is_floating_point()]


@pytest.mark.parametrize("C, L, gated, bias, packed, silu, dtype, tol", [
    (3 * 1024, 3, False, False, False, False, torch.bfloat16, 1e-2),  # Hyena's featurizer
    (1024, 7, True, False, True, False, torch.bfloat16, 1e-2),        # Hyena-SE, packed
    (1024, 128, True, False, False, False, torch.float32, 1e-5),      # longest explicit filter
    (2304, 4, False, True, True, True, torch.bfloat16, 1e-2),         # Mamba-2's conv + SiLU
    (2304, 4, False, True, False, True, torch.float32, 1e-5),
])
def test_matches_float64_reference(C, L, gated, bias, packed, silu, dtype, tol):
    torch.manual_seed(C + L)
    B, T = 2, 4096
    rand = lambda *s: torch.randn(*s, device="cuda")
    doc_ids = torch.randint(0, 6, (B, T), device="cuda").sort(dim=1).values
    tensors = {"x": rand(B, T, C).to(dtype), "h": rand(C, L) / L ** 0.5,
               "bias": rand(C) if bias else None,
               "x2": rand(B, T, C).to(dtype) if gated else None,
               "gate": rand(B, T, C).to(dtype) if gated else None,
               "positions": document_positions(doc_ids) if packed else None}
    grad = rand(B, T, C)
    got = forward_backward(functools.partial(causal_conv, silu=silu), tensors, grad)
    want = forward_backward(functools.partial(causal_conv_reference, silu=silu), {
        n: (t.double() if t is not None and t.is_floating_point() else t)
        for n, t in tensors.items()}, grad.double())
    for actual, expected in zip(got, want, strict=True):
        assert torch.isfinite(actual).all()
        assert rel_error(actual, expected) < tol
