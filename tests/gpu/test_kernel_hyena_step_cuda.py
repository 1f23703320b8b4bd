"""The fused Hyena decoding step on a CUDA device, 64 sequences at hybrid-1b's width,
bf16 projections, against the float64 composed reference, token after token."""

from __future__ import annotations

import pytest
import torch

from stripes.arch.hyena_filters import modal_poles
from stripes.kernels.hyena_step import hyena_step_
from stripes.kernels.hyena_step.reference import hyena_step_ as hyena_step_reference_

from numerics import rel_error

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("modal", [True, False])
def test_steps_match_the_reference(modal):
    torch.manual_seed(0)
    B, D, N, short_len, L = 64, 2048, 16, 3, 7
    rand = lambda *s: torch.randn(*s, device="cuda", dtype=torch.float64)
    short_filter, short = rand(3 * D, short_len), rand(B, short_len - 1, 3 * D)
    if modal:
        filters = {"poles": modal_poles(rand(D, N) - 2, rand(D, N)),
                   "residues": torch.complex(rand(D, N), rand(D, N))}
        long_state = torch.complex(rand(B, D, N), rand(B, D, N))
    else:
        filters, long_state = {"long_filter": rand(D, L)}, rand(B, L - 1, D)
    cast = {n: t.to(torch.complex64 if t.is_complex() else torch.float32)
            for n, t in filters.items()}
    ref_short, ref_long = short.clone(), long_state.clone()
    dev_short = short.bfloat16()
    dev_long = long_state.to(torch.complex64) if modal else long_state.bfloat16()
    for _ in range(4):
        p = rand(B, 1, 3 * D).bfloat16()
        want = hyena_step_reference_(p.double(), ref_short, short_filter, ref_long, **filters)
        got = hyena_step_(p, dev_short, short_filter.float(), dev_long, **cast)
        assert rel_error(got, want) < 2e-2
    assert rel_error(dev_long, ref_long) < 2e-2
