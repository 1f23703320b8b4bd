"""Launchers and the autograd Function for chunked retention (kernels in kernel.py).

Forward: the state scan (h_i for every chunk, and the final state), then the output kernel.
The per-chunk states are not kept for backward: [N_chunks, H, Dk, Dv] (Dk Dv / C values a
token and head, 256 at Dk = Dv = 128, C = 64) outweighs q, k and v together, so backward
runs the state scan again (one more pass over K and V), then the reverse scan for dh, then
dq/dk and dv.
"""

from __future__ import annotations

import torch
import triton

from stripes.kernels.retention import kernel
from stripes.kernels.retention.reference import check_inputs, sequence_bounds

MIN_CHUNK, MAX_CHUNK = 16, 128  # tl.dot needs 16 rows; 128 keeps the [C, C] tiles in registers


def triton_chunk(chunk_size: int) -> int:
    """The chunk the kernels tile by: chunk_size rounded up to a power of two in [16, 128].
    Chunking changes only the order of a sum (the chunkwise form is the same function for
    every chunk size), so the Triton path takes the nearest size its tiles allow."""
    return min(MAX_CHUNK, max(MIN_CHUNK, triton.next_power_of_2(chunk_size)))


def _blocks(dk: int, dv: int) -> tuple[int, int]:
    """(BK, BV): 64-wide tiles of the state, narrower when the head is (at least 16)."""
    return (min(64, max(16, triton.next_power_of_2(dk))),
            min(64, max(16, triton.next_power_of_2(dv))))


def build_tables(q: torch.Tensor, cu_seqlens: torch.Tensor | None, chunk: int):
    """(seqs int32 [3, S]: first flat token, length, first chunk; chunks int32 [2, N_chunks]:
    first flat token, length), on q's device."""
    seqs, chunks = [], []
    for start, end in sequence_bounds(q, cu_seqlens):
        seqs.append((start, end - start, len(chunks)))
        chunks.extend((c, min(chunk, end - c)) for c in range(start, end, chunk))
    seq_table = torch.tensor(seqs, dtype=torch.int32).T.contiguous()
    chunk_table = torch.tensor(chunks or [(0, 0)], dtype=torch.int32)[:len(chunks)]
    return (seq_table.to(q.device, non_blocking=True),
            chunk_table.reshape(-1, 2).T.contiguous().to(q.device, non_blocking=True))


def _states(k, v, log_decay, seqs, n_chunks, initial_state, store_final, chunk):
    """h [N_chunks, H, Dk, Dv] in k's dtype and the final states [S, H, Dk, Dv] float32 (or
    None)."""
    _, H, dk = k.shape
    dv, S = v.shape[-1], seqs.shape[1]
    bk, bv = _blocks(dk, dv)
    h = torch.empty(n_chunks, H, dk, dv, dtype=k.dtype, device=k.device)
    final = (torch.empty(S, H, dk, dv, dtype=torch.float32, device=k.device) if store_final
             else None)
    kernel._states_kernel[(triton.cdiv(dk, bk), triton.cdiv(dv, bv), S * H)](
        k, v, h, initial_state if initial_state is not None else h,
        final if final is not None else h, log_decay, seqs, S,
        H=H, DK=dk, DV=dv, C=chunk, BK=bk, BV=bv, HAS_INIT=initial_state is not None,
        STORE_FINAL=store_final, IEEE=k.dtype == torch.float32)
    return h, final


def retention_forward(q, k, v, log_decay, initial_state, seqs, chunks, chunk, return_state):
    """q, k [N_tok, H, Dk], v [N_tok, H, Dv] contiguous -> o [N_tok, H, Dv], final or None."""
    _, H, dk = q.shape
    dv, n_chunks = v.shape[-1], chunks.shape[1]
    h, final = _states(k, v, log_decay, seqs, n_chunks, initial_state, return_state, chunk)
    o = torch.empty_like(v)
    bk, bv = _blocks(dk, dv)
    if n_chunks:
        kernel._output_kernel[(triton.cdiv(dv, bv), n_chunks, H)](
            q, k, v, h, o, log_decay, chunks, n_chunks, H=H, DK=dk, DV=dv, C=chunk, BK=bk,
            BV=bv, IEEE=q.dtype == torch.float32)
    return o, final


