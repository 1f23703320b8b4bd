"""Fused linear + cross-entropy on a CUDA device, at an LM head's shape, vs float64."""

from __future__ import annotations

import pytest
import torch

from stripes.kernels.linear_ce import linear_cross_entropy
from stripes.kernels.linear_ce.kernel import linear_cross_entropy_triton
from stripes.kernels.linear_ce.reference import linear_cross_entropy as reference

from numerics import rel_error

pytestmark = pytest.mark.gpu
N, D, V = 4096, 2048, 32000
IGNORE = -100


def inputs(n=N, vocab=V, seed=0):
    """float64 x [n, D] ~ N(0, 1) (a normed hidden state), weight [vocab, D] ~ N(0, 0.05)
    (logits of std ~2), targets [n] with every 7th ignored."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(n, D, device="cuda", dtype=torch.float64, generator=g)
    weight = 0.05 * torch.randn(vocab, D, device="cuda", dtype=torch.float64, generator=g)
    targets = torch.randint(0, vocab, (n,), device="cuda", generator=g)
    targets[::7] = IGNORE
    return x, weight, targets


def run(fn, x, weight, targets, dtype, autocast=False, **kw):
    """fn's loss and (d x, d weight) for upstream gradient 0.7, leaves cast to `dtype`."""
    x = x.to(dtype).requires_grad_()
    weight = weight.to(dtype).requires_grad_()
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        loss = fn(x, weight, targets, **kw)
    (loss * 0.7).backward()
    return loss, x.grad, weight.grad


def check(got, want, loss_tol, grad_tol):
    assert got[0].dtype == torch.float32 and torch.isfinite(got[0])
    assert rel_error(got[0], want[0]) < loss_tol
    for g, w in zip(got[1:], want[1:], strict=True):
        assert rel_error(g, w) < grad_tol


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_bfloat16_matches_float64(reduction):
    x, weight, targets = inputs()
    x, weight = x.bfloat16().double(), weight.bfloat16().double()  # the same operand values
    got = run(linear_cross_entropy_triton, x, weight, targets, torch.bfloat16,
              reduction=reduction)
    want = run(reference, x, weight, targets, torch.float64, reduction=reduction)
    assert got[1].dtype == got[2].dtype == torch.bfloat16
    check(got, want, 1e-3, 2e-2)


def test_float32_weight_under_autocast_matches_float64():
    """The training setup: float32 parameters, bf16 autocast; gradients come back float32."""
    x, weight, targets = inputs()
    got = run(linear_cross_entropy, x, weight, targets, torch.float32, autocast=True)
    want = run(reference, x, weight, targets, torch.float64)
    assert got[1].dtype == got[2].dtype == torch.float32
    # The weight gradient is the float32 sum, not a bf16 rounding of it cast back.
    assert (got[2] != got[2].bfloat16().float()).float().mean() > 0.9
    check(got, want, 1e-3, 2e-2)


def test_float32_matches_float64():
    x, weight, targets = inputs(n=1024)
    got = run(linear_cross_entropy_triton, x, weight, targets, torch.float32)
    want = run(reference, x, weight, targets, torch.float64)
    check(got, want, 1e-4, 1e-3)  # float32 matmuls (TF32 is off by default)


def test_ragged_chunks_and_vocabulary():
    """Chunks of 1,000 rows (the last one short) and a vocabulary no block size divides."""
    x, weight, targets = inputs(vocab=V + 3)
    x, weight = x.bfloat16().double(), weight.bfloat16().double()
    got = run(linear_cross_entropy_triton, x, weight, targets, torch.bfloat16,
              chunk_tokens=1000)
    want = run(reference, x, weight, targets, torch.float64)
    check(got, want, 1e-3, 2e-2)


def test_all_targets_ignored():
    x, weight, targets = inputs(n=512)
    got = run(linear_cross_entropy_triton, x, weight, torch.full_like(targets, IGNORE),
              torch.bfloat16)
    assert got[0].item() == 0.0
    assert torch.count_nonzero(got[1]) == 0 and torch.count_nonzero(got[2]) == 0


def test_public_function_dispatches_to_triton_on_cuda():
    x, weight, targets = inputs()
    got = run(linear_cross_entropy, x, weight, targets, torch.bfloat16)
    want = run(linear_cross_entropy_triton, x, weight, targets, torch.bfloat16)
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w)


def test_no_grad_loss_equals_training_loss():
    x, weight, targets = inputs()
    x, weight = x.bfloat16(), weight.bfloat16()
    with torch.no_grad():
        eval_loss = linear_cross_entropy(x, weight, targets)
    train_loss = linear_cross_entropy(x.requires_grad_(), weight.requires_grad_(), targets)
    assert rel_error(eval_loss, train_loss) < 1e-6  # the same first pass, compiled twice


def test_out_of_range_target_raises():
    x, weight, targets = inputs(n=64)
    targets[5] = V
    with pytest.raises(ValueError, match="outside"):
        linear_cross_entropy(x.bfloat16(), weight.bfloat16(), targets)


def test_unchecked_targets_never_wait_for_the_device():
    """check_targets=False: forward and backward pass sync debug mode "error" (no host read),
    with the checked path's numbers."""
    x, weight, targets = inputs()
    want = run(linear_cross_entropy, x, weight, targets, torch.bfloat16)
    x, weight = x.bfloat16().requires_grad_(), weight.bfloat16().requires_grad_()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = linear_cross_entropy(x, weight, targets, check_targets=False)
        (loss * 0.7).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for got, w in zip((loss, x.grad, weight.grad), want, strict=True):
        assert rel_error(got, w) < 1e-2


def test_peak_memory_is_far_below_full_logits():
    """At 32,768 tokens the float32 logits alone would be 3.9 GiB; the fused path holds
    grad_x, the float32 weight gradient, one 256 MiB chunk of logits and the bf16 results."""
    n = 32768
    x, weight, targets = inputs(n=n)
    x, weight = x.bfloat16().requires_grad_(), weight.bfloat16().requires_grad_()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    linear_cross_entropy(x, weight, targets).backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    mib = 2**20
    bound = (2 * n * D * 2 + V * D * 4 + V * D * 2) + 256 * mib + 64 * mib
    assert peak < bound, f"peak {peak / mib:.0f} MiB over the bound {bound / mib:.0f} MiB"
    assert peak < n * V * 4 / 4
