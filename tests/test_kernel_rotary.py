"""Rotary-embedding Triton kernel (Triton's interpreter on CPU) against the float64 reference,
and the reference against stripes.arch.rope."""

from __future__ import annotations

import pytest
import torch

from stripes.arch.rope import RopeConfig, rope_angles
from stripes.kernels.rotary import apply_rotary, apply_rotary_qk, kernel
from stripes.kernels.rotary.kernel import apply_rotary_qk_triton, apply_rotary_triton
from stripes.kernels.rotary.reference import apply_rotary as apply_rotary_reference

from numerics import poison_empty, rel_error

# Triton's interpreter runs the kernels on CPU tensors here; on a machine with a GPU the same
# tests run the compiled kernels (the interpreter is only switched on without CUDA).
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def poisoned_empty(monkeypatch):
    poison_empty(monkeypatch)


def tables(length: int, head_dim: int, device=DEVICE) -> tuple[torch.Tensor, torch.Tensor]:
    return rope_angles(torch.arange(length, device=device), head_dim, RopeConfig())  # [L, Dh/2]


def forward_backward(fn, x, cos, sin, offset, interleaved, grad):
    x = x.detach().requires_grad_()
    out = fn(x, cos, sin, offset, interleaved)
    out.backward(grad)
    return out, x.grad


def check_against_float64(x, offset, interleaved, tol, table_len=None):
    B, T, H, Dh = x.shape
    cos, sin = tables(table_len or offset + T, Dh)
    grad = torch.randn(B, T, H, Dh, device=x.device).to(x.dtype)
    out, grad_x = forward_backward(apply_rotary_triton, x, cos, sin, offset, interleaved, grad)
    ref, ref_grad = forward_backward(apply_rotary_reference, x.double(), cos, sin, offset,
                                     interleaved, grad.double())
    assert out.shape == x.shape and out.dtype == x.dtype and out.is_contiguous()
    assert grad_x.shape == x.shape and grad_x.dtype == x.dtype
    for actual, expected in ((out, ref), (grad_x, ref_grad)):
        assert torch.isfinite(actual).all()
        assert rel_error(actual, expected) < tol


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize(("shape", "offset"), [
    ((2, 3, 1, 2), 0),
    ((1, 4, 3, 6), 2),
    ((2, 2, 3, 130), 0),
    ((3, 1, 3, 8), 5),  # one decoding step at position 5
    ((1, 2, 40, 130), 1),  # H * Dh/2 above MAX_PAIRS: several head blocks per token
])
def test_float32_matches_float64_reference(shape, offset, interleaved):
    torch.manual_seed(0)
    check_against_float64(torch.randn(shape, device=DEVICE), offset, interleaved, 1e-5)


def test_tables_longer_than_needed():
    torch.manual_seed(1)
    check_against_float64(torch.randn(2, 3, 2, 16, device=DEVICE), 4, False, 1e-5, table_len=50)


@pytest.mark.parametrize("interleaved", [False, True])
def test_strided_views_are_read_in_place(interleaved):
    torch.manual_seed(2)
    B, T, H, Dh = 2, 3, 3, 10
    qkv = torch.randn(B, T, 3 * H, Dh, device=DEVICE)  # a fused projection viewed as heads
    q = qkv[:, :, :H]  # strided on T
    assert not q.is_contiguous()
    check_against_float64(q, 1, interleaved, 1e-5)
    # [B, T, H, Dh] with the T and H strides swapped
    k = torch.randn(B, H, T, Dh, device=DEVICE).transpose(1, 2)
    check_against_float64(k, 0, interleaved, 1e-5)
    # a strided last dim is copied to contiguous first
    every_other = torch.randn(B, T, H, 2 * Dh, device=DEVICE)[..., ::2]
    check_against_float64(every_other, 0, interleaved, 1e-5)


def test_bfloat16_storage_loosely():
    # The interpreter truncates float32 -> bfloat16, so only a loose bound holds on CPU;
    # the GPU test checks bfloat16 at the real tolerance.
    torch.manual_seed(3)
    check_against_float64(torch.randn(2, 3, 2, 16, device=DEVICE).bfloat16(), 2, True, 2e-2)


def test_decoding_step_matches_the_full_sequence():
    torch.manual_seed(4)
    x = torch.randn(2, 8, 3, 12, device=DEVICE)
    cos, sin = tables(8, 12)
    full = apply_rotary_triton(x, cos, sin)
    step = apply_rotary_triton(x[:, 5:6], cos, sin, offset=5)
    assert rel_error(step, full[:, 5:6]) < 1e-6  # a wrong table row would be off by O(1)


def test_reference_layouts_are_a_channel_permutation_of_each_other():
    # Interleaved pair i is channels (2i, 2i+1); moving them to (i, i + Dh/2) must turn one
    # layout into the other.
    torch.manual_seed(6)
    x = torch.randn(2, 4, 3, 10)
    cos, sin = tables(4, 10, "cpu")
    to_halves = torch.cat((torch.arange(0, 10, 2), torch.arange(1, 10, 2)))  # [Dh]
    interleaved = apply_rotary_reference(x, cos, sin, interleaved=True)
    rotate_half = apply_rotary_reference(x[..., to_halves], cos, sin)
    assert torch.allclose(interleaved[..., to_halves], rotate_half, rtol=0, atol=1e-6)


def test_rotation_preserves_norm_of_each_pair():
    torch.manual_seed(7)
    x = torch.randn(1, 6, 2, 8, device=DEVICE)
    cos, sin = tables(6, 8)
    out = apply_rotary_triton(x, cos, sin, interleaved=False)
    pair_norm = (x[..., :4] ** 2 + x[..., 4:] ** 2).sqrt()
    out_norm = (out[..., :4] ** 2 + out[..., 4:] ** 2).sqrt()
    assert rel_error(out_norm, pair_norm) < 1e-6


