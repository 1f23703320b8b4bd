"""The gated modal convolution's Triton kernels on a CUDA device at Hyena-LI's sizes, against
the float64 reference (filter by definition, FFT convolution), with the launcher's own
segment choice: the output and all seven gradients."""

from __future__ import annotations

import pytest
import torch

from stripes.kernels.modal_conv import modal_gated_conv
from stripes.kernels.modal_conv.reference import modal_gated_conv as reference

from numerics import rel_error

pytestmark = pytest.mark.gpu


# float32 tolerances: the recurrence adds rounding token by token, over memories of up to
# 1 / rate ~ 1100 tokens here (measured on an H100: 1.4e-5 at T = 1000 and 1.2e-4 for the
# rate gradients at T = 8192, a sum over 32k tokens a filter).
@pytest.mark.parametrize("B, T, C, G, dtype, tol", [
    (4, 2048, 768, 768, torch.bfloat16, 2e-2),
    (1, 8192, 512, 128, torch.float32, 5e-4),
    (2, 1000, 96, 96, torch.float32, 5e-5),
])
def test_matches_float64_reference(B, T, C, G, dtype, tol):
    torch.manual_seed(T + C)
    N = 16
    qkv = torch.randn(B, T, 3 * C, device="cuda").to(dtype)
    params = [torch.empty(G, N, device="cuda").uniform_(-7.0, 0.0).exp(),
              torch.empty(G, N, device="cuda").uniform_(0.0, 3.1),
              torch.randn(G, N, device="cuda") / N ** 0.5,
              torch.randn(G, N, device="cuda") / N ** 0.5]
    grad = torch.randn(B, T, C, device="cuda")
    tensors = [*qkv.chunk(3, dim=-1), *params]

    def run(fn, tensors):
        leaves = [t.detach().clone().requires_grad_() for t in tensors]
        out = fn(*leaves)
        out.backward(grad.to(out.dtype))
        return [out] + [t.grad for t in leaves]

    got = run(modal_gated_conv, tensors)
    want = run(reference, [t.double() for t in tensors])
    for actual, expected in zip(got, want, strict=True):
        assert torch.isfinite(actual).all()
        assert rel_error(actual, expected) < tol


def test_packed_documents_match_the_restarting_recurrence():
    from stripes.arch.packing import document_positions
    from stripes.kernels.modal_conv.reference import modal_gated_recurrence

    torch.manual_seed(0)
    B, T, C, N = 2, 1024, 256, 16
    qkv = torch.randn(B, T, 3 * C, device="cuda").to(torch.bfloat16)
    params = [torch.empty(C, N, device="cuda").uniform_(-7.0, 0.0).exp(),
              torch.empty(C, N, device="cuda").uniform_(0.0, 3.1),
              torch.randn(C, N, device="cuda") / N ** 0.5,
              torch.randn(C, N, device="cuda") / N ** 0.5]
    doc_ids = torch.randint(0, 9, (B, T), device="cuda").sort(dim=1).values
    positions = document_positions(doc_ids)
    grad = torch.randn(B, T, C, device="cuda")
    tensors = [*qkv.chunk(3, dim=-1), *params]

    def run(fn, tensors):
        leaves = [t.detach().clone().requires_grad_() for t in tensors]
        out = fn(*leaves, positions=positions)
        out.backward(grad.to(out.dtype))
        return [out] + [t.grad for t in leaves]

    got = run(modal_gated_conv, tensors)
    want = run(modal_gated_recurrence, [t.double() for t in tensors])
    for actual, expected in zip(got, want, strict=True):
        assert rel_error(actual, expected) < 2e-2
