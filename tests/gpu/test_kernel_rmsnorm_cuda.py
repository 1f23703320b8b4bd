"""Triton RMSNorm (+ residual) compiled on a CUDA device, against the float64 reference."""

from __future__ import annotations

import pytest
import torch

from stripes.kernels.rmsnorm import reference, rms_norm
from stripes.kernels.rmsnorm.kernel import rms_norm_triton

from numerics import rel_error

pytestmark = pytest.mark.gpu

EPS = 1e-6


def tolerance(dtype: torch.dtype) -> float:
    return 1e-5 if dtype == torch.float32 else 1e-2


def make_inputs(rows, d, x_dtype, w_dtype, r_dtype, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(rows, d, device="cuda", generator=gen).to(x_dtype).requires_grad_()
    w = (1 + 0.5 * torch.randn(d, device="cuda", generator=gen)).to(w_dtype).requires_grad_()
    r = None
    if r_dtype is not None:
        r = 2 * torch.randn(rows, d, device="cuda", generator=gen)
        r = r.to(r_dtype).requires_grad_()
    return x, w, r


def forward_backward(fn, x, w, r, eps, grad_y, grad_h):
    """Outputs (y, h) and grads (x, weight, residual); None where there is no such thing."""
    out = fn(x, w, eps, r)
    outs = (out, None) if r is None else out
    used = [(o, g) for o, g in zip(outs, (grad_y, grad_h), strict=True) if g is not None]
    inputs = [t for t in (x, w, r) if t is not None]
    grads = torch.autograd.grad([o for o, _ in used], inputs, [g for _, g in used])
    return outs, (*grads, None) if r is None else grads


def check_against_float64(x, w, r, eps=EPS):
    y_dtype = x.dtype if r is None else r.dtype
    gen = torch.Generator(device="cuda").manual_seed(1)
    grad_y = torch.randn(x.shape, device="cuda", generator=gen).to(y_dtype)
    grad_h = None if r is None else torch.randn(x.shape, device="cuda", generator=gen).to(y_dtype)
    outs, grads = forward_backward(rms_norm_triton, x, w, r, eps, grad_y, grad_h)
    twins = [None if t is None else t.detach().double().requires_grad_() for t in (x, w, r)]
    ref_outs, ref_grads = forward_backward(
        reference.rms_norm, *twins, eps, grad_y.double(),
        None if grad_h is None else grad_h.double())
    expected_dtypes = (y_dtype, y_dtype, x.dtype, w.dtype, None if r is None else r.dtype)
    names = ("y", "h", "grad_x", "grad_weight", "grad_residual")
    for name, a, b, dtype in zip(names, (*outs, *grads), (*ref_outs, *ref_grads),
                                 expected_dtypes, strict=True):
        if b is None:
            assert a is None, name
            continue
        assert a.dtype == dtype, name
        assert torch.isfinite(a).all(), name
        err = rel_error(a, b)
        assert err < tolerance(dtype), (name, err)


@pytest.mark.parametrize("rows", [4096, 65536])
@pytest.mark.parametrize("residual", [False, True])
def test_bf16_x_float32_weight_and_residual(rows, residual):
    """The autocast case: bf16 activations, float32 weight, float32 residual stream."""
    x, w, r = make_inputs(rows, 2048, torch.bfloat16, torch.float32,
                          torch.float32 if residual else None)
    check_against_float64(x, w, r)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("residual", [False, True])
def test_one_dtype_throughout(dtype, residual):
    x, w, r = make_inputs(4096, 2048, dtype, dtype, dtype if residual else None)
    check_against_float64(x, w, r)


@pytest.mark.parametrize("rows, d", [(333, 1), (1000, 65), (517, 257), (300, 5000),
                                     (130, 16384)])
def test_awkward_and_wide_rows_float32(rows, d):
    x, w, r = make_inputs(rows, d, torch.float32, torch.float32, torch.float32)
    # D = 1: dy/dx is eps / (x^2 + eps)^1.5, beyond float32 at eps = 1e-6.
    check_against_float64(x, w, r, eps=1.0 if d == 1 else EPS)


def test_weight_gradient_is_deterministic():
    x, w, r = make_inputs(8192, 2048, torch.bfloat16, torch.float32, torch.float32)
    grads = []
    for _ in range(2):
        y, h = rms_norm_triton(x, w, EPS, r)
        grads.append(torch.autograd.grad((y.sum() + h.square().sum()), (w,))[0])
    assert torch.equal(*grads)


@pytest.mark.parametrize("residual", [False, True])
def test_dispatch_on_cuda(residual):
    x, w, r = make_inputs(64, 512, torch.bfloat16, torch.float32,
                          torch.float32 if residual else None)
    out, fused = rms_norm(x, w, EPS, r), rms_norm_triton(x, w, EPS, r)
    for a, b in zip((out,) if r is None else out, (fused,) if r is None else fused,
                    strict=True):
        assert torch.equal(a, b)
    # float64 models on CUDA run the reference.
    x64, w64, r64 = (None if t is None else t.detach().double() for t in (x, w, r))
    out64, ref64 = rms_norm(x64, w64, EPS, r64), reference.rms_norm(x64, w64, EPS, r64)
    for a, b in zip((out64,) if r is None else out64, (ref64,) if r is None else ref64,
                    strict=True):
        assert torch.equal(a, b)


def test_out_dtype_bf16_from_float32_stream():
    x, w, r = make_inputs(4099, 2048, torch.bfloat16, torch.float32, torch.float32)
    y, h = rms_norm_triton(x, w, EPS, r, out_dtype=torch.bfloat16)
    y32, h32 = reference.rms_norm(x, w, EPS, r)
    assert y.dtype == torch.bfloat16 and h.dtype == torch.float32
    assert torch.equal(h, h32)
    assert rel_error(y, y32) < 4e-3  # one bfloat16 rounding