def retention_backward(q, k, v, do, d_final, log_decay, initial_state, seqs, chunks, chunk,
                       need_d_init):
    """Gradients of q, k, v (their dtype) and of the initial state (float32, or None)."""
    _, H, dk = q.shape
    dv_dim, n_chunks, S = v.shape[-1], chunks.shape[1], seqs.shape[1]
    bk, bv = _blocks(dk, dv_dim)
    ieee = q.dtype == torch.float32
    h, _ = _states(k, v, log_decay, seqs, n_chunks, initial_state, False, chunk)
    dh = torch.empty_like(h)
    d_init = (torch.empty(S, H, dk, dv_dim, dtype=torch.float32, device=q.device)
              if need_d_init else None)
    kernel._state_grads_kernel[(triton.cdiv(dk, bk), triton.cdiv(dv_dim, bv), S * H)](
        q, do, dh, d_final if d_final is not None else dh, d_init if need_d_init else dh,
        log_decay, seqs, S, H=H, DK=dk, DV=dv_dim, C=chunk, BK=bk, BV=bv,
        HAS_DFINAL=d_final is not None, STORE_DINIT=need_d_init, IEEE=ieee)
    dq, dk_, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if n_chunks:
        kernel._dq_dk_kernel[(triton.cdiv(dk, bk), n_chunks, H)](
            q, k, v, do, h, dh, dq, dk_, log_decay, chunks, n_chunks, H=H, DK=dk, DV=dv_dim,
            C=chunk, BK=bk, BV=bv, IEEE=ieee)
        kernel._dv_kernel[(triton.cdiv(dv_dim, bv), n_chunks, H)](
            q, k, do, dh, dv, log_decay, chunks, n_chunks, H=H, DK=dk, DV=dv_dim, C=chunk,
            BK=bk, BV=bv, IEEE=ieee)
    return dq, dk_, dv, d_init


class ChunkRetentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, log_decay, initial_state, seqs, chunks, chunk, return_state):
        B, T, H, dk = q.shape
        flat = [t.reshape(B * T, H, -1).contiguous() for t in (q, k, v)]
        log_decay = log_decay.to(torch.float32).contiguous()
        init = None if initial_state is None else initial_state.to(torch.float32).contiguous()
        o, final = retention_forward(*flat, log_decay, init, seqs, chunks, chunk, return_state)
        ctx.save_for_backward(*flat, log_decay, init, seqs, chunks)
        ctx.chunk, ctx.shape = chunk, (B, T, H)
        ctx.init_dtype = None if initial_state is None else initial_state.dtype
        return o.view(B, T, H, -1), final

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_o, d_final):
        q, k, v, log_decay, init, seqs, chunks = ctx.saved_tensors
        B, T, H = ctx.shape
        do = d_o.reshape(B * T, H, -1).to(q.dtype).contiguous()
        d_final = None if d_final is None else d_final.to(torch.float32).contiguous()
        need_d_init = init is not None and ctx.needs_input_grad[4]
        dq, dk, dv, d_init = retention_backward(q, k, v, do, d_final, log_decay, init, seqs,
                                                chunks, ctx.chunk, need_d_init)
        if d_init is not None:
            d_init = d_init.to(ctx.init_dtype)
        return (dq.view(B, T, H, -1), dk.view(B, T, H, -1), dv.view(B, T, H, -1), None,
                d_init, None, None, None, None)


def chunk_retention_triton(q, k, v, log_decay, initial_state=None, return_state=False,
                           cu_seqlens=None, chunk_size=64):
    """The Triton path of stripes.kernels.retention.chunk_retention (same contract)."""
    check_inputs(q, k, v, log_decay, initial_state, cu_seqlens, chunk_size)
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (
            torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"chunk_retention_triton: q, k, v must share one of float32, bfloat16, "
                         f"float16, got {q.dtype}, {k.dtype}, {v.dtype}")
    chunk = triton_chunk(chunk_size)
    seqs, chunks = build_tables(q, cu_seqlens, chunk)
    log_decay = log_decay.to(device=q.device)
    return ChunkRetentionFunction.apply(q, k, v, log_decay, initial_state, seqs, chunks, chunk,
                                        return_state)
