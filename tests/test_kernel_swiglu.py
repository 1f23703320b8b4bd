"""SwiGLU Triton kernel (run by Triton's interpreter on CPU) against the float64 reference."""

from __future__ import annotations

import pytest
import torch

from stripes.kernels.swiglu import kernel, swiglu
from stripes.kernels.swiglu.kernel import BLOCK, swiglu_triton
from stripes.kernels.swiglu.reference import swiglu as swiglu_reference

from numerics import poison_empty, rel_error

# Triton's interpreter runs the kernels on CPU tensors here; on a machine with a GPU the same
# tests run the compiled kernels (the interpreter is only switched on without CUDA).
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def poisoned_empty(monkeypatch):
    poison_empty(monkeypatch)


def forward_backward(fn, gate, up, grad):
    gate, up = gate.detach().requires_grad_(), up.detach().requires_grad_()
    out = fn(gate, up)
    out.backward(grad)
    return out, gate.grad, up.grad


def check_against_float64(gate, up, tol):
    grad = torch.randn_like(gate)
    out, d_gate, d_up = forward_backward(swiglu_triton, gate, up, grad)
    ref, ref_gate, ref_up = forward_backward(swiglu_reference, gate.double(), up.double(),
                                             grad.double())
    assert out.dtype == gate.dtype and out.shape == gate.shape
    assert d_gate.dtype == gate.dtype and d_up.shape == up.shape
    for actual, expected in ((out, ref), (d_gate, ref_gate), (d_up, ref_up)):
        assert torch.isfinite(actual).all()
        assert rel_error(actual, expected) < tol


@pytest.mark.parametrize("shape", [(1,), (3,), (65,), (4, 257), (2, BLOCK + 5), (3, 5, 300)])
def test_float32_matches_float64_reference(shape):
    torch.manual_seed(0)
    gate, up = torch.randn(shape, device=DEVICE) * 3, torch.randn(shape, device=DEVICE)
    check_against_float64(gate, up, 1e-5)


# exp(-g) overflows to inf in numpy for g << 0, which is what makes sigmoid exactly 0 there.
@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
def test_saturated_gates_stay_finite_and_exact():
    # sigmoid saturates at both ends: silu -> 0 for g << 0 and -> g for g >> 0.
    gate = torch.tensor([-200.0, -90.0, -30.0, -1e-4, 0.0, 1e-4, 30.0, 90.0, 200.0],
                        device=DEVICE)
    check_against_float64(gate, torch.linspace(-2, 2, gate.numel(), device=DEVICE), 1e-6)


def test_strided_views_from_a_fused_projection():
    torch.manual_seed(1)
    fused = torch.randn(6, 2 * 97, device=DEVICE)  # [N, 2 * hidden]: gate and up side by side
    gate, up = fused.chunk(2, dim=-1)  # non-contiguous views
    assert not gate.is_contiguous()
    check_against_float64(gate, up, 1e-5)


def test_bfloat16_storage_loosely():
    # The interpreter truncates float32 -> bfloat16, so only a loose bound holds on CPU;
    # the GPU test checks bfloat16 at the real tolerance.
    torch.manual_seed(2)
    gate = torch.randn(3, 300, device=DEVICE).bfloat16()
    up = torch.randn(3, 300, device=DEVICE).bfloat16()
    check_against_float64(gate, up, 2e-2)


def test_backward_keeps_only_gate_and_up():
    gate = torch.randn(4, 10, device=DEVICE, requires_grad=True)
    up = torch.randn(4, 10, device=DEVICE, requires_grad=True)
    out = swiglu_triton(gate, up)
    saved = out.grad_fn.saved_tensors
    assert len(saved) == 2
    assert torch.equal(saved[0], gate) and torch.equal(saved[1], up)


def test_empty_input():
    gate = torch.empty(0, 16, device=DEVICE)
    assert swiglu_triton(gate, gate).shape == (0, 16)


def test_public_function_on_cpu_runs_the_reference(monkeypatch):
    def fail(*args):
        raise AssertionError("the Triton path ran for CPU tensors")

    monkeypatch.setattr(kernel, "swiglu_triton", fail)
    torch.manual_seed(3)
    gate, up = torch.randn(5, 33), torch.randn(5, 33)
    assert torch.equal(swiglu(gate, up), swiglu_reference(gate, up))


@pytest.mark.parametrize("fn", [swiglu, swiglu_triton])
def test_bad_inputs_raise(fn):
    with pytest.raises(ValueError, match=r"gate \(4, 8\) and up \(4, 9\)"):
        fn(torch.randn(4, 8), torch.randn(4, 9))
    with pytest.raises(ValueError, match="same dtype"):
        fn(torch.randn(4, 8), torch.randn(4, 8).double())
    with pytest.raises(ValueError, match="floating point"):
        fn(torch.ones(4, 8, dtype=torch.int32), torch.ones(4, 8, dtype=torch.int32))


def test_triton_path_rejects_float64():
    with pytest.raises(ValueError, match="float64 is not supported"):
        swiglu_triton(torch.randn(4, 8).double(), torch.randn(4, 8).double())
