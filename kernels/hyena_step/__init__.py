"""One Hyena decoding step after the input projection, fused (formula in reference.py): the
featurizer FIR, u = k v, the long filter's step (LI: modal recurrence; SE / MR: FIR) and
q y, with the histories and the modal state advanced in place.
"""

from __future__ import annotations

import torch

from stripes.kernels.dispatch import use_triton
from stripes.kernels.hyena_step.reference import hyena_step_ as hyena_step_reference_

TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def hyena_step_(p: torch.Tensor, short_history: torch.Tensor, short_filter: torch.Tensor,
                long_state: torch.Tensor, long_filter: torch.Tensor | None = None,
                poles: torch.Tensor | None = None,
                residues: torch.Tensor | None = None) -> torch.Tensor:
    """q y for one token, [B, 1, D] in p's dtype.

    p: [B, 1, 3D], the in_proj output; short_history: [B, short_len-1, 3D], the featurizer's
    last inputs (oldest first); short_filter: [3D, short_len]. Long filter, one of: LI,
    poles and residues complex [D, N] with long_state the complex modal state [B, D, N];
    SE / MR, long_filter [D, L] with long_state the last L-1 values of u [B, L-1, D]. Both
    states are updated in place.

    CUDA tensors with p of a Triton dtype, a complex64 modal state (LI) and contiguous
    states run one Triton kernel (float32 math throughout); everything else runs the
    reference."""
    if (use_triton(p, short_history, long_state) and p.dtype in TRITON_DTYPES
            and (poles is None or long_state.dtype == torch.complex64)
            and short_history.is_contiguous() and long_state.is_contiguous()):
        from stripes.kernels.hyena_step.kernel import hyena_step_triton_

        return hyena_step_triton_(p, short_history, short_filter, long_state, long_filter,
                                  poles, residues)
    return hyena_step_reference_(p, short_history, short_filter, long_state, long_filter,
                                 poles, residues)
