"""Triton kernels for chunked retention: two sequential scans over chunks (the state, forward
and backward) and three kernels parallel over chunks (the output, dq/dk, dv).

Notation per sequence and head, chunk i of L_i <= C tokens, row j in [0, C), gamma the head's
decay (log_gamma < 0, float32), D[j, l] = gamma^(j - l) for l <= j else 0:
    xi_j   = gamma^(j + 1)            a token's read of the state that entered its chunk
    zeta_j = gamma^(L_i - 1 - j)      a token's write into the state that leaves its chunk
    h_i    = the state entering chunk i [Dk, Dv], h_0 = the initial state (or 0)
    h_{i+1} = gamma^L_i h_i + (K_i * zeta)^T V_i                           (_states_kernel)
    O_i     = ((Q_i K_i^T) * D) V_i + (Q_i * xi) h_i                       (_output_kernel)
Backward, with dh_i the gradient of the state LEAVING chunk i (entering i + 1; for the last
chunk the final state's gradient or 0):
    dh_{i-1} = gamma^L_i dh_i + (Q_i * xi)^T dO_i                         (_state_grads_kernel)
    dQ_i = ((dO_i V_i^T) * D) K_i + xi * (dO_i h_i^T)                      (_dq_dk_kernel)
    dK_i = ((dO_i V_i^T) * D)^T Q_i + zeta * (V_i dh_i^T)                  (_dq_dk_kernel)
    dV_i = ((Q_i K_i^T) * D)^T dO_i + (K_i * zeta) dh_i                    (_dv_kernel)
and the initial state's gradient is what the backward scan carries past the first chunk.
Every decay factor is exp(n * log_gamma) with n >= 0, so all lie in (0, 1]; padded rows
(j >= L_i) load zeros and take factor 0.

Layout: q, k [N_tok, H, Dk] and v, o [N_tok, H, Dv] contiguous, N_tok = B * T flat tokens;
a sequence is a span of flat tokens (a row of the batch, or a packed document); chunks never
cross sequences. Tables (int32, on the device): seqs [3, S] = first token, length, first
global chunk; chunks [2, N_chunks] = first token, length. States h and dh: [N_chunks, H, Dk,
Dv], stored in the inputs' dtype: the scans accumulate in float32 registers, and every
stored state only ever feeds a matmul, whose operands are in the inputs' dtype anyway
(bf16/fp16: tensor cores; float32: full-precision "ieee" dots). Accumulators are float32;
the initial and final states and their gradients are float32 in memory too.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _mm(a, b, IEEE: tl.constexpr):
    """a @ b accumulated in float32; IEEE: full float32 products (float32 inputs), else the
    operands' dtype on tensor cores."""
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _states_kernel(k_ptr, v_ptr, h_ptr, init_ptr, final_ptr, log_decay_ptr, seqs_ptr, S,
                   H: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, C: tl.constexpr,
                   BK: tl.constexpr, BV: tl.constexpr, HAS_INIT: tl.constexpr,
                   STORE_FINAL: tl.constexpr, IEEE: tl.constexpr):
    """Grid (Dk / BK, Dv / BV, S * H): one [BK, BV] tile of one head's state walks its
    sequence's chunks in order, storing h_i before each chunk's update."""
    pid_k, pid_v, pid_sh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    s, h = pid_sh // H, pid_sh % H
    start = tl.load(seqs_ptr + s)
    length = tl.load(seqs_ptr + S + s)
    first_chunk = tl.load(seqs_ptr + 2 * S + s)
    log_gamma = tl.load(log_decay_ptr + h).to(tl.float32)
    rk = pid_k * BK + tl.arange(0, BK)  # [BK]
    rv = pid_v * BV + tl.arange(0, BV)  # [BV]
    rc = tl.arange(0, C)  # [C]
    tile = rk[:, None] * DV + rv[None, :]  # [BK, BV] offsets inside one [Dk, Dv] state
    tile_mask = (rk < DK)[:, None] & (rv < DV)[None, :]
    dtype = k_ptr.dtype.element_ty

    state = tl.zeros((BK, BV), dtype=tl.float32)
    if HAS_INIT:
        state = tl.load(init_ptr + pid_sh.to(tl.int64) * DK * DV + tile, mask=tile_mask,
                        other=0.0).to(tl.float32)
    for i in range(tl.cdiv(length, C)):
        chunk = (first_chunk + i).to(tl.int64)
        tl.store(h_ptr + (chunk * H + h) * DK * DV + tile, state.to(h_ptr.dtype.element_ty),
                 mask=tile_mask)
        n_valid = tl.minimum(length - i * C, C)
        valid = rc < n_valid  # [C]
        token = (start + i * C + rc).to(tl.int64)  # [C]
        k = tl.load(k_ptr + (token[:, None] * H + h) * DK + rk[None, :],
                    mask=valid[:, None] & (rk < DK)[None, :], other=0.0)  # [C, BK]
        v = tl.load(v_ptr + (token[:, None] * H + h) * DV + rv[None, :],
                    mask=valid[:, None] & (rv < DV)[None, :], other=0.0)  # [C, BV]
        zeta = tl.where(valid, tl.exp(tl.maximum(n_valid - 1 - rc, 0) * log_gamma), 0.0)
        k_zeta = (k.to(tl.float32) * zeta[:, None]).to(dtype)
        state = state * tl.exp(n_valid * log_gamma) + _mm(tl.trans(k_zeta), v, IEEE)
    if STORE_FINAL:
        tl.store(final_ptr + pid_sh.to(tl.int64) * DK * DV + tile, state, mask=tile_mask)


