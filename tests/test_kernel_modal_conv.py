"""The gated modal convolution: its two references agree (filter + FFT against the token-by-
token recurrence, float64), and the Triton kernels (interpreter on CPU) match them in float32
for the output and all seven gradients, over segment lengths that split the sequence
unevenly, filters shared by channel groups, mode and channel counts off the block sizes, and
q, k, v chunked out of one projection."""

from __future__ import annotations

import pytest
import torch

from stripes.arch.hyena_filters import modal_recurrence
from stripes.kernels.modal_conv import modal_gated_conv
from stripes.kernels.modal_conv.function import (
    PROGRAMS_PER_SM,
    channels_per_program,
    modal_conv_continue_triton,
    modal_gated_conv_triton,
    segment_length,
)
from stripes.kernels.modal_conv.reference import (
    modal_conv_continue,
    modal_gated_recurrence,
    per_channel,
)
from stripes.kernels.modal_conv.reference import modal_gated_conv as reference

from numerics import poison_empty, rel_error

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def poisoned_empty(monkeypatch):
    poison_empty(monkeypatch)


def inputs(B, T, C, G, N, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    rand = lambda *s: torch.randn(*s, generator=g, dtype=dtype)
    qkv = rand(B, T, 3 * C)  # one projection, chunked: strided views
    rate = torch.empty(G, N, dtype=dtype).uniform_(-5.0, 0.5, generator=g).exp()
    theta = torch.empty(G, N, dtype=dtype).uniform_(0.0, 3.1, generator=g)
    return [*qkv.chunk(3, dim=-1), rate, theta, rand(G, N) / N ** 0.5, rand(G, N) / N ** 0.5]


def forward_backward(fn, tensors, grad, **kwargs):
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    out = fn(*leaves, **kwargs)
    out.backward(grad.to(out.dtype))
    return [out] + [t.grad for t in leaves]


def test_references_agree():
    tensors = inputs(2, 29, 12, 4, 5)
    grad = torch.randn(2, 29, 12, dtype=torch.float64)
    fft = forward_backward(reference, tensors, grad)
    loop = forward_backward(modal_gated_recurrence, tensors, grad)
    for a, b in zip(fft, loop, strict=True):
        assert rel_error(a, b) < 1e-10


@pytest.mark.parametrize("B, T, C, G, N, segment", [
    (2, 37, 40, 40, 3, 10),    # a filter a channel; 4 segments, the last one short
    (1, 50, 40, 8, 16, 7),     # 5 channels a filter, 8 segments
    (2, 23, 33, 3, 5, 23),     # one segment
    (1, 9, 8, 2, 4, 1),        # a token a segment
    (1, 70, 32, 32, 16, None),  # the launcher's choice
    (1, 30, 40, 10, 20, 9),    # 20 modes: 16 channels a program, 3 programs, one partial
])
def test_float32_kernels_match_float64_reference(B, T, C, G, N, segment):
    tensors = inputs(B, T, C, G, N, seed=T + C)
    grad = torch.randn(B, T, C, dtype=torch.float64)
    want = forward_backward(reference, tensors, grad)
    dev = [t.to(DEVICE, torch.float32) for t in tensors]
    got = forward_backward(modal_gated_conv_triton, dev, grad.to(DEVICE), segment=segment)
    names = ["out", "dq", "dk", "dv", "drate", "dtheta", "dre", "dim"]
    for name, actual, expected in zip(names, got, want, strict=True):
        assert actual.dtype == torch.float32 and torch.isfinite(actual).all(), name
        assert rel_error(actual, expected) < 2e-5, name


def positions_of(doc_ids: torch.Tensor) -> torch.Tensor:
    steps = torch.arange(doc_ids.shape[1])
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    return steps - torch.where(starts, steps, 0).cummax(dim=1).values


@pytest.mark.parametrize("T, segment, N", [(40, 7, 5), (40, 40, 5), (23, 5, 5), (40, 9, 20)])
def test_packed_documents_restart_the_state(T, segment, N):
    """With positions, the kernels (float32) match the recurrence that restarts at each
    document (float64), which matches each document convolved alone; segment edges fall
    inside documents, on their starts and on their last tokens (N = 20: two lanes a
    channel on a GPU)."""
    B, C, G = 2, 12, 4
    tensors = inputs(B, T, C, G, N, seed=T + segment)
    doc_ids = torch.tensor([[0] * 7 + [1] * 14 + [2] * (T - 21), [0] * (T - 6) + [1] * 6])
    positions = positions_of(doc_ids)
    grad = torch.randn(B, T, C, dtype=torch.float64)
    want = forward_backward(modal_gated_recurrence, tensors, grad, positions=positions)
    first = [t[:1, 7:21] if i < 3 else t for i, t in enumerate(tensors)]
    assert rel_error(want[0][:1, 7:21], reference(*first)) < 1e-10  # document 1 alone
    dev = [t.to(DEVICE, torch.float32) for t in tensors]
    got = forward_backward(modal_gated_conv_triton, dev, grad.to(DEVICE),
                           positions=positions.to(DEVICE), segment=segment)
    for actual, expected in zip(got, want, strict=True):
        assert rel_error(actual, expected) < 2e-5


def test_bfloat16_activations():
    tensors = inputs(1, 40, 16, 16, 4, seed=3)
    grad = torch.randn(1, 40, 16, dtype=torch.float64)
    want = forward_backward(reference, tensors, grad)
    dev = [t.to(DEVICE, torch.bfloat16 if i < 3 else torch.float32)
           for i, t in enumerate(tensors)]
    got = forward_backward(modal_gated_conv_triton, dev, grad.to(DEVICE), segment=16)
    assert [t.dtype for t in got[:4]] == [torch.bfloat16] * 4
    for actual, expected in zip(got, want, strict=True):
        assert rel_error(actual, expected) < 2e-2


def test_segments_fill_the_device_and_stay_long():
    T = 32768
    cpu = torch.device("cpu")  # one "SM" off CUDA: PROGRAMS_PER_SM programs in all
    assert segment_length(1, T, 2048, 16, cpu) == T
    assert segment_length(1, T, 8, 16, cpu) == T // PROGRAMS_PER_SM
    assert segment_length(1, 100, 8, 16, cpu) == 100  # never below MIN_SEGMENT tokens
    assert segment_length(1, 10, 8, 16, cpu) == 10
    # 64 modes take 4 lanes a channel, so a program 8 channels: 256 programs at C = 2048
    assert segment_length(1, T, 2048, 64, cpu) == T


@pytest.mark.parametrize("N, channels", [(5, 32), (16, 32), (17, 16), (64, 8), (1024, 1)])
def test_more_modes_spread_a_channel_over_more_lanes(N, channels):
    """Past 16 modes a channel spreads over more lanes and a program (one warp) takes fewer
    channels, down to one (one lane holding 64 modes' states would spill them: 38 KB a
    thread in grads_bwd)."""
    assert channels_per_program(N) == channels


def test_cpu_runs_the_filter_and_fft_and_names_bad_shapes():
    tensors = inputs(1, 12, 6, 3, 2)
    assert rel_error(modal_gated_conv(*tensors), reference(*tensors)) < 1e-12
    q, k, v, rate, theta, re, im = tensors
    with pytest.raises(ValueError, match="G dividing C"):
        modal_gated_conv(q, k, v, rate.repeat(2, 1)[:4], theta[:2], re[:2], im[:2])
    with pytest.raises(ValueError, match="residue_im"):
        modal_gated_conv(q, k, v, rate, theta, re, im[:, :1])


@pytest.mark.parametrize("T, segment", [(37, 10), (37, 37), (5, 2), (0, None)])
def test_continue_kernel_carries_the_state(T, segment):
    """Prefill from a carried state: the Triton kernels (float32) against the parallel form
    and the token-by-token recurrence (float64), output and state after the chunk."""
    B, C, G, N = 2, 12, 4, 5
    _, u, _, rate, theta, re, im = inputs(B, T, C, G, N, seed=T)
    g = torch.Generator().manual_seed(1)
    state = torch.randn(B, C, N, dtype=torch.complex128, generator=g)
    y, new_state = modal_conv_continue(u, rate, theta, re, im, state)
    if T:
        poles = per_channel(torch.exp(torch.complex(-rate, theta)), C)
        y_rec, state_rec = modal_recurrence(u, poles, per_channel(torch.complex(re, im), C),
                                            state)
        assert rel_error(y, y_rec) < 1e-10
        assert rel_error(torch.view_as_real(new_state), torch.view_as_real(state_rec)) < 1e-10
    else:  # nothing read: the state is unchanged
        assert torch.equal(new_state, state) and y.shape == (B, 0, C)
    got_y, got_state = modal_conv_continue_triton(
        u.to(DEVICE, torch.float32), *(t.to(DEVICE, torch.float32) for t in (rate, theta, re, im)),
        state.to(DEVICE, torch.complex64), segment=segment)
    assert got_y.shape == (B, T, C) and got_state.dtype == torch.complex64
    if T:
        assert rel_error(got_y, y) < 2e-5
    assert rel_error(torch.view_as_real(got_state), torch.view_as_real(new_state)) < 2e-5


def test_backward_keeps_the_inputs_and_segment_states_only():
    """What the kernels' autograd node keeps grows with T only through q, k, v themselves:
    besides them and the filter parameters, the state entering each segment (float32
    [B, segments, 2, C, N]), never a [B, T, C] activation such as y."""
    B, T, C, G, N, segment = 2, 40, 12, 4, 5, 16
    leaves = [t.to(DEVICE, torch.float32).requires_grad_() for t in inputs(B, T, C, G, N)]
    out = modal_gated_conv_triton(*leaves, segment=segment)
    kept = [t for t in out.grad_fn.saved_tensors if t is not None]
    activations = [t for t in kept if t.shape == (B, T, C)]
    states = [t for t in kept if t.dim() == 5]
    assert len(activations) == 3  # q, k, v
    assert [tuple(t.shape) for t in states] == [(B, 3, 2, C, N)]
    assert sum(t.numel() for t in kept) == 3 * B * T * C + 4 * G * N + B * 3 * 2 * C * N
