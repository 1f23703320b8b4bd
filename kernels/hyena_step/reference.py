"""Reference for one Hyena decoding step after the input projection, as the mixer composes
it from stripes.arch.hyena_filters:

    z = featurizer FIR of p (the in_proj output) over its last short_len - 1 values
    q, k, v = split(z);  u = k v
    y = the long filter's step on u: LI's modal recurrence s <- pole s + u, y = Re(sum R s);
        SE / MR's FIR over the last filter_len - 1 values of u
    out = q y

Histories and the modal state are advanced in place.
"""

from __future__ import annotations

import torch

from stripes.arch.hyena_filters import direct_causal_conv, fir_continue, modal_recurrence


def hyena_step_(p: torch.Tensor, short_history: torch.Tensor, short_filter: torch.Tensor,
                long_state: torch.Tensor, long_filter: torch.Tensor | None = None,
                poles: torch.Tensor | None = None,
                residues: torch.Tensor | None = None) -> torch.Tensor:
    """Same contract as stripes.kernels.hyena_step.hyena_step_."""
    z, short = fir_continue(p, short_history, short_filter, direct_causal_conv)
    short_history.copy_(short)
    q, k, v = z.chunk(3, dim=-1)  # [B, 1, D] each
    if poles is not None:
        y, modes = modal_recurrence(k * v, poles, residues, long_state)
    else:
        y, modes = fir_continue(k * v, long_state, long_filter, direct_causal_conv)
    long_state.copy_(modes)
    return q * y
