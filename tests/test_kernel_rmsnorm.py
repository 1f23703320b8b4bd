"""Triton RMSNorm (+ residual) under the interpreter on CPU, against the float64 reference."""

from __future__ import annotations

import math

import pytest
import torch

from stripes.kernels.rmsnorm import reference, rms_norm
from stripes.kernels.rmsnorm.kernel import rms_norm_triton

from numerics import rel_error

EPS = 1e-6


def make_inputs(shape, residual: bool, x_dtype=torch.float32, w_dtype=torch.float32,
                r_dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    d = shape[-1]
    x = torch.randn(shape, generator=gen).to(x_dtype).requires_grad_()
    w = (1 + 0.5 * torch.randn(d, generator=gen)).to(w_dtype).requires_grad_()
    r = (2 * torch.randn(shape, generator=gen)).to(r_dtype).requires_grad_() if residual else None
    return x, w, r


def run(fn, x, w, r, eps, grad_y, grad_h):
    """Forward, then grads of (x, weight, residual) for the given output gradients. A None
    output gradient means that output is not used downstream."""
    out = fn(x, w, eps, r)
    outs = (out,) if r is None else out
    pairs = [(o, g) for o, g in zip(outs, (grad_y, grad_h)[:len(outs)], strict=True)
             if g is not None]
    inputs = [t for t in (x, w, r) if t is not None]
    grads = torch.autograd.grad([o for o, _ in pairs], inputs, [g for _, g in pairs],
                                allow_unused=True)
    return outs, (*grads, None) if r is None else grads  # always (x, weight, residual)


def float64_twin(*tensors):
    return [None if t is None else t.detach().double().requires_grad_() for t in tensors]


def check_against_float64(x, w, r, eps, tol, use_y=True, use_h=True):
    gen = torch.Generator().manual_seed(1)
    y_dtype = x.dtype if r is None else r.dtype
    grad_y = torch.randn(x.shape, generator=gen).to(y_dtype) if use_y else None
    grad_h = torch.randn(x.shape, generator=gen).to(r.dtype) if r is not None and use_h else None
    outs, grads = run(rms_norm_triton, x, w, r, eps, grad_y, grad_h)
    ref_outs, ref_grads = run(reference.rms_norm, *float64_twin(x, w, r), eps,
                              *float64_twin(grad_y, grad_h))
    assert outs[0].dtype == y_dtype
    for name, a, b in zip(("y", "h"), outs, ref_outs, strict=False):
        assert a.shape == b.shape
        assert rel_error(a, b) < tol, (name, rel_error(a, b))
    for name, a, b, t in zip(("grad_x", "grad_weight", "grad_residual"), grads, ref_grads,
                             (x, w, r), strict=True):
        if b is None:
            assert a is None or not a.any(), name
            continue
        assert a.dtype == t.dtype, name
        assert torch.isfinite(a).all(), name
        assert rel_error(a, b) < tol, (name, rel_error(a, b))


@pytest.mark.parametrize("d", [1, 3, 65, 257])
@pytest.mark.parametrize("lead", [(1,), (7,), (2, 5)])
@pytest.mark.parametrize("residual", [False, True])
def test_float32_matches_float64_reference(d, lead, residual):
    # With D = 1, dy/dx is eps / (x^2 + eps)^1.5: a cancellation float32 cannot resolve at
    # eps = 1e-6, so that width gets an eps of the order of x^2.
    eps = 1.0 if d == 1 else EPS
    x, w, r = make_inputs((*lead, d), residual)
    check_against_float64(x, w, r, eps, tol=1e-5)


@pytest.mark.parametrize("use_y, use_h", [(True, False), (False, True)])
def test_one_output_unused(use_y, use_h):
    x, w, r = make_inputs((6, 33), residual=True)
    check_against_float64(x, w, r, EPS, tol=1e-5, use_y=use_y, use_h=use_h)


def test_non_contiguous_input():
    x, w, r = make_inputs((40, 9), residual=True)
    xt = x.detach().t().contiguous().t().requires_grad_()  # [9, 40] storage, x's values
    assert not xt.is_contiguous()
    check_against_float64(xt, w, r, EPS, tol=1e-5)


def test_poisoned_outputs_are_all_written(monkeypatch):
    """Every buffer the launchers take from torch.empty starts as NaN; any element a kernel
    leaves unwritten then shows up in the outputs or gradients."""
    real_empty = torch.empty

    def poisoned(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return t.fill_(math.nan) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", poisoned)
    for residual in (False, True):
        x, w, r = make_inputs((7, 65), residual)  # 7 rows: 4 programs, the last with one row
        check_against_float64(x, w, r, EPS, tol=1e-5)


def test_zero_rows():
    x, w, r = make_inputs((0, 16), residual=True)
    (y, h), (gx, gw, gr) = run(rms_norm_triton, x, w, r, EPS, torch.zeros(0, 16),
                               torch.zeros(0, 16))
    assert y.shape == h.shape == gx.shape == gr.shape == (0, 16)
    assert torch.equal(gw, torch.zeros(16))


@pytest.mark.parametrize("r_dtype", [torch.bfloat16, torch.float32])
def test_bf16_x_float32_weight_loosely(r_dtype):
    # The interpreter truncates float32 -> bfloat16 instead of rounding: loose tolerance.
    x, w, r = make_inputs((5, 100), residual=True, x_dtype=torch.bfloat16, r_dtype=r_dtype)
    check_against_float64(x, w, r, EPS, tol=3e-2)
    x, w, _ = make_inputs((5, 100), residual=False, x_dtype=torch.bfloat16)
    check_against_float64(x, w, None, EPS, tol=3e-2)


@pytest.mark.parametrize("residual", [False, True])
def test_dispatch_on_cpu_is_the_reference(residual):
    x, w, r = make_inputs((3, 4, 24), residual)
    grad = torch.randn(3, 4, 24)
    grads = (grad, 2 * grad) if residual else (grad, None)
    outs, in_grads = run(rms_norm, x, w, r, EPS, *grads)
    ref_outs, ref_grads = run(reference.rms_norm, x, w, r, EPS, *grads)
    for a, b in zip((*outs, *in_grads), (*ref_outs, *ref_grads), strict=True):
        assert (a is None and b is None) or torch.equal(a, b)


def test_reference_unfused_equivalence_and_float64():
    x, w, r = make_inputs((4, 12), residual=True, x_dtype=torch.float64, r_dtype=torch.float64)
    y, h = reference.rms_norm(x, w, EPS, r)
    assert y.dtype == h.dtype == torch.float64
    assert torch.equal(h, r + x)
    assert torch.equal(y, reference.rms_norm(h, w, EPS))


@pytest.mark.parametrize("fn", [rms_norm, rms_norm_triton])
def test_bad_shapes_raise(fn):
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match=r"weight must be \[D\] = \[8\].*\(9,\)"):
        fn(x, torch.ones(9), EPS)
    with pytest.raises(ValueError, match=r"weight must be.*\(1, 8\)"):
        fn(x, torch.ones(1, 8), EPS)
    with pytest.raises(ValueError, match=r"residual must have x's shape \(4, 8\), got \(4, 7\)"):
        fn(x, torch.ones(8), EPS, torch.randn(4, 7))
    with pytest.raises(ValueError, match=r"D >= 1"):
        fn(torch.randn(4, 0), torch.ones(0), EPS)


def test_triton_rejects_float64():
    with pytest.raises(ValueError, match="float64"):
        rms_norm_triton(torch.randn(2, 8, dtype=torch.float64), torch.ones(8), EPS)


@pytest.mark.parametrize("block_r, stages", [(1, 1), (2, 2), (4, 1)])
@pytest.mark.parametrize("residual", [False, True])
def test_every_backward_row_blocking_matches(monkeypatch, block_r, stages, residual):
    """Rows taken several at a time, with a tail shorter than the block (13 rows, 4 programs
    of 4 rows: the last has 1), give the same gradients as the reference."""
    from stripes.kernels.rmsnorm import kernel

    config = kernel.BackwardConfig(block_r=block_r, num_warps=1, programs_per_sm=1,
                                   num_stages=stages)
    monkeypatch.setattr(kernel, "backward_config", lambda d, itemsize: config)
    x, w, r = make_inputs((13, 33), residual)
    check_against_float64(x, w, r, EPS, 1e-5)


@pytest.mark.parametrize("residual", [False, True])
def test_out_dtype_writes_y_in_it_and_keeps_h(residual):
    """A float32 stream normalised into bfloat16 (what the block asks under autocast): y is
    the float32 result rounded once, h stays float32, and the gradients, which come back in
    bfloat16, reach float32 inputs."""
    x, w, r = make_inputs((6, 40), residual)
    fused = rms_norm_triton(x, w, EPS, r, out_dtype=torch.bfloat16)
    plain = reference.rms_norm(x, w, EPS, r)
    y, y32 = (fused[0], plain[0]) if residual else (fused, plain)
    assert y.dtype == torch.bfloat16
    assert rel_error(y, y32) < 8e-3  # bfloat16 rounding (the interpreter truncates)
    if residual:
        assert fused[1].dtype == torch.float32 and torch.equal(fused[1], plain[1])
    grad_y = torch.randn(6, 40).to(torch.bfloat16)
    got = torch.autograd.grad(y, [t for t in (x, w, r) if t is not None], grad_y)
    want = torch.autograd.grad(y32, [t for t in (x, w, r) if t is not None], grad_y.float())
    for a, b in zip(got, want, strict=True):
        assert a.dtype == torch.float32 and rel_error(a, b) < 1e-5


def test_block_norm_writes_the_autocast_dtype():
    from stripes.arch.layers import RMSNorm

    norm = RMSNorm(16, EPS)
    x = torch.randn(2, 3, 16)
    assert norm(x).dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, h = norm(x, residual=torch.randn(2, 3, 16))
        assert norm(x).dtype == y.dtype == torch.bfloat16 and h.dtype == torch.float32
    with torch.device("meta"):  # a device autocast does not know (shape inference)
        assert RMSNorm(16, EPS)(torch.empty(2, 16)).shape == (2, 16)
