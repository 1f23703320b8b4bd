"""The fused decoding step on a CUDA device: 64 sequences, retention's and Mamba-2's shapes,
bf16 token vectors and float32 states, token after token against the float64 references."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from stripes.arch.retention_forms import retention_recurrent
from stripes.arch.ssd import ssd_scan
from stripes.kernels.retention import retention_step
from stripes.kernels.ssd import ssd_step

from numerics import rel_error

pytestmark = pytest.mark.gpu
BATCH, STEPS = 64, 8


def test_retention_step():
    H, dk, dv = 8, 128, 256
    q, k = (torch.randn(BATCH, STEPS, H, dk, device="cuda").bfloat16() for _ in range(2))
    v = torch.randn(BATCH, STEPS, H, dv, device="cuda").bfloat16()
    log_decay = torch.tensor([math.log1p(-2.0 ** (-5.0 - h)) for h in range(H)], device="cuda")
    init = torch.randn(BATCH, H, dk, dv, device="cuda")
    want, want_state = retention_recurrent(q.double(), k.double(), v.double(),
                                           log_decay.double(), init.double(), True)
    state = init.clone()
    got = torch.cat([retention_step(q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1], log_decay,
                                    state) for t in range(STEPS)], dim=1)
    assert rel_error(got, want) < 1e-5 and rel_error(state, want_state) < 1e-5


def test_ssd_step():
    H, P, G, N = 32, 64, 1, 128
    x = torch.randn(BATCH, STEPS, H, P, device="cuda").bfloat16()
    dt = F.softplus(torch.randn(BATCH, STEPS, H, device="cuda") - 3)
    A = -torch.rand(H, device="cuda") * 8
    B, C = (torch.randn(BATCH, STEPS, G, N, device="cuda").bfloat16() for _ in range(2))
    init = torch.randn(BATCH, H, P, N, device="cuda")
    want, want_state = ssd_scan(*(t.double() for t in (x, dt, A, B, C, init)))
    state = init.clone()
    got = torch.cat([ssd_step(x[:, t:t + 1], dt[:, t:t + 1], A, B[:, t:t + 1], C[:, t:t + 1],
                              state) for t in range(STEPS)], dim=1)
    assert rel_error(got, want) < 1e-5 and rel_error(state, want_state) < 1e-5
