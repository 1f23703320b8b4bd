"""Chunked retention kernels on a CUDA device at a realistic size, against the float64
chunkwise reference and beside fla's chunk_retention (the anchor) where it is installed."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch

from stripes.kernels.retention import chunk_retention
from stripes.kernels.retention.reference import chunk_retention as chunk_retention_reference

from numerics import rel_error

pytestmark = pytest.mark.gpu

B, T, H, D = 2, 2048, 4, 128
# fla's chunk_retention fixes its decays to gamma_h = 1 - 2^(-5 - h); use the same ones.
LOG_DECAY = torch.tensor([math.log1p(-(2.0 ** (-5.0 - h))) for h in range(H)],
                         dtype=torch.float64)


def make(dtype, seed=0, batch=B, length=T):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q, k, v = (torch.randn(batch, length, H, D, device="cuda", generator=g) for _ in range(3))
    init = torch.randn(1 if batch == 1 else batch, H, D, D, device="cuda", generator=g)
    return q.to(dtype), (k * D ** -0.5).to(dtype), v.to(dtype), init


def forward_backward(fn, q, k, v, init, d_o, d_state, **kw):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, init)]
    o, state = fn(*leaves[:3], LOG_DECAY.to(q.device), leaves[3], True, **kw)
    torch.autograd.backward((o, state), (d_o.to(o.dtype), d_state.to(state.dtype)))
    return [o, state] + [t.grad for t in leaves]


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.bfloat16, 1.5e-2),
                                          (torch.float16, 5e-3)])
def test_matches_float64_reference(dtype, tol):
    q, k, v, init = make(dtype)
    d_o, d_state = torch.randn_like(v, dtype=torch.float32), torch.randn_like(init)
    got = forward_backward(chunk_retention, q, k, v, init, d_o, d_state)
    want = forward_backward(chunk_retention_reference, *(t.double() for t in (q, k, v, init)),
                            d_o.double(), d_state.double())
    for name, actual, expected in zip(("o", "state", "dq", "dk", "dv", "d_init"), got, want,
                                      strict=True):
        assert torch.isfinite(actual).all(), name
        assert rel_error(actual, expected) < tol, (name, rel_error(actual, expected))


def test_packed_sequences_bfloat16():
    cu = torch.tensor([0, 100, 1000, 1001, 3000, 4096], device="cuda")
    q, k, v, _ = make(torch.bfloat16, seed=1, batch=1, length=4096)
    init = torch.randn(5, H, D, D, device="cuda")
    d_o, d_state = torch.randn_like(v, dtype=torch.float32), torch.randn_like(init)
    got = forward_backward(chunk_retention, q, k, v, init, d_o, d_state, cu_seqlens=cu)
    want = forward_backward(chunk_retention_reference, *(t.double() for t in (q, k, v, init)),
                            d_o.double(), d_state.double(), cu_seqlens=cu)
    for actual, expected in zip(got, want, strict=True):
        assert rel_error(actual, expected) < 1.5e-2


@pytest.mark.skipif(importlib.util.find_spec("fla") is None, reason="fla is not installed")
def test_as_close_to_float64_as_fla():
    """bf16: stripes' error against float64 is no worse than fla's chunk_retention's (with
    scale 1, the same decays and initial state) on every output and gradient."""
    from fla.ops.retention import chunk_retention as fla_chunk_retention

    q, k, v, init = make(torch.bfloat16, seed=2)
    d_o, d_state = torch.randn_like(v, dtype=torch.float32), torch.randn_like(init)

    def fla(q, k, v, log_decay, init, return_state):
        return fla_chunk_retention(q, k, v, scale=1.0, initial_state=init,
                                   output_final_state=return_state)

    ours = forward_backward(chunk_retention, q, k, v, init, d_o, d_state)
    theirs = forward_backward(fla, q, k, v, init, d_o, d_state)
    want = forward_backward(chunk_retention_reference, *(t.double() for t in (q, k, v, init)),
                            d_o.double(), d_state.double())
    for name, a, b, expected in zip(("o", "state", "dq", "dk", "dv", "d_init"), ours, theirs,
                                    want, strict=True):
        assert rel_error(a, expected) <= 1.25 * rel_error(b, expected) + 1e-4, (
            name, rel_error(a, expected), rel_error(b, expected))
