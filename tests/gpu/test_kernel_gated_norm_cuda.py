"""Triton gated norms compiled on a CUDA device at Mamba-2's and RetNet's shapes, against the
float64 reference (the mixers through them: tests/gpu/test_mixers_cuda.py)."""

from __future__ import annotations

import pytest
import torch

from stripes.kernels.gated_norm import gated_norm, reference

from numerics import rel_error

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("C, group_size, centered, gate_first", [
    (4096, 4096, False, True), (4096, 512, False, True), (1536, 1536, False, True),  # mamba
    (2048, 256, True, False), (4096, 512, True, False)])  # retention: GroupNorm per head
def test_matches_float64_reference(dtype, tol, C, group_size, centered, gate_first):
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = 2 * 1000 + 3  # not a multiple of any block of rows

    def leaf(*shape, offset=0.0, scale=1.0):
        t = offset + scale * torch.randn(*shape, device="cuda", generator=gen)
        return t.to(dtype).requires_grad_()

    wide = leaf(rows, 2 * C + 64)  # z and x sliced out of one projection, as in Mamba-2
    y, weight, skip = leaf(rows, C), leaf(C, offset=1.0, scale=0.5), leaf(C, scale=0.5)
    z, x = wide[:, :C], wide[:, C + 64:]
    grad = torch.randn(rows, C, device="cuda", generator=gen).to(dtype)
    variant = dict(centered=centered, gate_first=gate_first)
    out = gated_norm(y, z, weight, group_size, 1e-5, x, skip, **variant)
    got = torch.autograd.grad(out, (y, wide, weight, skip), grad)
    twins = [t.detach().double().requires_grad_() for t in (y, wide, weight, skip)]
    y64, wide64, w64, s64 = twins
    ref = reference.gated_norm(y64, wide64[:, :C], w64, group_size, 1e-5,
                                   wide64[:, C + 64:], s64, **variant)
    want = torch.autograd.grad(ref, twins, grad.double())
    assert out.dtype == dtype
    assert rel_error(out, ref) < tol
    for name, a, b in zip(("y", "z and x", "weight", "skip"), got, want, strict=True):
        assert rel_error(a, b) < tol, (name, rel_error(a, b))
    assert not got[1][:, C:C + 64].any()  # the unread columns get no gradient
