"""Chunked retention Triton kernels (Triton's interpreter on CPU) against the float64
chunkwise reference: outputs, final states and every gradient, with padded last chunks,
initial states, packed sequences and heads that are not powers of two."""

from __future__ import annotations

import math

import pytest
import torch

from stripes.kernels.retention import chunk_retention, chunk_retention_triton
from stripes.kernels.retention.reference import chunk_retention as chunk_retention_reference
from stripes.kernels.scalar_decay.function import triton_chunk

from numerics import poison_empty, rel_error

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def poisoned_empty(monkeypatch):
    poison_empty(monkeypatch)


def log_decays(H: int) -> torch.Tensor:
    """Fast to slow decays, as the mixer's heads have (gamma = 1 - 2^-e)."""
    return torch.tensor([math.log1p(-(2.0 ** -e)) for e in torch.linspace(1, 6, H).tolist()],
                        dtype=torch.float64)


def inputs(B, T, H, dk, dv, seed=0, with_init=False, S=None):
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(B, T, H, dk, generator=g, dtype=torch.float64) for _ in range(2))
    v = torch.randn(B, T, H, dv, generator=g, dtype=torch.float64)
    init = (torch.randn(S or B, H, dk, dv, generator=g, dtype=torch.float64) if with_init
            else None)
    return q, k * dk ** -0.5, v, init


def run(fn, q, k, v, log_decay, init, grads, **kw):
    """(o, state, dq, dk, dv, d_init) of fn on leaf copies, backward from grads (d_o, d_s)."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None
              for t in (q, k, v, init)]
    o, state = fn(*leaves[:3], log_decay, leaves[3], True, **kw)
    torch.autograd.backward((o, state), (grads[0].to(o.dtype), grads[1].to(state.dtype)))
    return [o, state] + [t.grad if t is not None else None for t in leaves]


def check(q, k, v, log_decay, init, tol, **kw):
    """The Triton path in float32 against the float64 reference, same inputs and gradients."""
    cu = kw.get("cu_seqlens")
    S = q.shape[0] if cu is None else cu.numel() - 1
    grads = (torch.randn_like(v), torch.randn(S, q.shape[2], q.shape[3], v.shape[3],
                                              dtype=torch.float64))
    ref = run(chunk_retention_reference, q, k, v, log_decay, init, grads, **kw)
    dev = [t.to(DEVICE, torch.float32) if t is not None else None for t in (q, k, v, init)]
    kw = {n: (t.to(DEVICE) if isinstance(t, torch.Tensor) else t) for n, t in kw.items()}
    got = run(chunk_retention_triton, *dev[:3], log_decay.float().to(DEVICE), dev[3],
              [g.to(DEVICE, torch.float32) for g in grads], **kw)
    for name, actual, expected in zip(("o", "state", "dq", "dk", "dv", "d_init"), got, ref,
                                      strict=True):
        if expected is None:
            assert actual is None, name
            continue
        assert actual.dtype == torch.float32 and actual.shape == expected.shape, name
        assert torch.isfinite(actual).all(), name
        assert rel_error(actual, expected) < tol, (name, rel_error(actual, expected))


@pytest.mark.parametrize("B, T, H, dk, dv, chunk", [
    (2, 37, 2, 16, 32, 16),   # 3 chunks, the last one 5 tokens
    (1, 5, 1, 16, 16, 16),    # shorter than one chunk
    (1, 64, 2, 24, 40, 32),   # heads that are not powers of two; T a multiple of the chunk
    (2, 33, 3, 80, 16, 16),   # Dk over one 64-wide block
    (1, 20, 2, 16, 80, 16),   # Dv over one 64-wide block
])
def test_float32_matches_float64_reference(B, T, H, dk, dv, chunk):
    q, k, v, init = inputs(B, T, H, dk, dv, with_init=True)
    check(q, k, v, log_decays(H), init, 1e-5, chunk_size=chunk)


def test_without_initial_state():
    q, k, v, _ = inputs(2, 20, 2, 16, 16, seed=1)
    check(q, k, v, log_decays(2), None, 1e-5, chunk_size=16)


def test_packed_sequences_start_from_their_own_states():
    """cu_seqlens spans (one empty, one crossing chunk edges) against the reference run
    sequence by sequence; the kernel's chunks restart at each span."""
    cu = torch.tensor([0, 7, 7, 30, 47])
    q, k, v, init = inputs(1, 47, 2, 16, 16, seed=2, with_init=True, S=4)
    check(q, k, v, log_decays(2), init, 1e-5, chunk_size=16, cu_seqlens=cu)


