"""Rotary-embedding Triton kernel on a CUDA device at a realistic size, against the float64
reference."""

from __future__ import annotations

import pytest
import torch

from stripes.arch.rope import RopeConfig, rope_angles
from stripes.kernels import rotary as rotary_package
from stripes.kernels.rotary import apply_rotary, apply_rotary_qk
from stripes.kernels.rotary.kernel import apply_rotary_triton
from stripes.kernels.rotary.reference import apply_rotary as apply_rotary_reference

from numerics import rel_error

pytestmark = pytest.mark.gpu

B, T, H, Dh = 4, 2048, 16, 128


def tables(length: int, head_dim: int = Dh) -> tuple[torch.Tensor, torch.Tensor]:
    return rope_angles(torch.arange(length, device="cuda"), head_dim, RopeConfig())


def forward_backward(fn, x, cos, sin, offset, interleaved, grad):
    x = x.detach().requires_grad_()
    out = fn(x, cos, sin, offset, interleaved)
    out.backward(grad)
    return out, x.grad


def check(x, offset, interleaved, tol):
    cos, sin = tables(offset + x.shape[1], x.shape[3])
    grad = torch.randn(x.shape, device="cuda").to(x.dtype)
    out, grad_x = forward_backward(apply_rotary_triton, x, cos, sin, offset, interleaved, grad)
    ref, ref_grad = forward_backward(apply_rotary_reference, x.double(), cos, sin, offset,
                                     interleaved, grad.double())
    assert out.dtype == x.dtype and grad_x.dtype == x.dtype
    for actual, expected in ((out, ref), (grad_x, ref_grad)):
        assert torch.isfinite(actual).all()
        assert rel_error(actual, expected) < tol


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_matches_float64_reference(dtype, tol, interleaved):
    torch.manual_seed(0)
    check(torch.randn(B, T, H, Dh, device="cuda").to(dtype), 0, interleaved, tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_q_sliced_from_fused_qkv(dtype):
    torch.manual_seed(1)
    qkv = torch.randn(B, T, 3 * H, Dh, device="cuda").to(dtype)  # one fused projection
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    check(qkv[:, :, :H], 0, False, tol)
    check(qkv[:, :, 2 * H:], 7, True, tol)


def test_odd_head_sizes_and_decoding_steps():
    torch.manual_seed(2)
    for shape, offset in (((3, 37, 3, 130), 0), ((8, 1, 40, 6), 4095), ((2, 5, 1, 2), 11)):
        for interleaved in (False, True):
            check(torch.randn(shape, device="cuda"), offset, interleaved, 1e-5)


def test_public_function_dispatches_to_triton_on_cuda(monkeypatch):
    torch.manual_seed(3)
    x = torch.randn(2, 64, H, Dh, device="cuda", dtype=torch.bfloat16)
    cos, sin = tables(100)
    assert torch.equal(apply_rotary(x, cos, sin, 10), apply_rotary_triton(x, cos, sin, 10))
    # float64 keeps its precision: it runs the reference, never the float32 kernel.
    calls = []
    monkeypatch.setattr(rotary_package, "apply_rotary_reference",
                        lambda *a: calls.append(a) or apply_rotary_reference(*a))
    apply_rotary(x.double(), cos, sin)
    apply_rotary(x, cos, sin)
    assert len(calls) == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_q_and_k_in_one_launch_equal_two_calls(dtype):
    """The model's call: q and (fewer-headed) k together, bitwise the single-tensor kernel."""
    torch.manual_seed(4)
    q = torch.randn(B, T, H, Dh, device="cuda").to(dtype).requires_grad_()
    k = torch.randn(B, T, H // 4, Dh, device="cuda").to(dtype).requires_grad_()
    cos, sin = tables(T)
    grads = [torch.randn(t.shape, device="cuda").to(dtype) for t in (q, k)]
    outs = apply_rotary_qk(q, k, cos, sin)
    pair_grads = torch.autograd.grad(outs, (q, k), grads)
    for x, out, grad, pair_grad in zip((q, k), outs, grads, pair_grads, strict=True):
        single, single_grad = forward_backward(apply_rotary_triton, x, cos, sin, 0, False, grad)
        assert torch.equal(out, single) and torch.equal(pair_grad, single_grad)
