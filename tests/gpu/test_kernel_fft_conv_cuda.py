"""Hyena's gated FFT convolution on a CUDA device (cuFFT along time, strided), against the
float64 composition under autograd, and its memory against the plain composition's."""

from __future__ import annotations

import pytest
import torch

from stripes.kernels.fft_conv import fft_gated_conv
from stripes.kernels.fft_conv.reference import fft_gated_conv as fft_gated_conv_reference

from numerics import rel_error

pytestmark = pytest.mark.gpu
B, T, C = 8, 4096, 768


def forward_backward(fn, tensors, grad):
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    out = fn(*leaves)
    out.backward(grad.to(out.dtype))
    return [out] + [t.grad for t in leaves]


def make():
    torch.manual_seed(0)
    q, k, v = (torch.randn(B, T, C, device="cuda").bfloat16() for _ in range(3))
    return [q, k, v, torch.randn(C, T, device="cuda") / T ** 0.5]


def test_matches_float64_reference():
    tensors, grad = make(), torch.randn(B, T, C, device="cuda")
    got = forward_backward(fft_gated_conv, tensors, grad)
    want = forward_backward(fft_gated_conv_reference, [t.double() for t in tensors],
                            grad.double())
    for actual, expected in zip(got, want, strict=True):
        assert rel_error(actual, expected) < 1e-2


def test_peak_memory_below_the_plain_composition():
    tensors, grad = make(), torch.randn(B, T, C, device="cuda").bfloat16()
    peaks = []
    for fn in (fft_gated_conv, fft_gated_conv_reference):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        forward_backward(fn, tensors, grad)
        torch.cuda.synchronize()
        peaks.append(torch.cuda.max_memory_allocated() - base)
    assert peaks[0] < peaks[1], peaks
