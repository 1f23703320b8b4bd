"""Mamba-2 SSD through the scalar-decay Triton kernels (Triton's interpreter on CPU) against
the float64 chunked reference: y, the final state and the gradients of x, dt, A, B, C and
the initial state, with grouped B/C, padded chunks and packed sequences."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from stripes.arch.ssd import ssd_scan
from stripes.kernels.ssd import ssd, ssd_triton
from stripes.kernels.ssd.reference import ssd as ssd_reference

from numerics import poison_empty, rel_error

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NAMES = ("y", "state", "dx", "ddt", "dA", "dB", "dC", "d_init")


@pytest.fixture(autouse=True)
def poisoned_empty(monkeypatch):
    poison_empty(monkeypatch)


def inputs(batch, T, H, P, G, N, seed=0, S=None):
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)
    x = rand(batch, T, H, P)
    dt = F.softplus(rand(batch, T, H) - 1.0)  # positive, some near 0 and some above 1
    A = -torch.exp(rand(H))  # negative
    B, C = rand(batch, T, G, N), rand(batch, T, G, N)
    init = rand(S or batch, H, P, N)
    return [x, dt, A, B, C, init]


def run(fn, args, grads, **kw):
    leaves = [t.detach().clone().requires_grad_() for t in args]
    y, state = fn(*leaves[:5], initial_state=leaves[5], return_state=True, **kw)
    torch.autograd.backward((y, state), (grads[0].to(y.dtype), grads[1].to(state.dtype)))
    return [y, state] + [t.grad for t in leaves]


def check(args, tol, **kw):
    x, init = args[0], args[5]
    grads = (torch.randn_like(x), torch.randn_like(init))
    want = run(ssd_reference, args, grads, **kw)
    dev = [t.to(DEVICE, torch.float32) for t in args]
    kw = {n: (t.to(DEVICE) if isinstance(t, torch.Tensor) else t) for n, t in kw.items()}
    got = run(ssd_triton, dev, [t.to(DEVICE, torch.float32) for t in grads], **kw)
    for name, actual, expected in zip(NAMES, got, want, strict=True):
        assert actual.shape == expected.shape, name
        assert torch.isfinite(actual).all(), name
        assert rel_error(actual, expected) < tol, (name, rel_error(actual, expected))


@pytest.mark.parametrize("batch, T, H, P, G, N, chunk", [
    (2, 37, 4, 16, 2, 16, 16),  # two heads a group; 3 chunks, the last one 5 steps
    (1, 20, 3, 24, 1, 16, 16),  # one group for all heads; P not a power of two
    (1, 9, 2, 16, 2, 40, 32),   # shorter than a chunk; N over two blocks of 16..64
    (1, 150, 4, 64, 1, 128, 64),  # the GPU's tiles: chunk 64, N in two 64-wide blocks
])
def test_float32_matches_float64_reference(batch, T, H, P, G, N, chunk):
    check(inputs(batch, T, H, P, G, N), 2e-5, chunk_size=chunk)


def test_packed_sequences():
    cu = torch.tensor([0, 11, 11, 40])
    check(inputs(1, 40, 4, 16, 2, 16, seed=1, S=3), 2e-5, chunk_size=16, cu_seqlens=cu)


def test_strong_decays_stay_finite_and_accurate_per_head():
    """dt A of -50 a step: every factor underflows towards 0, none overflows, and the tiny
    gradient of that head's A keeps its relative accuracy (no large terms cancel in it)."""
    args = inputs(1, 33, 2, 16, 1, 16, seed=2)
    args[1] = args[1] * 0 + 5.0
    args[2] = torch.tensor([-10.0, -0.01], dtype=torch.float64)
    check(args, 2e-5, chunk_size=16)
    grads = (torch.randn_like(args[0]), torch.randn_like(args[5]))
    want = run(ssd_reference, args, grads, chunk_size=16)[4]  # dA [H]
    got = run(ssd_triton, [t.to(DEVICE, torch.float32) for t in args],
              [t.to(DEVICE, torch.float32) for t in grads], chunk_size=16)[4]
    assert ((got.double().cpu() - want).abs() / want.abs()).max() < 1e-4


def test_matches_the_sequential_scan():
    x, dt, A, B, C, init = inputs(1, 21, 2, 16, 1, 16, seed=3)
    y_scan, h_scan = ssd_scan(x, dt, A, B, C, init)
    y, h = ssd_triton(*(t.to(DEVICE, torch.float32) for t in (x, dt, A, B, C)), 16,
                      init.to(DEVICE, torch.float32), True)
    assert rel_error(y, y_scan) < 1e-5 and rel_error(h, h_scan) < 1e-5


def test_public_function_runs_the_reference_on_cpu():
    x, dt, A, B, C, init = inputs(1, 12, 2, 8, 1, 8, seed=4)
    got = ssd(x, dt, A, B, C, 4, init, True)
    want = ssd_reference(x, dt, A, B, C, 4, init, True)
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))


@pytest.mark.parametrize("change, match", [
    (lambda a: a.__setitem__(1, a[1][..., :1]), "dt"),
    (lambda a: a.__setitem__(3, a[3][:, :, :1].expand(-1, -1, 3, -1)), "G dividing"),
    (lambda a: a.__setitem__(5, a[5][:, :1]), "initial_state"),
])
def test_bad_shapes_name_the_argument(change, match):
    args = inputs(1, 6, 2, 8, 2, 8)
    change(args)
    if match == "G dividing":
        args[4] = args[3]
    with pytest.raises(ValueError, match=match):
        ssd(*args[:5], 4, args[5])


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), (torch.bfloat16, 8e-3)])
def test_dt_scaling_reads_a_strided_slice(dtype, tol):
    """v = dt x, the kernels' input: x read in place from a slice of a wider tensor (as the
    mamba mixer slices it out of the conv's output), gradients to x and dt."""
    from stripes.kernels.ssd.input_scale import scale_by_dt

    g = torch.Generator().manual_seed(3)
    wide = torch.randn(2, 7, 3 * 24 + 5, generator=g).to(dtype).requires_grad_()
    x = wide[..., 5:].reshape(2, 7, 3, 24)  # [B, T, H, P] with a row stride of 77
    dt = F.softplus(torch.randn(2, 7, 3, generator=g)).requires_grad_()
    dv = torch.randn(2, 7, 3, 24, generator=g).to(dtype)
    v = scale_by_dt(x, dt)
    got = (v, *torch.autograd.grad(v, (wide, dt), dv))
    wide64, dt64 = (t.detach().double().requires_grad_() for t in (wide, dt))
    v64 = wide64[..., 5:].reshape(2, 7, 3, 24) * dt64[..., None]
    want = (v64, *torch.autograd.grad(v64, (wide64, dt64), dv.double()))
    assert v.dtype == dtype and got[1].dtype == dtype and got[2].dtype == torch.float32
    for name, a, b in zip(("v", "dx", "ddt"), got, want, strict=True):
        assert rel_error(a, b) < tol, (name, rel_error(a, b))
    assert not got[1][..., :5].any()  # the columns outside the slice get no gradient
