"""Fused linear + cross-entropy: the Triton path (interpreter on CPU) vs the float64 reference."""

from __future__ import annotations

import pytest
import torch

from stripes.kernels.linear_ce import kernel, linear_cross_entropy
from stripes.kernels.linear_ce.kernel import default_chunk_tokens, linear_cross_entropy_triton
from stripes.kernels.linear_ce.reference import linear_cross_entropy as reference

from numerics import rel_error

IGNORE = -100


def inputs(n, vocab, d, dtype=torch.float32, ignored=(), seed=0):
    """x [n, d], weight [vocab, d] (leaves), targets [n] with rows `ignored` set to IGNORE."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g).to(dtype).requires_grad_()
    weight = torch.randn(vocab, d, generator=g).to(dtype).requires_grad_()
    targets = torch.randint(0, vocab, (n,), generator=g)
    targets[list(ignored)] = IGNORE
    return x, weight, targets


def loss_and_grads(fn, x, weight, targets, dtype=None, **kw):
    """fn's loss and (d x, d weight) for upstream gradient 0.7 (checks the grad_output scale)."""
    x = x.detach().to(dtype or x.dtype).requires_grad_()
    weight = weight.detach().to(dtype or weight.dtype).requires_grad_()
    loss = fn(x, weight, targets, **kw)
    (loss * 0.7).backward()
    return loss, x.grad, weight.grad


@pytest.fixture
def block_v(monkeypatch):
    """Set the largest row block, so small vocabularies still loop over several blocks."""
    return lambda size: monkeypatch.setattr(kernel, "MAX_BLOCK_V", size)


@pytest.mark.parametrize("n, vocab, d, chunk, reduction, block", [
    (1, 5, 3, None, "mean", 16),
    (7, 37, 16, 3, "sum", 16),      # 3 chunks (3, 3, 1 rows); 3 blocks a row (16, 16, 5)
    (7, 37, 3, None, "mean", 16),
    (33, 1000, 16, None, "mean", 256),  # 4 blocks a row, the last masked
    (33, 1000, 3, 8, "sum", 256),
])
def test_matches_float64_reference(block_v, n, vocab, d, chunk, reduction, block):
    block_v(block)
    x, weight, targets = inputs(n, vocab, d, ignored=range(1, n, 3))
    got = loss_and_grads(linear_cross_entropy_triton, x, weight, targets, reduction=reduction,
                         chunk_tokens=chunk)
    want = loss_and_grads(reference, x, weight, targets, torch.float64, reduction=reduction)
    assert got[0].dtype == torch.float32 and got[0].shape == ()
    assert got[1].dtype == got[2].dtype == torch.float32
    for g, w in zip(got, want, strict=True):
        assert rel_error(g, w) < 1e-5


def test_a_float32_weight_is_cast_inside_and_gets_its_float32_gradient(block_v):
    """Autocast's route: x in bf16, the float32 weight cast by the Function, whose gradient
    is the float32 accumulation (not rounded to bf16 and cast back)."""
    block_v(16)
    x, weight, targets = inputs(7, 37, 16, ignored=(2,))
    xb = x.detach().bfloat16().requires_grad_()
    w = weight.detach().requires_grad_()
    (linear_cross_entropy_triton(xb, w, targets, chunk_tokens=3) * 0.7).backward()
    assert xb.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.float32
    want = loss_and_grads(reference, xb.detach().double(), weight.bfloat16().double(),
                          targets)
    assert rel_error(w.grad, want[2]) < 1e-2
    assert (w.grad != w.grad.bfloat16().float()).float().mean() > 0.9


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("fn", [linear_cross_entropy_triton, reference])
def test_all_targets_ignored_gives_zero_loss_and_grads(reduction, fn):
    x, weight, targets = inputs(7, 37, 16, ignored=range(7))
    loss, dx, dw = loss_and_grads(fn, x, weight, targets, reduction=reduction, chunk_tokens=3)
    assert loss.item() == 0.0
    assert torch.count_nonzero(dx) == 0 and torch.count_nonzero(dw) == 0