@triton.jit
def _state_grads_kernel(q_ptr, do_ptr, dh_ptr, dfinal_ptr, dinit_ptr, log_decay_ptr, seqs_ptr,
                        S, H: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
                        C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                        HAS_DFINAL: tl.constexpr, STORE_DINIT: tl.constexpr,
                        IEEE: tl.constexpr):
    """Grid as _states_kernel: the gradient of the state walks the chunks backwards, storing
    dh_i (the gradient of the state leaving chunk i) before folding in chunk i's reads."""
    pid_k, pid_v, pid_sh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    s, h = pid_sh // H, pid_sh % H
    start = tl.load(seqs_ptr + s)
    length = tl.load(seqs_ptr + S + s)
    first_chunk = tl.load(seqs_ptr + 2 * S + s)
    log_gamma = tl.load(log_decay_ptr + h).to(tl.float32)
    rk = pid_k * BK + tl.arange(0, BK)
    rv = pid_v * BV + tl.arange(0, BV)
    rc = tl.arange(0, C)
    tile = rk[:, None] * DV + rv[None, :]
    tile_mask = (rk < DK)[:, None] & (rv < DV)[None, :]
    dtype = q_ptr.dtype.element_ty
    xi = tl.exp((rc + 1) * log_gamma)  # [C]

    dstate = tl.zeros((BK, BV), dtype=tl.float32)
    if HAS_DFINAL:
        dstate = tl.load(dfinal_ptr + pid_sh.to(tl.int64) * DK * DV + tile, mask=tile_mask,
                         other=0.0).to(tl.float32)
    n_chunks = tl.cdiv(length, C)
    for back in range(n_chunks):
        i = n_chunks - 1 - back
        chunk = (first_chunk + i).to(tl.int64)
        tl.store(dh_ptr + (chunk * H + h) * DK * DV + tile, dstate.to(dh_ptr.dtype.element_ty),
                 mask=tile_mask)
        n_valid = tl.minimum(length - i * C, C)
        valid = rc < n_valid
        token = (start + i * C + rc).to(tl.int64)
        q = tl.load(q_ptr + (token[:, None] * H + h) * DK + rk[None, :],
                    mask=valid[:, None] & (rk < DK)[None, :], other=0.0)  # [C, BK]
        do = tl.load(do_ptr + (token[:, None] * H + h) * DV + rv[None, :],
                     mask=valid[:, None] & (rv < DV)[None, :], other=0.0)  # [C, BV]
        q_xi = (q.to(tl.float32) * xi[:, None]).to(dtype)
        dstate = dstate * tl.exp(n_valid * log_gamma) + _mm(tl.trans(q_xi), do, IEEE)
    if STORE_DINIT:
        tl.store(dinit_ptr + pid_sh.to(tl.int64) * DK * DV + tile, dstate, mask=tile_mask)


@triton.jit
def _chunk_rows(chunks_ptr, n_chunks, C: tl.constexpr):
    """For the program's chunk (grid axis 1): (flat token of each row [C] int64, row valid
    mask [C], decay-mask exponents and causal mask [C, C], number of valid rows)."""
    chunk = tl.program_id(1)
    start = tl.load(chunks_ptr + chunk)
    n_valid = tl.load(chunks_ptr + n_chunks + chunk)
    rc = tl.arange(0, C)
    token = (start + rc).to(tl.int64)
    gap = rc[:, None] - rc[None, :]  # [C, C]: j - l
    return token, rc < n_valid, gap, n_valid


