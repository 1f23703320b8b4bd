"""PyTorch reference for Mamba-2's chunked SSD over several sequences: the chunked form of
stripes.arch.ssd, run once per sequence (the rows of x, or the cu_seqlens spans of one
packed row)."""

from __future__ import annotations

import torch

from stripes.arch.packing import sequence_bounds
from stripes.arch.ssd import ssd_chunked


def check_inputs(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                 C: torch.Tensor, initial_state: torch.Tensor | None,
                 cu_seqlens: torch.Tensor | None, chunk_size: int) -> None:
    """Raise ValueError on bad shapes."""
    if x.dim() != 4 or dt.shape != x.shape[:3] or A.shape != x.shape[2:3]:
        raise ValueError(f"ssd: x must be [B, T, H, P], dt [B, T, H] and A [H], got x "
                         f"{tuple(x.shape)}, dt {tuple(dt.shape)}, A {tuple(A.shape)}")
    H = x.shape[2]
    if B.dim() != 4 or C.shape != B.shape or B.shape[:2] != x.shape[:2] or H % B.shape[2]:
        raise ValueError(f"ssd: B and C must be [B, T, G, N] with G dividing H = {H}, got "
                         f"B {tuple(B.shape)}, C {tuple(C.shape)}")
    if chunk_size < 1:
        raise ValueError(f"ssd: chunk_size must be positive, got {chunk_size}")
    if cu_seqlens is not None and (x.shape[0] != 1 or cu_seqlens.dim() != 1
                                   or cu_seqlens.numel() < 2):
        raise ValueError(f"ssd: cu_seqlens [S + 1] needs one packed row (B = 1), got x "
                         f"{tuple(x.shape)}, cu_seqlens {tuple(cu_seqlens.shape)}")
    S = x.shape[0] if cu_seqlens is None else cu_seqlens.numel() - 1
    want = (S, H, x.shape[3], B.shape[3])
    if initial_state is not None and initial_state.shape != want:
        raise ValueError(f"ssd: initial_state must be [S, H, P, N] = {list(want)}, got "
                         f"{tuple(initial_state.shape)}")


def ssd(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
        chunk_size: int = 64, initial_state: torch.Tensor | None = None,
        return_state: bool = False, cu_seqlens: torch.Tensor | None = None
        ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Same contract as stripes.kernels.ssd.ssd; computes in promote_types(x, float32) and
    returns y in x's dtype, the states in that compute dtype."""
    check_inputs(x, dt, A, B, C, initial_state, cu_seqlens, chunk_size)
    batch, T = x.shape[:2]
    flat = [t.reshape(batch * T, *t.shape[2:]) for t in (x, dt, B, C)]
    outs, states = [], []
    for s, (start, end) in enumerate(sequence_bounds(x, cu_seqlens)):
        init = None if initial_state is None else initial_state[s:s + 1]
        if end == start:  # an empty sequence outputs nothing and keeps its state
            compute = torch.promote_types(x.dtype, torch.float32)
            shape = (1, x.shape[2], x.shape[3], B.shape[3])
            states.append(x.new_zeros(shape, dtype=compute) if init is None
                          else init.to(compute))
            continue
        xs, dts, Bs, Cs = (t[None, start:end] for t in flat)
        y, state = ssd_chunked(xs, dts, A, Bs, Cs, chunk_size, init)
        outs.append(y[0])
        states.append(state)
    y = torch.cat(outs).view(x.shape).to(x.dtype) if outs else x.new_empty(x.shape)
    return y, torch.cat(states) if return_state else None