def test_custom_ignore_index(block_v):
    block_v(16)
    x, weight, targets = inputs(7, 37, 16)
    targets[[0, 4]] = 5  # class 5 is ignored here, like IGNORE elsewhere
    got = loss_and_grads(linear_cross_entropy_triton, x, weight, targets, ignore_index=5)
    want = loss_and_grads(reference, x, weight, targets, torch.float64, ignore_index=5)
    for g, w in zip(got, want, strict=True):
        assert rel_error(g, w) < 1e-5


def test_unwritten_outputs_are_detected(monkeypatch, block_v):
    """torch.empty returns NaN-filled buffers: logits chunk, per-row losses and grad_x must
    all be written before they are read, including the short last chunk."""
    block_v(16)
    empty = torch.empty

    def nan_empty(*args, **kw):
        out = empty(*args, **kw)
        return out.fill_(float("nan")) if out.is_floating_point() else out

    monkeypatch.setattr(kernel.torch, "empty", nan_empty)
    x, weight, targets = inputs(7, 37, 16, ignored=[2])
    got = loss_and_grads(linear_cross_entropy_triton, x, weight, targets, chunk_tokens=3)
    monkeypatch.setattr(kernel.torch, "empty", empty)
    want = loss_and_grads(reference, x, weight, targets, torch.float64)
    for g, w in zip(got, want, strict=True):
        assert torch.isfinite(g).all()
        assert rel_error(g, w) < 1e-5


def test_no_grad_computes_the_same_loss(block_v):
    block_v(16)
    x, weight, targets = inputs(7, 37, 16, ignored=[3])
    with torch.no_grad():
        loss = linear_cross_entropy_triton(x, weight, targets, chunk_tokens=3)
    assert rel_error(loss, reference(x.double(), weight.double(), targets)) < 1e-5


def test_frozen_weight_gets_no_grad(block_v):
    block_v(16)
    x, weight, targets = inputs(7, 37, 16)
    weight.requires_grad_(False)
    (linear_cross_entropy_triton(x, weight, targets) * 0.7).backward()
    want = loss_and_grads(reference, x, weight, targets, torch.float64)
    assert weight.grad is None and rel_error(x.grad, want[1]) < 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_storage_loosely(block_v, dtype):
    """16-bit logits and gradients (the interpreter truncates float32 -> bf16, hence loose);
    the weight gradient is still accumulated in float32 and returned in the input dtype."""
    block_v(16)
    x, weight, targets = inputs(33, 37, 16, ignored=[0, 5])
    got = loss_and_grads(linear_cross_entropy_triton, x, weight, targets, dtype,
                         chunk_tokens=8)
    want = loss_and_grads(reference, x, weight, targets, torch.float64)
    assert got[1].dtype == got[2].dtype == dtype
    assert rel_error(got[0], want[0]) < 2e-2
    for g, w in zip(got[1:], want[1:], strict=True):
        assert rel_error(g, w) < 5e-2


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_public_function_runs_reference_on_cpu(reduction):
    x, weight, targets = inputs(7, 37, 16, ignored=[1])
    got = loss_and_grads(linear_cross_entropy, x, weight, targets, reduction=reduction)
    want = loss_and_grads(reference, x, weight, targets, reduction=reduction)
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w)