@triton.jit
def _output_kernel(q_ptr, k_ptr, v_ptr, h_ptr, o_ptr, log_decay_ptr, chunks_ptr, n_chunks,
                   H: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, C: tl.constexpr,
                   BK: tl.constexpr, BV: tl.constexpr, IEEE: tl.constexpr):
    """Grid (Dv / BV, N_chunks, H): O_i's [C, BV] tile = masked decayed scores @ V + the
    state's contribution, the scores and (Q * xi) h_i summed over Dk in BK blocks."""
    pid_v, h = tl.program_id(0), tl.program_id(2)
    chunk = tl.program_id(1).to(tl.int64)
    token, valid, gap, n_valid = _chunk_rows(chunks_ptr, n_chunks, C)
    log_gamma = tl.load(log_decay_ptr + h).to(tl.float32)
    rc = tl.arange(0, C)
    rv = pid_v * BV + tl.arange(0, BV)
    v_mask = valid[:, None] & (rv < DV)[None, :]
    dtype = q_ptr.dtype.element_ty
    xi = tl.exp((rc + 1) * log_gamma)

    scores = tl.zeros((C, C), dtype=tl.float32)
    acc = tl.zeros((C, BV), dtype=tl.float32)
    for kb in tl.static_range(0, DK, BK):
        rk = kb + tl.arange(0, BK)
        qk_mask = valid[:, None] & (rk < DK)[None, :]
        q = tl.load(q_ptr + (token[:, None] * H + h) * DK + rk[None, :], mask=qk_mask, other=0.0)
        k = tl.load(k_ptr + (token[:, None] * H + h) * DK + rk[None, :], mask=qk_mask, other=0.0)
        scores += _mm(q, tl.trans(k), IEEE)
        state = tl.load(h_ptr + ((chunk * H + h) * DK + rk[:, None]) * DV + rv[None, :],
                        mask=(rk < DK)[:, None] & (rv < DV)[None, :], other=0.0)  # [BK, BV]
        acc += _mm((q.to(tl.float32) * xi[:, None]).to(dtype), state.to(dtype), IEEE)
    decay = tl.where(gap >= 0, tl.exp(tl.maximum(gap, 0) * log_gamma), 0.0)  # D [C, C]
    v = tl.load(v_ptr + (token[:, None] * H + h) * DV + rv[None, :], mask=v_mask, other=0.0)
    acc += _mm((scores * decay).to(dtype), v, IEEE)
    tl.store(o_ptr + (token[:, None] * H + h) * DV + rv[None, :], acc.to(dtype), mask=v_mask)


