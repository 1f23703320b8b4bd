"""Mamba-2's state space dual layer (Dao & Gu, 2024), chunked: per head, h_t = exp(dt_t A)
h_{t-1} + dt_t x_t B_t^T and y_t = h_t C_t, with B/C shared by groups of heads (the chunked
form of stripes.arch.ssd, which is the reference).

On CUDA it runs stripes.kernels.scalar_decay's kernels with q = C, k = B, v = dt x and the
log decay g = dt A: the same recurrence with the state transposed ([N, P] there, [P, N]
here). dt's softplus and bias, the D skip and the gate stay in the mixer.
"""

from __future__ import annotations

import torch

from stripes.arch.packing import sequence_bounds
from stripes.arch.ssd import ssd_scan
from stripes.kernels.dispatch import use_triton
from stripes.kernels.ssd.reference import check_inputs
from stripes.kernels.ssd.reference import ssd as ssd_reference

TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def ssd(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
        chunk_size: int = 64, initial_state: torch.Tensor | None = None,
        return_state: bool = False, cu_seqlens: torch.Tensor | None = None
        ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """y [B, T, H, P] in x's dtype and, if return_state, each sequence's final state.

    x: [B, T, H, P]; dt: [B, T, H] (positive: after softplus); A: [H] (negative); B, C:
    [B, T, G, N], head h reading group h // (H / G); initial_state: [S, H, P, N] or None
    (zeros); cu_seqlens: None (the S = B rows are the sequences) or int [S + 1] rising from 0
    to T over one packed row (B = 1). dt and A are consumed in float32. Gradients flow to
    every input (dt, A through both the decay dt A and the input dt x) and from the state.

    CUDA tensors with x, B, C of one dtype among float32, bfloat16, float16 run the Triton
    kernels (states in float32, matmuls in that dtype, chunks of chunk_size rounded up to a
    power of two in [16, 128]); everything else runs the reference. The final states are
    float32 on the Triton path (promote_types(x, float32) on the reference). Bad shapes
    raise ValueError.
    """
    if use_triton(x, B, C) and x.dtype == B.dtype == C.dtype and x.dtype in TRITON_DTYPES:
        return ssd_triton(x, dt, A, B, C, chunk_size, initial_state, return_state, cu_seqlens)
    return ssd_reference(x, dt, A, B, C, chunk_size, initial_state, return_state, cu_seqlens)


def ssd_triton(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
               C: torch.Tensor, chunk_size: int = 64, initial_state: torch.Tensor | None = None,
               return_state: bool = False, cu_seqlens: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The Triton path of `ssd` (same contract)."""
    from stripes.kernels.scalar_decay.function import chunk_scalar_decay
    from stripes.kernels.ssd.input_scale import scale_by_dt

    check_inputs(x, dt, A, B, C, initial_state, cu_seqlens, chunk_size)
    with torch.autocast(x.device.type, enabled=False):
        dt32 = dt.to(torch.float32)
        g = dt32 * A.to(torch.float32)  # [B, T, H] log decays, <= 0
        v = scale_by_dt(x, dt32)  # dt_t x_t [B, T, H, P] in x's dtype
        init = None if initial_state is None else initial_state.transpose(-1, -2)
        y, final = chunk_scalar_decay(C, B, v, g, sequence_bounds(x, cu_seqlens), init,
                                      return_state, chunk_size)
    return y, None if final is None else final.transpose(-1, -2)


def ssd_step(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
             C: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
    """One decoding step of recurrence (S1), h <- exp(dt A) h + dt x B^T and y = h C, with
    `state` h [B, H, P, N] updated in place. x: [B, 1, H, P]; dt: [B, 1, H]; A: [H]; B, C:
    [B, 1, G, N]. Returns y [B, 1, H, P] in the state's dtype (the D skip is the mixer's).

    A float32 state on CUDA with x, B, C of one Triton dtype takes one fused kernel
    (stripes.kernels.scalar_decay.step); anything else the sequential reference."""
    if x.shape[1] != 1:
        raise ValueError(f"ssd_step takes one token, got x of shape {tuple(x.shape)}")
    if (use_triton(x, B, C, state) and state.dtype == torch.float32 and state.is_contiguous()
            and x.dtype == B.dtype == C.dtype and x.dtype in TRITON_DTYPES):
        from stripes.kernels.scalar_decay.step import scalar_decay_step_

        dt32 = dt[:, 0].to(torch.float32)  # [B, H]
        v = x[:, 0].to(torch.float32) * dt32[..., None]  # [B, H, P]
        return scalar_decay_step_(C[:, 0], B[:, 0], v, dt32 * A.to(torch.float32), state,
                                  state_is_vk=True)[:, None]
    y, new_state = ssd_scan(x, dt, A, B, C, state)
    state.copy_(new_state)
    return y.to(state.dtype)
