"""The fused Hyena decoding step (Triton's interpreter on CPU) against the composed
reference in float64, token after token: outputs, histories and the modal state."""

from __future__ import annotations

import pytest
import torch

from stripes.arch.hyena_filters import modal_poles
from stripes.kernels.hyena_step.kernel import hyena_step_triton_
from stripes.kernels.hyena_step.reference import hyena_step_ as hyena_step_reference_

from numerics import rel_error

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("modal, D, short_len, L", [(True, 130, 3, 0), (False, 40, 3, 7),
                                                    (False, 24, 1, 4)])
def test_steps_match_the_reference(modal, D, short_len, L):
    g = torch.Generator().manual_seed(D + L)
    rand = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
    B, N, steps = 2, 5, 4
    short_filter = rand(3 * D, short_len)
    short = rand(B, short_len - 1, 3 * D)
    if modal:
        poles = modal_poles(rand(D, N) - 2, rand(D, N))
        residues = torch.complex(rand(D, N), rand(D, N))
        long_state, long_filter = torch.complex(rand(B, D, N), rand(B, D, N)), None
    else:
        poles = residues = None
        long_state, long_filter = rand(B, L - 1, D), rand(D, L)
    ref_short, ref_long = short.clone(), long_state.clone()
    cast = lambda t: None if t is None else t.to(DEVICE, torch.complex64 if t.is_complex()
                                                 else torch.float32)
    dev_short, dev_long = cast(short), cast(long_state)
    for _ in range(steps):
        p = rand(B, 1, 3 * D)
        want = hyena_step_reference_(p, ref_short, short_filter, ref_long, long_filter, poles,
                                     residues)
        got = hyena_step_triton_(cast(p), dev_short, cast(short_filter), dev_long,
                                 cast(long_filter), cast(poles), cast(residues))
        assert got.shape == (B, 1, D) and got.dtype == torch.float32
        assert rel_error(got, want) < 1e-5
    assert rel_error(dev_short, ref_short) < 1e-6
    assert rel_error(dev_long, ref_long) < 1e-5
