"""The block-Toeplitz gated conv on a CUDA device with filters shared by 16 to 64 channels,
against the float64 reference, with and without packed documents, 7 to 512 taps."""

from __future__ import annotations

import pytest
import torch

from stripes.arch.packing import document_positions
from stripes.kernels.toeplitz_conv import toeplitz_gated_conv
from stripes.kernels.toeplitz_conv.reference import toeplitz_gated_conv as reference

from numerics import rel_error

pytestmark = pytest.mark.gpu


def forward_backward(fn, tensors, positions, grad):
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    out = fn(*leaves, positions)
    out.backward(grad.to(out.dtype))
    return [out] + [t.grad for t in leaves]


@pytest.mark.parametrize("C, G, L, packed, dtype, tol", [
    (1024, 64, 7, False, torch.bfloat16, 1e-2),     # Hyena-SE's length
    (1024, 64, 128, True, torch.bfloat16, 1e-2),    # Hyena-MR's, packed documents
    (2048, 32, 512, False, torch.bfloat16, 1e-2),   # nine pieces a block, 64 channels a group
    (512, 16, 128, True, torch.float32, 1e-5),      # float32: full-precision matmuls
    (1024, 8, 128, False, torch.bfloat16, 1e-2),    # two 64-channel tiles a group
])
def test_matches_float64_reference(C, G, L, packed, dtype, tol):
    torch.manual_seed(C + L)
    B, T = 2, 4096 - 30  # a last block cut short
    doc_ids = torch.randint(0, 6, (B, T), device="cuda").sort(dim=1).values
    positions = document_positions(doc_ids) if packed else None
    q, k, v = (torch.randn(B, T, C, device="cuda").to(dtype) for _ in range(3))
    h = torch.randn(G, L, device="cuda") / L ** 0.5
    grad = torch.randn(B, T, C, device="cuda")
    got = forward_backward(toeplitz_gated_conv, (q, k, v, h), positions, grad)
    want = forward_backward(reference, [t.double() for t in (q, k, v, h)], positions,
                            grad.double())
    for actual, expected in zip(got, want, strict=True):
        assert torch.isfinite(actual).all()
        assert rel_error(actual, expected) < tol


def test_filter_gradient_is_deterministic():
    torch.manual_seed(0)
    B, T, C, G, L = 2, 4096, 1024, 64, 128
    q, k, v = (torch.randn(B, T, C, device="cuda").to(torch.bfloat16) for _ in range(3))
    h, grad = torch.randn(G, L, device="cuda") / L ** 0.5, torch.randn(B, T, C, device="cuda")
    first, second = (forward_backward(toeplitz_gated_conv, (q, k, v, h), None, grad)
                     for _ in range(2))
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)
