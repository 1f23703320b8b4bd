"""Triton kernels for chunked linear attention with a scalar decay per token and head: one
sequential scan over chunks (the state forward, its gradient in reverse) and three kernels
parallel over chunks (the output, dq/dk with the decay's gradient, dv).

Per sequence and v-head, with g_t <= 0 the log decay of step t, the state S [Dk, Dv] and
output follow S_t = exp(g_t) S_{t-1} + k_t^T v_t and o_t = q_t S_t. Retention is g_t =
log gamma_h; Mamba-2's SSD is q = C, k = B, v = dt x, g = dt A (stripes.kernels.retention
and stripes.kernels.ssd map their arguments onto these).

Notation for chunk i of L_i <= C tokens, row j in [0, C), b_j = g_0 + ... + g_j (the decay
accumulated inside the chunk, inclusive; padded rows have g = 0), b_L = b at the last row:
    xi_j   = exp(b_j)                 a token's read of the state that entered its chunk
    zeta_j = exp(b_L - b_j)           a token's write into the state that leaves its chunk
    D[j, l] = exp(b_j - b_l) for l <= j, else 0
    h_i    = the state entering chunk i [Dk, Dv], h_0 = the initial state (or 0)
    h_{i+1} = exp(b_L) h_i + (K_i * zeta)^T V_i                            (_scan_kernel)
    O_i     = ((Q_i K_i^T) * D) V_i + (Q_i * xi) h_i                       (_output_kernel)
Backward, with dh_i the gradient of the state LEAVING chunk i (entering i + 1; for the last
chunk the final state's gradient, or 0):
    dh_{i-1} = exp(b_L) dh_i + (Q_i * xi)^T dO_i                  (_scan_kernel, REVERSE)
    dQ_i = ((dO_i V_i^T) * D) K_i + xi * (dO_i h_i^T)                      (_dq_dk_kernel)
    dK_i = ((dO_i V_i^T) * D)^T Q_i + zeta * (V_i dh_i^T)                  (_dq_dk_kernel)
    dV_i = ((Q_i K_i^T) * D)^T dO_i + (K_i * zeta) dh_i                    (_dv_kernel)
and the initial state's gradient is what the backward scan carries past the first chunk.
The decay's gradient: g_r enters every factor that spans step r, so dL/dg_r sums, per
chunk, the in-chunk pairs that straddle r, the reads of the entering state at or after r,
the writes to the leaving state before r, and the entering state carried through the chunk
(_decay_grad). Every term is computed directly: the shorter form dL/dB_t = q_t . dq_t -
k_t . dk_t with a reverse sum over the sequence cancels large terms in float32 under strong
decays. The chunk's states carry everything outside it, the initial and final states
included, so nothing is summed across chunks.

Grouped q/k (Mamba-2's B/C groups): q, k have HK heads and v-head h reads q/k head
h // (H / HK). Layout: q, k [N_tok, HK, Dk], v, o [N_tok, H, Dv], g [N_tok, H] float32, all
contiguous, N_tok = B * T flat tokens; a sequence is a span of flat tokens (a row of the
batch, or a packed document) and chunks never cross sequences. Tables (int32, on the
device): seqs [3, S] = first token, length, first global chunk; chunks [2, N_chunks] = first
token, length. States h and dh: [N_chunks, H, Dk, Dv] in the inputs' dtype: the scans
accumulate in float32 registers and every stored state only feeds a matmul, whose operands
are in the inputs' dtype anyway (bf16/fp16: tensor cores; float32: full-precision "ieee"
dots). The initial and final states and their gradients are float32 in memory.
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
def _chunk_decays(g_ptr, token, valid, h, H: tl.constexpr):
    """(b [C]: the decay accumulated through each row, b_L: through the whole chunk)."""
    g = tl.load(g_ptr + token * H + h, mask=valid, other=0.0).to(tl.float32)
    return tl.cumsum(g, axis=0), tl.sum(g, axis=0)


@triton.jit
def _causal_decay(b, C: tl.constexpr):
    """D [C, C] = exp(b_j - b_l) below and on the diagonal, 0 above (never exp of a positive
    number: the masked exponent is -inf)."""
    rc = tl.arange(0, C)
    causal = rc[:, None] >= rc[None, :]
    return tl.exp(tl.where(causal, b[:, None] - b[None, :], float("-inf")))


@triton.jit
def _sequence(seqs_ptr, S, s):
    """(first flat token, length, first global chunk) of sequence s."""
    return (tl.load(seqs_ptr + s), tl.load(seqs_ptr + S + s), tl.load(seqs_ptr + 2 * S + s))


@triton.jit
def _split_axis0(N_INNER: tl.constexpr):
    """Grid axis 0 is (outer index x N_INNER + inner index): (outer, inner). The programs
    that share an outer index (a chunk, or a sequence and head) and so read the same tokens
    run next to each other and find them in L2; axis 0 alone may pass 65,535 programs."""
    pid = tl.program_id(0)
    return pid // N_INNER, pid % N_INNER


@triton.jit
def _chunk(chunks_ptr, chunk, n_chunks, C: tl.constexpr):
    """(the chunk's index as int64, flat token of each row [C] int64, row valid mask [C])."""
    start = tl.load(chunks_ptr + chunk)
    n_valid = tl.load(chunks_ptr + n_chunks + chunk)
    rc = tl.arange(0, C)
    return chunk.to(tl.int64), (start + rc).to(tl.int64), rc < n_valid


@triton.jit
def _scan_kernel(a_ptr, c_ptr, g_ptr, states_ptr, first_ptr, last_ptr, seqs_ptr, S,
                 H: tl.constexpr, HK: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
                 C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                 HAS_FIRST: tl.constexpr, STORE_LAST: tl.constexpr, REVERSE: tl.constexpr,
                 IEEE: tl.constexpr):
    """Grid (S * H * Dk / BK * Dv / BV,): one [BK, BV] tile of one head's state walks its
    sequence's chunks, storing the tile before each chunk's update
        X <- exp(b_L) X + (A_i * w)^T Y_i.
    Forward, the state: A = K, w = zeta, Y = V, in
    chunk order; `states` gets h_i, `first` is the initial state and `last` the final one.
    REVERSE, its gradient: A = Q, w = xi, Y = dO, last chunk first; `states` gets dh_i,
    `first` is the final state's gradient and `last` the initial state's."""
    NV: tl.constexpr = (DV + BV - 1) // BV
    pid_sh, tile_id = _split_axis0((DK + BK - 1) // BK * NV)
    pid_k, pid_v = tile_id // NV, tile_id % NV
    s, h = pid_sh // H, pid_sh % H
    hk = h // (H // HK)
    start, length, first_chunk = _sequence(seqs_ptr, S, s)
    rk = pid_k * BK + tl.arange(0, BK)  # [BK]
    rv = pid_v * BV + tl.arange(0, BV)  # [BV]
    rc = tl.arange(0, C)  # [C]
    tile = rk[:, None] * DV + rv[None, :]  # [BK, BV] offsets inside one [Dk, Dv] state
    tile_mask = (rk < DK)[:, None] & (rv < DV)[None, :]
    dtype = a_ptr.dtype.element_ty

    state = tl.zeros((BK, BV), dtype=tl.float32)
    if HAS_FIRST:
        state = tl.load(first_ptr + pid_sh.to(tl.int64) * DK * DV + tile, mask=tile_mask,
                        other=0.0).to(tl.float32)
    n_chunks = tl.cdiv(length, C)
    for step in range(n_chunks):
        i = n_chunks - 1 - step if REVERSE else step
        chunk = (first_chunk + i).to(tl.int64)
        tl.store(states_ptr + (chunk * H + h) * DK * DV + tile,
                 state.to(states_ptr.dtype.element_ty), mask=tile_mask)
        valid = rc < length - i * C  # [C]
        token = (start + i * C + rc).to(tl.int64)  # [C]
        b, b_last = _chunk_decays(g_ptr, token, valid, h, H)
        a = tl.load(a_ptr + (token[:, None] * HK + hk) * DK + rk[None, :],
                    mask=valid[:, None] & (rk < DK)[None, :], other=0.0)  # [C, BK]
        y = tl.load(c_ptr + (token[:, None] * H + h) * DV + rv[None, :],
                    mask=valid[:, None] & (rv < DV)[None, :], other=0.0)  # [C, BV]
        w = tl.exp(b) if REVERSE else tl.where(valid, tl.exp(b_last - b), 0.0)  # xi, zeta
        weighted = (a.to(tl.float32) * w[:, None]).to(dtype)
        state = state * tl.exp(b_last) + _mm(tl.trans(weighted), y, IEEE)
    if STORE_LAST:
        tl.store(last_ptr + pid_sh.to(tl.int64) * DK * DV + tile, state, mask=tile_mask)


@triton.jit
def _v_block(chunks_ptr, n_chunks, g_ptr, H: tl.constexpr, HK: tl.constexpr,
             DV: tl.constexpr, C: tl.constexpr, BV: tl.constexpr):
    """The program of a grid (N_chunks * Dv / BV, H) over one chunk, v-head and BV block of
    Dv: (chunk, token [C], valid [C], h, hk, b [C], b_L, rv [BV], v_mask [C, BV])."""
    chunk_id, pid_v = _split_axis0((DV + BV - 1) // BV)
    h = tl.program_id(1)
    chunk, token, valid = _chunk(chunks_ptr, chunk_id, n_chunks, C)
    b, b_last = _chunk_decays(g_ptr, token, valid, h, H)
    rv = pid_v * BV + tl.arange(0, BV)
    return (chunk, token, valid, h, h // (H // HK), b, b_last, rv,
            valid[:, None] & (rv < DV)[None, :])


@triton.jit
def _output_kernel(q_ptr, k_ptr, v_ptr, g_ptr, h_ptr, o_ptr, chunks_ptr, n_chunks,
                   H: tl.constexpr, HK: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
                   C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, IEEE: tl.constexpr):
    """Grid (N_chunks * Dv / BV, H): O_i's [C, BV] tile = masked decayed scores @ V + the
    state's contribution, the scores and (Q * xi) h_i summed over Dk in BK blocks."""
    chunk, token, valid, h, hk, b, _, rv, v_mask = _v_block(chunks_ptr, n_chunks, g_ptr, H, HK,
                                                            DV, C, BV)
    dtype = q_ptr.dtype.element_ty
    xi = tl.exp(b)

    scores = tl.zeros((C, C), dtype=tl.float32)
    acc = tl.zeros((C, BV), dtype=tl.float32)
    for kb in tl.static_range(0, DK, BK):
        rk = kb + tl.arange(0, BK)
        qk_mask = valid[:, None] & (rk < DK)[None, :]
        qk_at = (token[:, None] * HK + hk) * DK + rk[None, :]
        q = tl.load(q_ptr + qk_at, mask=qk_mask, other=0.0)  # [C, BK]
        k = tl.load(k_ptr + qk_at, mask=qk_mask, other=0.0)
        scores += _mm(q, tl.trans(k), IEEE)
        state = tl.load(h_ptr + ((chunk * H + h) * DK + rk[:, None]) * DV + rv[None, :],
                        mask=(rk < DK)[:, None] & (rv < DV)[None, :], other=0.0)  # [BK, BV]
        acc += _mm((q.to(tl.float32) * xi[:, None]).to(dtype), state.to(dtype), IEEE)
    v = tl.load(v_ptr + (token[:, None] * H + h) * DV + rv[None, :], mask=v_mask, other=0.0)
    acc += _mm((scores * _causal_decay(b, C)).to(dtype), v, IEEE)
    tl.store(o_ptr + (token[:, None] * H + h) * DV + rv[None, :], acc.to(dtype), mask=v_mask)


@triton.jit
def _decay_grad(pairs, xi, zeta, b_last, q, k, dq_state, dk_state, state_dot, C: tl.constexpr):
    """dL/dg_r [C] for the chunk's rows, from this block of Dk (the blocks add up).

    g_r enters every decay factor that spans step r, so its gradient sums the terms whose
    factor spans it, each computed directly (no difference of large sums):
      pairs (i >= r > j) inside the chunk    pairs[i, j] = (dO_i . V_j)(Q_i . K_j) D[i, j]
      reads (i >= r) of the entering state   xi_i Q_i . (dO_i h^T)
      writes (j < r) to the leaving state    zeta_j K_j . (V_j dh^T)
      the entering state carried through     exp(b_L) <h, dh>

    Only the wanted terms are ever added: a sum formed as a difference of two running sums
    (an inclusive minus an exclusive one) would cancel under strong decays, where the large
    undecayed terms dwarf the decayed ones that make up the answer.
    """
    i = tl.arange(0, C)[:, None]  # [C, 1]: the row (query, or the summed index)
    r = tl.arange(0, C)[None, :]  # [1, C]: the step whose decay is differentiated
    strict = tl.where(i > r, pairs, 0.0)  # a pair (i, i) spans no step
    upto = tl.cumsum(strict, axis=1)  # [i, s] = sum over j <= s of pairs[i, j]
    span_after = tl.sum(tl.where(i >= r + 1, upto, 0.0), axis=0)  # [s]: i > s >= j
    spanning = tl.sum(tl.where(i == r - 1, span_after[:, None], 0.0), axis=0)  # [r] = [r - 1]
    reads = xi * tl.sum(q.to(tl.float32) * dq_state, axis=1)  # [C]
    writes = zeta * tl.sum(k.to(tl.float32) * dk_state, axis=1)
    reads_after = tl.sum(tl.where(i >= r, reads[:, None], 0.0), axis=0)  # i >= r
    writes_before = tl.sum(tl.where(i < r, writes[:, None], 0.0), axis=0)  # j < r
    return spanning + reads_after + writes_before + tl.exp(b_last) * state_dot


@triton.jit
def _dq_dk_kernel(q_ptr, k_ptr, v_ptr, g_ptr, do_ptr, h_ptr, dh_ptr, dq_ptr, dk_ptr, db_ptr,
                  chunks_ptr, n_chunks, n_tok, H: tl.constexpr, HK: tl.constexpr,
                  DK: tl.constexpr, DV: tl.constexpr, C: tl.constexpr, BK: tl.constexpr,
                  BV: tl.constexpr, SPLIT: tl.constexpr, STORE_DB: tl.constexpr,
                  IEEE: tl.constexpr):
    """Grid (N_chunks * Dk / BK, HK * SPLIT): dQ_i and dK_i of one q/k head for one BK block
    of channels, summed over the v-heads that read it (each summing dO V^T, dO h^T and V dh^T
    over Dv in BV blocks); STORE_DB: also each v-head's dL/dg over this block of channels
    (see _decay_grad). SPLIT > 1 shares a q/k head's v-heads among SPLIT programs (Mamba-2's
    one group feeds every head), each storing its part of the sum at dq/dk[part]
    ([SPLIT, N_tok, HK, Dk], summed by the caller: the same order every run)."""
    chunk_id, pid_k = _split_axis0((DK + BK - 1) // BK)
    hk, part = tl.program_id(1) // SPLIT, tl.program_id(1) % SPLIT
    HEADS: tl.constexpr = H // HK // SPLIT
    chunk, token, valid = _chunk(chunks_ptr, chunk_id, n_chunks, C)
    rk = pid_k * BK + tl.arange(0, BK)
    k_mask = valid[:, None] & (rk < DK)[None, :]
    qk_at = (token[:, None] * HK + hk) * DK + rk[None, :]
    q = tl.load(q_ptr + qk_at, mask=k_mask, other=0.0)  # [C, BK]
    k = tl.load(k_ptr + qk_at, mask=k_mask, other=0.0)
    dtype = q_ptr.dtype.element_ty
    dq = tl.zeros((C, BK), dtype=tl.float32)
    dk = tl.zeros((C, BK), dtype=tl.float32)
    for j in range(HEADS):  # this program's share of the v-heads of this q/k head
        h = hk * (H // HK) + part * HEADS + j
        b, b_last = _chunk_decays(g_ptr, token, valid, h, H)
        d_scores = tl.zeros((C, C), dtype=tl.float32)  # dO V^T
        dq_state = tl.zeros((C, BK), dtype=tl.float32)
        dk_state = tl.zeros((C, BK), dtype=tl.float32)
        state_dot = 0.0  # <h_i, dh_i> over this block of Dk
        for vb in tl.static_range(0, DV, BV):
            rv = vb + tl.arange(0, BV)
            v_mask = valid[:, None] & (rv < DV)[None, :]
            state_at = ((chunk * H + h) * DK + rk[:, None]) * DV + rv[None, :]  # [BK, BV]
            state_mask = (rk < DK)[:, None] & (rv < DV)[None, :]
            do = tl.load(do_ptr + (token[:, None] * H + h) * DV + rv[None, :], mask=v_mask,
                         other=0.0)
            v = tl.load(v_ptr + (token[:, None] * H + h) * DV + rv[None, :], mask=v_mask,
                        other=0.0)
            state = tl.load(h_ptr + state_at, mask=state_mask, other=0.0)
            dstate = tl.load(dh_ptr + state_at, mask=state_mask, other=0.0)
            if STORE_DB:
                state_dot += tl.sum(state.to(tl.float32) * dstate.to(tl.float32))
            state, dstate = state.to(dtype), dstate.to(dtype)
            d_scores += _mm(do, tl.trans(v), IEEE)
            dq_state += _mm(do, tl.trans(state), IEEE)
            dk_state += _mm(v, tl.trans(dstate), IEEE)
        zeta = tl.where(valid, tl.exp(b_last - b), 0.0)
        xi = tl.exp(b)
        d_scores = d_scores * _causal_decay(b, C)  # [C, C], float32
        if STORE_DB:
            dg = _decay_grad(d_scores * _mm(q, tl.trans(k), IEEE), xi, zeta, b_last, q, k,
                             dq_state, dk_state, state_dot, C)
            tl.store(db_ptr + (pid_k * n_tok + token) * H + h, dg, mask=valid)
        d_scores = d_scores.to(dtype)
        dq += dq_state * xi[:, None] + _mm(d_scores, k, IEEE)
        dk += dk_state * zeta[:, None] + _mm(tl.trans(d_scores), q, IEEE)
    out_at = part.to(tl.int64) * n_tok * HK * DK + qk_at
    tl.store(dq_ptr + out_at, dq.to(dq_ptr.dtype.element_ty), mask=k_mask)
    tl.store(dk_ptr + out_at, dk.to(dk_ptr.dtype.element_ty), mask=k_mask)


@triton.jit
def _dv_kernel(q_ptr, k_ptr, g_ptr, do_ptr, dh_ptr, dv_ptr, chunks_ptr, n_chunks,
               H: tl.constexpr, HK: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
               C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, IEEE: tl.constexpr):
    """Grid (N_chunks * Dv / BV, H): dV_i for one BV block, the scores Q K^T and
    (K * zeta) dh_i summed over Dk in BK blocks."""
    chunk, token, valid, h, hk, b, b_last, rv, v_mask = _v_block(chunks_ptr, n_chunks, g_ptr,
                                                                 H, HK, DV, C, BV)
    dtype = q_ptr.dtype.element_ty
    zeta = tl.where(valid, tl.exp(b_last - b), 0.0)

    scores = tl.zeros((C, C), dtype=tl.float32)
    dv = tl.zeros((C, BV), dtype=tl.float32)
    for kb in tl.static_range(0, DK, BK):
        rk = kb + tl.arange(0, BK)
        qk_mask = valid[:, None] & (rk < DK)[None, :]
        qk_at = (token[:, None] * HK + hk) * DK + rk[None, :]
        q = tl.load(q_ptr + qk_at, mask=qk_mask, other=0.0)
        k = tl.load(k_ptr + qk_at, mask=qk_mask, other=0.0)
        dstate = tl.load(dh_ptr + ((chunk * H + h) * DK + rk[:, None]) * DV + rv[None, :],
                         mask=(rk < DK)[:, None] & (rv < DV)[None, :], other=0.0)
        scores += _mm(q, tl.trans(k), IEEE)
        dv += _mm((k.to(tl.float32) * zeta[:, None]).to(dtype), dstate.to(dtype), IEEE)
    do = tl.load(do_ptr + (token[:, None] * H + h) * DV + rv[None, :], mask=v_mask, other=0.0)
    dv += _mm(tl.trans((scores * _causal_decay(b, C)).to(dtype)), do, IEEE)
    tl.store(dv_ptr + (token[:, None] * H + h) * DV + rv[None, :], dv.to(dtype), mask=v_mask)