def test_packed_equals_separate_calls():
    cu = torch.tensor([0, 19, 40])
    q, k, v, _ = inputs(1, 40, 2, 16, 16, seed=3)
    args = [t.float().to(DEVICE) for t in (q, k, v)]
    ld = log_decays(2).float().to(DEVICE)
    packed, states = chunk_retention_triton(*args, ld, None, True, cu.to(DEVICE), 16)
    for s, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True)):
        alone, state = chunk_retention_triton(*(t[:, a:b] for t in args), ld, None, True,
                                              None, 16)
        assert torch.equal(packed[:, a:b], alone)
        assert torch.equal(states[s:s + 1], state)


def test_chunk_size_changes_only_rounding():
    """Chunking reorders a sum: chunk sizes 16 and 32 agree to float32 rounding."""
    q, k, v, init = inputs(1, 50, 1, 16, 16, seed=4, with_init=True)
    args = [t.float().to(DEVICE) for t in (q, k, v)]
    ld = log_decays(1).float().to(DEVICE)
    a = chunk_retention_triton(*args, ld, init.float().to(DEVICE), True, None, 16)
    b = chunk_retention_triton(*args, ld, init.float().to(DEVICE), True, None, 32)
    for x, y in zip(a, b, strict=True):
        assert rel_error(x, y) < 1e-5


def test_triton_chunk_rounds_to_a_tile():
    assert [triton_chunk(c) for c in (1, 5, 16, 33, 64, 100, 128, 512)] == [
        16, 16, 16, 64, 64, 128, 128, 128]


def test_public_function_runs_the_reference_on_cpu():
    q, k, v, init = inputs(1, 9, 2, 8, 8, seed=5, with_init=True)
    o, state = chunk_retention(q, k, v, log_decays(2), init, True, chunk_size=4)
    o_ref, state_ref = chunk_retention_reference(q, k, v, log_decays(2), init, True,
                                                 chunk_size=4)
    assert torch.equal(o, o_ref) and torch.equal(state, state_ref)


@pytest.mark.parametrize("kw, match", [
    ({"cu_seqlens": torch.tensor([0, 5, 3, 12])}, "rise from 0"),
    ({"cu_seqlens": torch.tensor([0, 5, 11])}, "rise from 0"),
    ({"initial_state": torch.zeros(2, 2, 8, 8)}, "initial_state"),
    ({"chunk_size": 0}, "chunk_size"),
])
def test_bad_inputs_name_the_argument(kw, match):
    q, k, v, _ = inputs(1, 12, 2, 8, 8)
    with pytest.raises(ValueError, match=match):
        chunk_retention(q, k, v, log_decays(2), **kw)


def test_launch_settings_change_nothing():
    """Warps, stages, the scans' narrower state tiles and v-heads split among programs for
    dq/dk (what bench/scalar_decay_sweep.py tries) compute the same outputs and gradients,
    the decay's included, here with four v-heads reading one q/k head as in Mamba-2."""
    from stripes.kernels.scalar_decay.function import Launch, LaunchConfig, chunk_scalar_decay

    torch.manual_seed(4)
    q, k = (torch.randn(2, 40, 1, 32, dtype=torch.float64) for _ in range(2))
    v = torch.randn(2, 40, 4, 48, dtype=torch.float64)
    init = torch.randn(2, 4, 32, 48, dtype=torch.float64)
    g = -torch.rand(2, 40, 4, dtype=torch.float64)
    grads = (torch.randn_like(v, dtype=torch.float32), torch.randn(2, 4, 32, 48))

    def run_with(launch):
        leaves = [t.to(DEVICE, torch.float32).requires_grad_() for t in (q, k, v, g, init)]
        o, state = chunk_scalar_decay(*leaves[:4], [(0, 40), (40, 80)], leaves[4], True, 16,
                                      launch=launch)
        torch.autograd.backward((o, state), (grads[0].to(DEVICE), grads[1].to(DEVICE)))
        return [o, state] + [t.grad for t in leaves]

    default = run_with(None)  # the defaults: LaunchConfig.for_chunk(16)
    for split in (2, 4):
        other = LaunchConfig(scan=Launch(8, 2), output=Launch(2, 1), dq_dk=Launch(8, 4),
                             dv=Launch(2, 2), scan_block=16, head_split=split)
        for a, b in zip(default, run_with(other), strict=True):
            assert rel_error(a, b) < 1e-6, split
