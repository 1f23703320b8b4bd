"""SwiGLU Triton kernel on a CUDA device at a realistic size, against the float64 reference."""

from __future__ import annotations

import pytest
import torch

from stripes.kernels import swiglu as swiglu_package
from stripes.kernels.swiglu import swiglu
from stripes.kernels.swiglu.kernel import swiglu_triton
from stripes.kernels.swiglu.reference import swiglu as swiglu_reference

from numerics import rel_error

pytestmark = pytest.mark.gpu

ROWS, HIDDEN = 65536, 2048  # 134M elements: tokens x MLP hidden of a small model's batch


def forward_backward(fn, gate, up, grad):
    gate, up = gate.detach().requires_grad_(), up.detach().requires_grad_()
    out = fn(gate, up)
    out.backward(grad)
    return out, gate.grad, up.grad


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.bfloat16, 1e-2),
                                          (torch.float16, 1e-2)])
def test_matches_float64_reference(dtype, tol):
    torch.manual_seed(0)
    gate = (torch.randn(ROWS, HIDDEN, device="cuda") * 2).to(dtype)
    up = torch.randn(ROWS, HIDDEN, device="cuda").to(dtype)
    grad = torch.randn(ROWS, HIDDEN, device="cuda").to(dtype)
    out, d_gate, d_up = forward_backward(swiglu_triton, gate, up, grad)
    assert out.dtype == dtype and d_gate.dtype == dtype and d_up.dtype == dtype
    # The reference runs in float64 on the same (rounded) inputs.
    ref, ref_gate, ref_up = forward_backward(swiglu_reference, gate.double(), up.double(),
                                             grad.double())
    for actual, expected in ((out, ref), (d_gate, ref_gate), (d_up, ref_up)):
        assert torch.isfinite(actual).all()
        assert rel_error(actual, expected) < tol


def test_strided_inputs_and_odd_sizes():
    torch.manual_seed(1)
    fused = torch.randn(1000, 2 * 2731, device="cuda")  # gate and up chunked from one matmul
    gate, up = fused.chunk(2, dim=-1)
    grad = torch.randn(1000, 2731, device="cuda")
    out, d_gate, d_up = forward_backward(swiglu_triton, gate, up, grad)
    ref, ref_gate, ref_up = forward_backward(swiglu_reference, gate.double(), up.double(),
                                             grad.double())
    for actual, expected in ((out, ref), (d_gate, ref_gate), (d_up, ref_up)):
        assert rel_error(actual, expected) < 1e-5


def test_public_function_dispatches_to_triton_on_cuda(monkeypatch):
    torch.manual_seed(2)
    gate = torch.randn(512, 1536, device="cuda", dtype=torch.bfloat16)
    up = torch.randn(512, 1536, device="cuda", dtype=torch.bfloat16)
    assert torch.equal(swiglu(gate, up), swiglu_triton(gate, up))
    # float64 keeps its precision: it runs the reference, never the float32 kernel.
    calls = []
    monkeypatch.setattr(swiglu_package, "swiglu_reference",
                        lambda *a: calls.append(a) or swiglu_reference(*a))
    swiglu(gate.double(), up.double())
    swiglu(gate, up)
    assert len(calls) == 1