@triton.jit
def _dq_dk_kernel(q_ptr, k_ptr, v_ptr, do_ptr, h_ptr, dh_ptr, dq_ptr, dk_ptr, log_decay_ptr,
                  chunks_ptr, n_chunks, H: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
                  C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, IEEE: tl.constexpr):
    """Grid (Dk / BK, N_chunks, H): dQ_i and dK_i for one BK block of channels, summing
    dO V^T, dO h^T and V dh^T over Dv in BV blocks."""
    pid_k, h = tl.program_id(0), tl.program_id(2)
    chunk = tl.program_id(1).to(tl.int64)
    token, valid, gap, n_valid = _chunk_rows(chunks_ptr, n_chunks, C)
    log_gamma = tl.load(log_decay_ptr + h).to(tl.float32)
    rc = tl.arange(0, C)
    rk = pid_k * BK + tl.arange(0, BK)
    k_mask = valid[:, None] & (rk < DK)[None, :]
    dtype = q_ptr.dtype.element_ty

    d_scores = tl.zeros((C, C), dtype=tl.float32)  # dO V^T
    dq = tl.zeros((C, BK), dtype=tl.float32)
    dk = tl.zeros((C, BK), dtype=tl.float32)
    for vb in tl.static_range(0, DV, BV):
        rv = vb + tl.arange(0, BV)
        v_mask = valid[:, None] & (rv < DV)[None, :]
        state_at = ((chunk * H + h) * DK + rk[:, None]) * DV + rv[None, :]  # [BK, BV]
        state_mask = (rk < DK)[:, None] & (rv < DV)[None, :]
        do = tl.load(do_ptr + (token[:, None] * H + h) * DV + rv[None, :], mask=v_mask, other=0.0)
        v = tl.load(v_ptr + (token[:, None] * H + h) * DV + rv[None, :], mask=v_mask, other=0.0)
        state = tl.load(h_ptr + state_at, mask=state_mask, other=0.0).to(dtype)
        dstate = tl.load(dh_ptr + state_at, mask=state_mask, other=0.0).to(dtype)
        d_scores += _mm(do, tl.trans(v), IEEE)
        dq += _mm(do, tl.trans(state), IEEE)
        dk += _mm(v, tl.trans(dstate), IEEE)
    xi = tl.exp((rc + 1) * log_gamma)
    zeta = tl.where(valid, tl.exp(tl.maximum(n_valid - 1 - rc, 0) * log_gamma), 0.0)
    decay = tl.where(gap >= 0, tl.exp(tl.maximum(gap, 0) * log_gamma), 0.0)
    d_scores = (d_scores * decay).to(dtype)  # [C, C]
    q = tl.load(q_ptr + (token[:, None] * H + h) * DK + rk[None, :], mask=k_mask, other=0.0)
    k = tl.load(k_ptr + (token[:, None] * H + h) * DK + rk[None, :], mask=k_mask, other=0.0)
    dq = dq * xi[:, None] + _mm(d_scores, k, IEEE)
    dk = dk * zeta[:, None] + _mm(tl.trans(d_scores), q, IEEE)
    at = (token[:, None] * H + h) * DK + rk[None, :]
    tl.store(dq_ptr + at, dq.to(dtype), mask=k_mask)
    tl.store(dk_ptr + at, dk.to(dtype), mask=k_mask)


@triton.jit
def _dv_kernel(q_ptr, k_ptr, do_ptr, dh_ptr, dv_ptr, log_decay_ptr, chunks_ptr, n_chunks,
               H: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, C: tl.constexpr,
               BK: tl.constexpr, BV: tl.constexpr, IEEE: tl.constexpr):
    """Grid (Dv / BV, N_chunks, H): dV_i for one BV block, the scores Q K^T and
    (K * zeta) dh_i summed over Dk in BK blocks."""
    pid_v, h = tl.program_id(0), tl.program_id(2)
    chunk = tl.program_id(1).to(tl.int64)
    token, valid, gap, n_valid = _chunk_rows(chunks_ptr, n_chunks, C)
    log_gamma = tl.load(log_decay_ptr + h).to(tl.float32)
    rc = tl.arange(0, C)
    rv = pid_v * BV + tl.arange(0, BV)
    v_mask = valid[:, None] & (rv < DV)[None, :]
    dtype = q_ptr.dtype.element_ty
    zeta = tl.where(valid, tl.exp(tl.maximum(n_valid - 1 - rc, 0) * log_gamma), 0.0)

    scores = tl.zeros((C, C), dtype=tl.float32)
    dv = tl.zeros((C, BV), dtype=tl.float32)
    for kb in tl.static_range(0, DK, BK):
        rk = kb + tl.arange(0, BK)
        qk_mask = valid[:, None] & (rk < DK)[None, :]
        q = tl.load(q_ptr + (token[:, None] * H + h) * DK + rk[None, :], mask=qk_mask, other=0.0)
        k = tl.load(k_ptr + (token[:, None] * H + h) * DK + rk[None, :], mask=qk_mask, other=0.0)
        dstate = tl.load(dh_ptr + ((chunk * H + h) * DK + rk[:, None]) * DV + rv[None, :],
                         mask=(rk < DK)[:, None] & (rv < DV)[None, :], other=0.0)
        scores += _mm(q, tl.trans(k), IEEE)
        dv += _mm((k.to(tl.float32) * zeta[:, None]).to(dtype), dstate.to(dtype), IEEE)
    decay = tl.where(gap >= 0, tl.exp(tl.maximum(gap, 0) * log_gamma), 0.0)
    do = tl.load(do_ptr + (token[:, None] * H + h) * DV + rv[None, :], mask=v_mask, other=0.0)
    dv += _mm(tl.trans((scores * decay).to(dtype)), do, IEEE)
    tl.store(dv_ptr + (token[:, None] * H + h) * DV + rv[None, :], dv.to(dtype), mask=v_mask)