def test_public_function_under_autocast_casts_then_returns_own_dtype_grads():
    x, weight, targets = inputs(7, 37, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(x, weight, targets)
    (loss * 0.7).backward()  # outside autocast, as in training
    assert loss.dtype == x.grad.dtype == weight.grad.dtype == torch.float32
    # The same math on bf16 operands; autocast's cast hands back the bf16 gradients upcast.
    want = loss_and_grads(reference, x, weight, targets, torch.bfloat16)
    for g, w in zip((loss, x.grad, weight.grad), want, strict=True):
        assert torch.equal(g, w.float())


@pytest.mark.parametrize("fn", [linear_cross_entropy_triton, reference, linear_cross_entropy])
def test_bad_inputs_raise_value_error(fn):
    x, weight, targets = inputs(7, 37, 16)
    with pytest.raises(ValueError, match="reduction"):
        fn(x, weight, targets, reduction="none")
    for bad in (37, -1):
        wrong = targets.clone()
        wrong[3] = bad
        with pytest.raises(ValueError, match=r"outside \[0, 37\)"):
            fn(x, weight, wrong)
    with pytest.raises(ValueError, match="weight"):
        fn(x, weight[:, :5], targets)
    with pytest.raises(ValueError, match="targets"):
        fn(x, weight, targets[:5])
    with pytest.raises(ValueError, match="chunk_tokens"):
        fn(x, weight, targets, chunk_tokens=0)


def test_default_chunk_keeps_logits_within_budget():
    budget = kernel.LOGITS_BUDGET_BYTES
    for itemsize in (2, 4):
        rows = default_chunk_tokens(65536, 32000, itemsize)
        assert rows % 256 == 0  # tile-aligned
        assert rows * 32000 * itemsize <= budget < (rows + 256) * 32000 * itemsize
    assert default_chunk_tokens(100, 32000, 2) == 100  # never more rows than there are
    huge = default_chunk_tokens(65536, 2**20, 4)  # huge vocabulary: fewer rows, unaligned
    assert huge * 2**22 <= budget < (huge + 1) * 2**22
    assert default_chunk_tokens(8, 2**30, 4) == 1


def test_single_block_rows_match_looped_rows(block_v):
    """A row that fits one block is read once (pass 2 reuses it); it must agree with the
    looping path on the same inputs."""
    x, weight, targets = inputs(9, 40, 8, ignored=(2,))
    block_v(64)
    one = loss_and_grads(linear_cross_entropy_triton, x, weight, targets)
    block_v(16)
    looped = loss_and_grads(linear_cross_entropy_triton, x, weight, targets)
    for a, b in zip(one, looped, strict=True):
        assert rel_error(a, b) < 1e-6


def test_second_backward_over_one_forward_is_refused():
    """The saved gradients are scaled in place by the first backward."""
    x, weight, targets = inputs(5, 11, 4)
    loss = linear_cross_entropy_triton(x, weight, targets)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_unchecked_targets_give_the_same_loss_and_gradients(block_v, reduction):
    """check_targets=False counts on the device and scales in backward: the same numbers as
    the checked path and the float64 reference, with ignored rows."""
    block_v(16)
    x, weight, targets = inputs(9, 37, 16, ignored=(0, 4))
    checked = loss_and_grads(linear_cross_entropy_triton, x, weight, targets,
                             reduction=reduction, chunk_tokens=4)
    unchecked = loss_and_grads(linear_cross_entropy_triton, x, weight, targets,
                               reduction=reduction, chunk_tokens=4, check_targets=False)
    want = loss_and_grads(reference, x, weight, targets, torch.float64, reduction=reduction)
    for a, b, w in zip(unchecked, checked, want, strict=True):
        assert rel_error(a, b) < 1e-6 and rel_error(a, w) < 1e-5


def test_an_unchecked_out_of_range_target_makes_the_loss_nan():
    x, weight, targets = inputs(7, 37, 16)
    for bad in (37, -1):
        wrong = targets.clone()
        wrong[3] = bad
        x.grad = weight.grad = None
        loss = linear_cross_entropy_triton(x, weight, wrong, check_targets=False)
        loss.backward()
        assert torch.isnan(loss)  # the trainer's guard skips such a step
        # and the gradients carry it too, for backends that only check gradients' norms
        assert torch.isnan(x.grad[3]).all() and torch.isfinite(x.grad[:3]).all()
        assert torch.isnan(weight.grad).any()
    # the reference path (CPU) checks whatever it is asked
    with pytest.raises(ValueError, match="outside"):
        linear_cross_entropy(x, weight, wrong, check_targets=False)
