"""PyTorch reference for chunked retention over several sequences: the chunkwise form of
stripes.arch.retention_forms, run once per sequence.

Sequences are the B rows of q, or, with cu_seqlens, the spans [cu[s], cu[s+1]) of one packed
row (B = 1), each starting from its own initial state (or zero).
"""

from __future__ import annotations

import torch

from stripes.arch.packing import sequence_bounds
from stripes.arch.retention_forms import retention_chunkwise


def check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_decay: torch.Tensor,
                 initial_state: torch.Tensor | None, cu_seqlens: torch.Tensor | None,
                 chunk_size: int) -> int:
    """Raise ValueError on bad shapes; return the number of sequences S."""
    if q.dim() != 4 or k.shape != q.shape or v.dim() != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"chunk_retention: q, k must be [B, T, H, Dk] and v [B, T, H, Dv] "
                         f"with B, T, H shared, got q {tuple(q.shape)}, k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)}")
    B, _, H, Dk = q.shape
    if log_decay.shape != (H,):
        raise ValueError(f"chunk_retention: log_decay must be [H] = [{H}], got "
                         f"{tuple(log_decay.shape)}")
    if chunk_size < 1:
        raise ValueError(f"chunk_retention: chunk_size must be positive, got {chunk_size}")
    S = B
    if cu_seqlens is not None:
        if B != 1 or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
            raise ValueError(f"chunk_retention: cu_seqlens [S + 1] needs B = 1 (one packed "
                             f"row), got q {tuple(q.shape)}, cu_seqlens "
                             f"{tuple(cu_seqlens.shape)}")
        S = cu_seqlens.numel() - 1
    want = (S, H, Dk, v.shape[-1])
    if initial_state is not None and initial_state.shape != want:
        raise ValueError(f"chunk_retention: initial_state must be [S, H, Dk, Dv] = "
                         f"{list(want)}, got {tuple(initial_state.shape)}")
    return S


def chunk_retention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_decay: torch.Tensor,
                    initial_state: torch.Tensor | None = None, return_state: bool = False,
                    cu_seqlens: torch.Tensor | None = None, chunk_size: int = 64
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Same contract as stripes.kernels.retention.chunk_retention; computes in
    promote_types(dtype, float32) and returns o in q's dtype, the state in that compute dtype."""
    check_inputs(q, k, v, log_decay, initial_state, cu_seqlens, chunk_size)
    B, T, H, Dk = q.shape
    flat = [t.reshape(B * T, H, -1) for t in (q, k, v)]
    outs, states = [], []
    for s, (start, end) in enumerate(sequence_bounds(q, cu_seqlens)):
        init = None if initial_state is None else initial_state[s:s + 1]
        if end == start:  # an empty sequence outputs nothing and keeps its state
            compute = torch.promote_types(q.dtype, torch.float32)
            states.append(q.new_zeros(1, H, Dk, v.shape[-1], dtype=compute) if init is None
                          else init.to(compute))
            continue
        o, state = retention_chunkwise(*(t[None, start:end] for t in flat), log_decay,
                                       chunk_size, init, return_state=True)
        outs.append(o[0])
        states.append(state)
    o = torch.cat(outs).view(B, T, H, -1).to(q.dtype) if outs else v.new_empty(v.shape)
    return o, torch.cat(states) if return_state else None
