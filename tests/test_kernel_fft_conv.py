"""The FFT gated conv's hand-written backward against autograd through the reference
composition, in float64: output and the gradients of q, k, v and the filter, for filters
shorter than, as long as and longer than the sequence."""

from __future__ import annotations

import pytest
import torch

from stripes.kernels.fft_conv import fft_gated_conv
from stripes.kernels.fft_conv.reference import fft_gated_conv as fft_gated_conv_reference

from numerics import rel_error


def run(fn, q, k, v, h, grad):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, h)]
    out = fn(*leaves)
    out.backward(grad)
    return [out] + [t.grad for t in leaves]


@pytest.mark.parametrize("T, L", [(37, 5), (16, 16), (9, 30)])
def test_matches_autograd_through_the_reference(T, L):
    g = torch.Generator().manual_seed(T + L)
    rand = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
    q, k, v, h, grad = rand(2, T, 6), rand(2, T, 6), rand(2, T, 6), rand(6, L), rand(2, T, 6)
    got = run(fft_gated_conv, q, k, v, h, grad)
    want = run(fft_gated_conv_reference, q, k, v, h, grad)
    for actual, expected in zip(got, want, strict=True):
        assert rel_error(actual, expected) < 1e-12
    if L > T:  # taps that reach no output take no gradient
        assert torch.equal(got[4][:, T:], torch.zeros_like(got[4][:, T:]))


def test_bfloat16_activations_float32_filter():
    torch.manual_seed(1)
    q, k, v = (torch.randn(2, 20, 8).bfloat16() for _ in range(3))
    h = torch.randn(8, 12)
    grad = torch.randn(2, 20, 8).bfloat16()
    got = run(fft_gated_conv, q, k, v, h, grad)
    want = run(fft_gated_conv_reference, *(t.double() for t in (q, k, v, h)), grad.double())
    assert [t.dtype for t in got] == [torch.bfloat16] * 4 + [torch.float32]
    for actual, expected in zip(got, want, strict=True):
        assert rel_error(actual, expected) < 1e-2


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="fft_gated_conv"):
        fft_gated_conv(torch.zeros(1, 4, 3), torch.zeros(1, 4, 3), torch.zeros(1, 4, 3),
                       torch.zeros(2, 5))


def test_batch_chunks_give_the_same_result(monkeypatch):
    """The passes walk the batch in chunks; one row per chunk must change nothing."""
    import stripes.kernels.fft_conv as fft_conv

    g = torch.Generator().manual_seed(3)
    rand = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
    q, k, v, h, grad = rand(5, 24, 4), rand(5, 24, 4), rand(5, 24, 4), rand(4, 9), rand(5, 24, 4)
    whole = run(fft_gated_conv, q, k, v, h, grad)
    monkeypatch.setattr(fft_conv, "CHUNK_ELEMENTS", 1)
    assert len(fft_conv._batch_chunks(5, 48, 4)) == 5
    chunked = run(fft_gated_conv, q, k, v, h, grad)
    for a, b in zip(whole, chunked, strict=True):
        assert rel_error(a, b) < 1e-13


def saved_bytes(fn, *inputs) -> int:
    """Bytes autograd keeps for backward after one forward (inputs count too)."""
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        fn(*inputs)
    return sum(t.numel() * t.element_size() for t in saved)


def test_keeps_only_its_inputs_for_backward():
    torch.manual_seed(2)
    q, k, v = (torch.randn(2, 64, 8).bfloat16().requires_grad_() for _ in range(3))
    h = torch.randn(8, 16, requires_grad=True)
    inputs_bytes = sum(t.numel() * t.element_size() for t in (q, k, v, h))
    assert saved_bytes(fft_gated_conv, q, k, v, h) == inputs_bytes
    # the plain composition keeps float32 spectra besides: several times more
    assert saved_bytes(fft_gated_conv_reference, q, k, v, h) > 3 * inputs_bytes
