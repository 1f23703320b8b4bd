"""Mamba-2 SSD through the Triton kernels on a CUDA device at a realistic size, against the
float64 chunked reference and beside mamba_ssm's mamba_chunk_scan_combined (the anchor)."""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from stripes.kernels.ssd import ssd
from stripes.kernels.ssd.reference import ssd as ssd_reference

from numerics import rel_error

pytestmark = pytest.mark.gpu

BATCH, L, H, P, G, N = 2, 2048, 8, 64, 2, 128
NAMES = ("y", "state", "dx", "ddt", "dA", "dB", "dC", "d_init")


def make(dtype, seed=0, batch=BATCH, length=L, S=None):
    g = torch.Generator(device="cuda").manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, device="cuda", generator=g)
    x = rand(batch, length, H, P).to(dtype)
    dt = F.softplus(rand(batch, length, H) - 3.0)
    A = -torch.empty(H, device="cuda").uniform_(1, 16, generator=g)
    B, C = rand(batch, length, G, N).to(dtype), rand(batch, length, G, N).to(dtype)
    return [x, dt, A, B, C, rand(S or batch, H, P, N)]


def forward_backward(fn, args, grads, **kw):
    leaves = [t.detach().clone().requires_grad_() for t in args]
    y, state = fn(*leaves[:5], 64, leaves[5], True, **kw)
    torch.autograd.backward((y, state), (grads[0].to(y.dtype), grads[1].to(state.dtype)))
    return [y, state] + [t.grad for t in leaves]


def against_float64(args, tol, **kw):
    grads = (torch.randn_like(args[0], dtype=torch.float32), torch.randn_like(args[5]))
    got = forward_backward(ssd, args, grads, **kw)
    want = forward_backward(ssd_reference, [t.double() for t in args],
                            [t.double() for t in grads], **kw)
    for name, actual, expected in zip(NAMES, got, want, strict=True):
        assert torch.isfinite(actual).all(), name
        assert rel_error(actual, expected) < tol, (name, rel_error(actual, expected))


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_matches_float64_reference(dtype, tol):
    against_float64(make(dtype), tol)


def test_packed_sequences_bfloat16():
    cu = torch.tensor([0, 100, 1000, 1001, 3000, 4096], device="cuda")
    against_float64(make(torch.bfloat16, seed=1, batch=1, length=4096, S=5), 2e-2,
                    cu_seqlens=cu)


def mamba_chunk_scan():
    """mamba_ssm's Triton SSD without its package __init__ (which needs the CUDA scan)."""
    spec = importlib.util.find_spec("mamba_ssm")
    if spec is None:
        pytest.skip("mamba_ssm is not installed")
    if "mamba_ssm" not in sys.modules:
        package = types.ModuleType("mamba_ssm")
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules["mamba_ssm"] = package
    return importlib.import_module("mamba_ssm.ops.triton.ssd_combined").mamba_chunk_scan_combined


def test_as_close_to_float64_as_mamba_ssm():
    anchor = mamba_chunk_scan()
    args = make(torch.bfloat16, seed=2)
    grads = (torch.randn_like(args[0], dtype=torch.float32), torch.randn_like(args[5]))

    def theirs(x, dt, A, B, C, chunk, init, return_state):
        return anchor(x, dt, A, B, C, chunk, initial_states=init, return_final_states=True)

    ours = forward_backward(ssd, args, grads)
    anchor_out = forward_backward(theirs, args, grads)
    want = forward_backward(ssd_reference, [t.double() for t in args],
                            [t.double() for t in grads])
    for name, a, b, expected in zip(NAMES, ours, anchor_out, want, strict=True):
        assert rel_error(a, expected) <= 1.25 * rel_error(b, expected) + 1e-4, (
            name, rel_error(a, expected), rel_error(b, expected))
