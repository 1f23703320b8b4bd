"""Chunked retention (RetNet, Sun et al., 2023): o_t = sum_{s <= t} gamma^(t - s) (q_t . k_s)
v_s per head, plus gamma^(t + 1) q_t S_init, computed chunk by chunk with the state carried
across chunks in float32 (the chunkwise form of stripes.arch.retention_forms).

Layout [B, T, H, D]. Packed sequences: pass B = 1 and cu_seqlens, and each span starts from
its own state. On CUDA the kernels are stripes.kernels.scalar_decay's, with the decay
constant along each head.
"""

from __future__ import annotations

import torch

from stripes.arch.packing import sequence_bounds
from stripes.arch.retention_forms import retention_recurrent
from stripes.kernels.dispatch import use_triton
from stripes.kernels.retention.reference import check_inputs
from stripes.kernels.retention.reference import chunk_retention as chunk_retention_reference

TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def chunk_retention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_decay: torch.Tensor,
                    initial_state: torch.Tensor | None = None, return_state: bool = False,
                    cu_seqlens: torch.Tensor | None = None, chunk_size: int = 64
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Retention of every sequence, and when asked the state after each.

    q, k: [B, T, H, Dk]; v: [B, T, H, Dv] (scale k by Dk^-1/2 beforehand if wanted);
    log_decay: [H], log gamma_h < 0 (float32 or wider; it is consumed in float32 on the
    Triton path); initial_state: [S, H, Dk, Dv] or None (zeros); cu_seqlens: None (the S = B
    rows are the sequences) or int [S + 1] rising from 0 to T over one packed row (B = 1).
    Returns o [B, T, H, Dv] in q's dtype and, if return_state, the states [S, H, Dk, Dv]
    after each sequence's last token (float32, or float64 for float64 inputs); gradients flow
    to q, k, v and the initial state, and from the returned state.

    CUDA tensors of one dtype among float32, bfloat16, float16 run the Triton kernels: states
    accumulate in float32, matmuls take the inputs' dtype (float32 ones in full precision),
    chunks are chunk_size rounded up to a power of two in [16, 128]. Everything else runs the
    reference (stripes.kernels.retention.reference). Reading cu_seqlens costs one copy to the
    host. Bad shapes raise ValueError.
    """
    dtypes = {q.dtype, k.dtype, v.dtype}
    if use_triton(q, k, v) and len(dtypes) == 1 and q.dtype in TRITON_DTYPES:
        return chunk_retention_triton(q, k, v, log_decay, initial_state, return_state,
                                      cu_seqlens, chunk_size)
    return chunk_retention_reference(q, k, v, log_decay, initial_state, return_state,
                                     cu_seqlens, chunk_size)


def chunk_retention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           log_decay: torch.Tensor, initial_state: torch.Tensor | None = None,
                           return_state: bool = False, cu_seqlens: torch.Tensor | None = None,
                           chunk_size: int = 64) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The Triton path of `chunk_retention` (same contract): the scalar-decay kernels with
    g_t = log gamma_h at every token. The decays are constants: no gradient reaches them."""
    from stripes.kernels.scalar_decay.function import chunk_scalar_decay

    check_inputs(q, k, v, log_decay, initial_state, cu_seqlens, chunk_size)
    B, T, H = q.shape[:3]
    g = log_decay.detach().to(device=q.device, dtype=torch.float32).expand(B, T, H)
    return chunk_scalar_decay(q, k, v, g, sequence_bounds(q, cu_seqlens), initial_state,
                              return_state, chunk_size)


def retention_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_decay: torch.Tensor,
                   state: torch.Tensor) -> torch.Tensor:
    """One decoding step: S <- gamma S + k^T v, o = q S, with `state` S [B, H, Dk, Dv]
    updated in place. q, k: [B, 1, H, Dk]; v: [B, 1, H, Dv]; log_decay: [H]. Returns
    o [B, 1, H, Dv] in the state's dtype (float32, or float64 for a float64 state).

    A float32 state on CUDA with q, k, v of one Triton dtype takes one fused kernel
    (stripes.kernels.scalar_decay.step); anything else the recurrent reference."""
    if q.shape[1] != 1:
        raise ValueError(f"retention_step takes one token, got q of shape {tuple(q.shape)}")
    if (use_triton(q, k, v, state) and state.dtype == torch.float32 and state.is_contiguous()
            and len({q.dtype, k.dtype, v.dtype}) == 1 and q.dtype in TRITON_DTYPES):
        from stripes.kernels.scalar_decay.step import scalar_decay_step_

        g = log_decay.to(device=q.device, dtype=torch.float32).expand(q.shape[0], -1)
        return scalar_decay_step_(q[:, 0], k[:, 0], v[:, 0], g, state)[:, None]
    o, new_state = retention_recurrent(q, k, v, log_decay, state, return_state=True)
    state.copy_(new_state)
    return o.to(state.dtype)