def test_public_function_on_cpu_runs_the_reference(monkeypatch):
    def fail(*args):
        raise AssertionError("the Triton path ran for CPU tensors")

    monkeypatch.setattr(kernel, "apply_rotary_triton", fail)
    torch.manual_seed(8)
    x = torch.randn(2, 3, 2, 8)
    cos, sin = tables(9, 8, "cpu")
    for interleaved in (False, True):
        assert torch.equal(apply_rotary(x, cos, sin, 6, interleaved),
                           apply_rotary_reference(x, cos, sin, 6, interleaved))


@pytest.mark.parametrize("fn", [apply_rotary, apply_rotary_triton])
def test_bad_inputs_raise(fn):
    x = torch.randn(2, 3, 4, 8)
    cos, sin = tables(10, 8, "cpu")
    with pytest.raises(ValueError, match=r"L=10 rows but offset=8 and T=3"):
        fn(x, cos, sin, 8)
    with pytest.raises(ValueError, match="offset=-1"):
        fn(x, cos, sin, -1)
    with pytest.raises(ValueError, match=r"Dh=7 must be even"):
        fn(torch.randn(2, 3, 4, 7), cos, sin)
    with pytest.raises(ValueError, match=r"x must be \[B, T, H, Dh\], got shape \(3, 4, 8\)"):
        fn(torch.randn(3, 4, 8), cos, sin)
    with pytest.raises(ValueError, match=r"cos \(10, 3\) and sin \(10, 3\) must both be"):
        fn(x, cos[:, :3], sin[:, :3])
    with pytest.raises(ValueError, match=r"cos \(10, 4\) and sin \(9, 4\)"):
        fn(x, cos, sin[:9])


def test_triton_path_rejects_float64_and_learnable_tables():
    cos, sin = tables(3, 8, "cpu")
    with pytest.raises(ValueError, match="float64 is not supported"):
        apply_rotary_triton(torch.randn(1, 3, 2, 8).double(), cos, sin)
    with pytest.raises(ValueError, match="take no gradient"):
        apply_rotary_triton(torch.randn(1, 3, 2, 8), cos.requires_grad_(), sin)


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize(("q_heads", "k_heads", "head_dim"), [
    (4, 2, 8),  # grouped-query attention: k has fewer heads
    (3, 3, 6),
    (40, 5, 130),  # q needs several head blocks, k one
])
def test_pair_in_one_launch_equals_two_calls(q_heads, k_heads, head_dim, interleaved):
    """q and k rotated together: the same outputs and gradients as one call each."""
    torch.manual_seed(9)
    B, T = 2, 3
    q = torch.randn(B, T, q_heads, head_dim, device=DEVICE)
    k = torch.randn(B, T, 2 * k_heads, head_dim, device=DEVICE)[:, :, ::2]  # strided heads
    cos, sin = tables(T + 2, head_dim)
    grads = [torch.randn(t.shape, device=DEVICE) for t in (q, k)]
    q1, k1 = q.detach().requires_grad_(), k.detach().requires_grad_()
    outs = apply_rotary_qk_triton(q1, k1, cos, sin, 2, interleaved)
    torch.autograd.backward(outs, grads)
    for x, x_pair, out, grad in zip((q, k), (q1, k1), outs, grads, strict=True):
        single, single_grad = forward_backward(apply_rotary_triton, x, cos, sin, 2,
                                               interleaved, grad)
        assert torch.equal(out, single)
        assert torch.equal(x_pair.grad, single_grad)


def test_pair_with_one_output_unused():
    """Only q's output reaches the loss: k gets no gradient, q the right one."""
    torch.manual_seed(10)
    q = torch.randn(1, 4, 2, 8, device=DEVICE, requires_grad=True)
    k = torch.randn(1, 4, 1, 8, device=DEVICE, requires_grad=True)
    cos, sin = tables(4, 8)
    grad = torch.randn(q.shape, device=DEVICE)
    q_out, _ = apply_rotary_qk_triton(q, k, cos, sin)
    q_out.backward(grad)
    assert k.grad is None
    assert rel_error(q.grad, apply_rotary_reference(grad.double(), cos, -sin)) < 1e-6


def test_pair_rejects_mismatched_tensors():
    cos, sin = tables(3, 8, "cpu")
    q = torch.randn(1, 3, 2, 8)
    with pytest.raises(ValueError, match="must share dtype, B, T and Dh"):
        apply_rotary_qk_triton(q, torch.randn(2, 3, 2, 8), cos, sin)
    with pytest.raises(ValueError, match="must share dtype"):
        apply_rotary_qk_triton(q, torch.randn(1, 3, 2, 8).half(), cos, sin)


def test_public_pair_on_cpu_runs_the_reference(monkeypatch):
    def fail(*args):
        raise AssertionError("the Triton path ran for CPU tensors")

    monkeypatch.setattr(kernel, "apply_rotary_qk_triton", fail)
    q, k = torch.randn(2, 3, 4, 8), torch.randn(2, 3, 2, 8)
    cos, sin = tables(5, 8, "cpu")
    q_out, k_out = apply_rotary_qk(q, k, cos, sin, 1)
    assert torch.equal(q_out, apply_rotary_reference(q, cos, sin, 1))
    assert torch.equal(k_out, apply_rotary_reference(k, cos, sin, 1))


def test_empty_tensors_launch_nothing():
    cos, sin = tables(4, 8)
    for shape in ((0, 4, 2, 8), (2, 0, 2, 8), (2, 4, 0, 8)):
        x = torch.randn(shape, device=DEVICE)
        assert apply_rotary_triton(x, cos, sin).shape == shape
