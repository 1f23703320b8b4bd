"""The fused decoding step (stripes.kernels.scalar_decay.step, Triton's interpreter on CPU)
through the public retention_step and ssd_step, token after token, against the references
run over the same tokens at once."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import stripes.kernels.retention as retention
import stripes.kernels.ssd as ssd
from stripes.arch.retention_forms import retention_chunkwise
from stripes.arch.ssd import ssd_scan
from stripes.kernels.scalar_decay import step

from numerics import rel_error

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def triton_on_cpu(monkeypatch):
    """Route the public step functions to the kernel on CPU tensors (the interpreter), and
    count the kernel's launches: yields the list of calls."""
    if DEVICE == "cpu":
        for module in (retention, ssd):
            monkeypatch.setattr(module, "use_triton", lambda *tensors: True)
    calls = []
    launch = step.scalar_decay_step_

    def counted(*args, **kwargs):
        calls.append(args)
        return launch(*args, **kwargs)
    monkeypatch.setattr(step, "scalar_decay_step_", counted)
    return calls


def test_retention_steps_match_the_chunkwise_form(triton_on_cpu):
    torch.manual_seed(0)
    B, T, H, dk, dv = 2, 5, 2, 16, 24
    q, k = (torch.randn(B, T, H, dk, device=DEVICE) for _ in range(2))
    v = torch.randn(B, T, H, dv, device=DEVICE)
    log_decay = torch.tensor([math.log1p(-2.0 ** -e) for e in (1.0, 5.0)], device=DEVICE)
    init = torch.randn(B, H, dk, dv, device=DEVICE)
    want, want_state = retention_chunkwise(q.double(), k.double(), v.double(),
                                           log_decay.double(), 2, init.double(), True)
    state = init.clone()
    outs = [retention.retention_step(q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1], log_decay,
                                     state) for t in range(T)]
    got = torch.cat(outs, dim=1)
    assert len(triton_on_cpu) == T  # one launch a token
    assert got.dtype == torch.float32
    assert rel_error(got, want) < 1e-5 and rel_error(state, want_state) < 1e-5


def test_ssd_steps_match_the_scan(triton_on_cpu):
    torch.manual_seed(1)
    batch, T, H, P, G, N = 2, 5, 4, 12, 2, 16
    x = torch.randn(batch, T, H, P, device=DEVICE)
    dt = F.softplus(torch.randn(batch, T, H, device=DEVICE))
    A = -torch.rand(H, device=DEVICE) * 4
    B, C = (torch.randn(batch, T, G, N, device=DEVICE) for _ in range(2))
    init = torch.randn(batch, H, P, N, device=DEVICE)
    want, want_state = ssd_scan(*(t.double() for t in (x, dt, A, B, C, init)))
    state = init.clone()
    outs = [ssd.ssd_step(x[:, t:t + 1], dt[:, t:t + 1], A, B[:, t:t + 1], C[:, t:t + 1],
                         state) for t in range(T)]
    got = torch.cat(outs, dim=1)
    assert len(triton_on_cpu) == T  # one launch a token
    assert got.dtype == torch.float32
    assert rel_error(got, want) < 1e-5 and rel_error(state, want_state) < 1e-5


def test_steps_take_one_token():
    with pytest.raises(ValueError, match="one token"):
        retention.retention_step(*(torch.zeros(1, 2, 1, 4) for _ in range(3)),
                                 torch.zeros(1), torch.zeros(1, 1, 4, 4))
