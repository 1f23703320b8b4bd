"""Triton kernels for the gated modal convolution (reference.py has the formula): the
recurrence s[t] = p s[t-1] + k[t] v[t], y[t] = Re(sum_n R_n s_n[t]), out = q y, walked by
segments of time.

Work split: a program (one warp) owns BC channels (all N modes of each, BC x N complex
states in registers, a lane a channel; more lanes a channel and fewer channels where
N > 16) over one segment of SEG tokens of one batch row. It loads TB tokens at once
([BC, TB] tiles, a channel's tokens in its own lane's registers) and walks them from
registers, fetching the next tile before walking this one (_fetch), so a load's latency
overlaps the walk, and the per-token sums over modes stay inside a lane: no shuffle, no
barrier. (With 4-warp
programs, each lane a few modes of a channel, every token took a load's latency, four
rounds of shuffles and a barrier: about 2.2x slower on an H100.)
Segments run in parallel; what crosses a segment boundary is the state, passed in three
launches, as the chunked scans of SSD and retention do:
    1. each segment's end state from a zero start                        (local)
    2. per (channel, mode), a scan over segments: S_(k+1) = p^SEG S_k + local_k (passing)
    3. each segment again from its entering state S_k, writing out = q y    (output)
Memory traffic is q, k, v read and out written once, plus B x segments x C x N states:
no filter [C, T], no FFT, no float32 copy of the activations.

Backward, with g = dout q (the gradient of y) and the adjoint b[t] = g[t] + p b[t+1] (a
reverse scan, since y[t] depends on u[j <= t] through p^(t-j)):
    dq = dout y,  du[t] = Re sum_n R_n b_n[t],  dk = du v,  dv = du k
    dL/dR_re = sum_t g s_re,   dL/dR_im = -sum_t g s_im
    dL/drate = Re(-p R W),     dL/dtheta = Re(i p R W),   W = sum_t u[t] b'[t]
where b' = db/dp obeys b'[t] = b[t+1] + p b'[t+1] (b is holomorphic in p; dp/drate = -p,
dp/dtheta = i p; W is also sum_t g ds/dp, as both are d/dp of sum_t g s = sum_t u b). The
pair (b, b') is again a linear recurrence, with the Jordan block [[p, 0], [1, p]], whose
power over a segment is [[p^L, 0], [L p^(L-1), p^L]]. So backward keeps the forward's
segment-entering states (B x segments x C x N complex, a few MB) and runs: the local
(b, b') at each segment's first token from a zero start at its end, passed across segments
in reverse, then one pass per segment that walks forward from the saved state for dq and
sum g s, and back from the passed adjoints for du and W. Each walk carries at most two
complex states a mode besides its sums. The parameter sums are written per (row, segment)
and added by torch (deterministic: no atomics).

Packed documents (positions, the steps since each token's document start): where a document
starts the state carried in is dropped (s[t] = u[t]), and the adjoint pair does not reach
back across it (b[t-1] = g[t-1], b'[t-1] = 0); a segment passes its entering state on only
if no document starts inside it. Prefill passes a carried state in (the passing scan starts
from it) and takes the state after the last token out. All arithmetic is float32; modes
past N get p = 0 and R = 0, so they add nothing.
"""

from __future__ import annotations

import triton
import triton.language as tl

from stripes.kernels.modal_filter.kernel import _power

BC = 32  # channels per program: a lane each, holding all of the channel's modes ...
MODES_PER_LANE = 16  # ... up to this many; more modes spread a channel over more lanes
TB = 4  # tokens per load: the tile walked from registers (bench/modal_conv_sweep.py)
WARPS = 1  # a program is one warp (see the docstring)
PASS_BLOCK = 256  # (channel, mode) lanes per program of the passing scans


@triton.jit
def _param_lanes(lanes, N, CPG):
    """Channel lanes c N + n -> their filter's lanes (c // CPG) N + n."""
    return lanes // N // CPG * N + lanes % N


@triton.jit
def _poles(rate_ptr, theta_ptr, lanes, mask):
    """p = exp(-rate + i theta) as (real, imag) at parameter `lanes`, 0 where masked."""
    rate = tl.load(rate_ptr + lanes, mask=mask, other=0.0)
    theta = tl.load(theta_ptr + lanes, mask=mask, other=0.0)
    e = tl.where(mask, tl.exp(-rate), 0.0)
    return e * tl.cos(theta), e * tl.sin(theta)


@triton.jit
def _decay_add(xr, xi, wr, wi, keep, ar, ai):
    """keep (w x) + a for complex x, w, a as (real, imag) and a 0/1 factor `keep`: a state
    passed across a segment, f p^SEG S + local."""
    return keep * (wr * xr - wi * xi) + ar, keep * (wr * xi + wi * xr) + ai


@triton.jit
def _scan_step(sr, si, pr, pi, keep, u):
    """s = keep (p s) + u: one token of the recurrence, u [BC] real."""
    return keep * (pr * sr - pi * si) + u[:, None], keep * (pr * si + pi * sr)


@triton.jit
def _span(seg, i0, SEG, rows, c_ok, TB: tl.constexpr):
    """Tokens i0 .. i0 + TB - 1 of segment seg (i0 < 0 in a reverse walk's last block):
    their positions in the row t [TB], their columns j [TB] = 0 .. TB - 1 of a tile, and the
    tile's mask [BC, TB] (channel and token in range)."""
    j = tl.arange(0, TB)
    ok = c_ok[:, None] & ((i0 + j >= 0) & (i0 + j < rows))[None, :]
    return seg * SEG + i0 + j, j, ok


@triton.jit
def _block(pos_ptr, b, seg, i0, SEG, rows, T, c_ok, TB: tl.constexpr, HAS_POS: tl.constexpr):
    """_span's t, j and mask, and whether no document starts among the tokens in range
    (_plain)."""
    t, j, ok = _span(seg, i0, SEG, rows, c_ok, TB)
    first, end = tl.maximum(i0, 0), tl.minimum(i0 + TB, rows)
    return t, j, ok, _plain(pos_ptr, b, seg * SEG + first, end - first, T, HAS_POS)


@triton.jit
def _fetch(ptr, b, seg, i0, SEG, rows, c, c_ok, sb, st, TB: tl.constexpr):
    """[BC, TB] in ptr's dtype: channels c of the tokens i0 .. i0 + TB - 1 of segment seg
    (zero outside it) of a [B, T, C] tensor with strides (sb, st, 1). One load for TB tokens
    keeps TB rows in flight (walked one load per token, a program waited out a memory
    latency per token), and the walks fetch the next tile before walking this one, so the
    load's latency overlaps the walk: nothing converts or uses the tile until then."""
    t, _, ok = _span(seg, i0, SEG, rows, c_ok, TB)
    at = ptr + b.to(tl.int64) * sb + t[None, :].to(tl.int64) * st + c[:, None]
    return tl.load(at, mask=ok, other=0.0)


@triton.jit
def _f32(tile):
    return tile.to(tl.float32)


@triton.jit
def _store_tokens(ptr, b, t, c, T, C, value, ok):
    """A [BC, TB] tile into a contiguous [B, T, C] output."""
    at = ptr + (b.to(tl.int64) * T + t[None, :]) * C + c[:, None]
    tl.store(at, value.to(ptr.dtype.element_ty), mask=ok)


@triton.jit
def _col(tile, j, jj):
    """[BC]: column jj of a [BC, TB] tile. A channel's tokens lie in its own lanes'
    registers (the layout the tile's loads get: channels across lanes), so this compiles to
    register selects, plus a shuffle where a channel spans lanes (N > 16)."""
    return tl.sum(tl.where(j[None, :] == jj, tile, 0.0), axis=1)


@triton.jit
def _put(tile, j, jj, value):
    """The tile with column jj set to value [BC]."""
    return tl.where(j[None, :] == jj, value[:, None], tile)


@triton.jit
def _states_at(ptr, b, seg, n_seg, part, n_parts, lanes, C, N):
    """Pointers into a [B, n_seg, n_parts, C, N] float32 state buffer."""
    return ptr + ((b.to(tl.int64) * n_seg + seg) * n_parts + part) * C * N + lanes


@triton.jit
def _tile(pid_c, N, C, CPG, BC: tl.constexpr, BN: tl.constexpr):
    """This program's channels c [BC]; their state lanes c N + n and their filters' lanes
    (c // CPG) N + n, [BC, BN] each; masks."""
    c = pid_c * BC + tl.arange(0, BC)
    n = tl.arange(0, BN)
    c_ok = c < C
    mask = c_ok[:, None] & (n < N)[None, :]
    return c, c_ok, c[:, None] * N + n[None, :], (c // CPG)[:, None] * N + n[None, :], mask


@triton.jit
def _keep(pos_ptr, b, t, T, HAS_POS: tl.constexpr):
    """1.0 when token t continues the state of token t - 1, 0.0 where a document starts
    (pos[t] = 0) or past the sequence. Without positions each row is one document, whose
    first token keeps the state carried in (zero, or prefill's)."""
    if HAS_POS:
        pos = tl.load(pos_ptr + b.to(tl.int64) * T + t, mask=t < T, other=0)
        keep = tl.where(pos > 0, 1.0, 0.0)
    else:
        keep = tl.where(t < T, 1.0, 0.0)
    return keep


@triton.jit
def _carried(pos_ptr, b, t, L, T, HAS_POS: tl.constexpr):
    """1.0 when a state survives the L tokens that end at token t (no document starts among
    them: pos[t] >= L), else 0.0; always 1.0 without positions."""
    if HAS_POS:
        pos = tl.load(pos_ptr + b.to(tl.int64) * T + t, mask=t < T, other=0)
        return tl.where(pos >= L, 1.0, 0.0)
    return 1.0


@triton.jit
def _plain(pos_ptr, b, t, n, T, HAS_POS: tl.constexpr):
    """True when no document starts among the n tokens t .. t + n - 1 (nor at t): their
    keep factors are all 1, and _keep_in need not load them. Read off the last token's
    position, which counts the steps since its document's start (as _carried does)."""
    return _carried(pos_ptr, b, t + n - 1, n, T, HAS_POS) > 0


@triton.jit
def _keep_in(pos_ptr, b, t, T, plain, HAS_POS: tl.constexpr):
    """_keep of token t inside a tile, loaded only where the tile is not plain (documents
    are long against a tile, so most tiles are)."""
    keep = tl.full((), 1.0, tl.float32)
    if not plain:  # never without positions: plain is then the constant True
        keep = _keep(pos_ptr, b, t, T, HAS_POS)
    return keep


# -- forward ----------------------------------------------------------------------------------
@triton.jit
def _local_fwd(k_ptr, v_ptr, pos_ptr, rate_ptr, theta_ptr, state_ptr, T, C, N, CPG, SEG,
               n_seg, skb, skt, svb, svt, HAS_V: tl.constexpr, HAS_POS: tl.constexpr,
               BC: tl.constexpr, BN: tl.constexpr, TB: tl.constexpr):
    """Each segment's end state from a zero start -> state[b, seg, 0:2]."""
    seg, pid_c, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    c, c_ok, lanes, plane, mask = _tile(pid_c, N, C, CPG, BC, BN)
    pr, pi = _poles(rate_ptr, theta_ptr, plane, mask)
    sr = tl.zeros((BC, BN), tl.float32)
    si = tl.zeros((BC, BN), tl.float32)
    rows = tl.minimum(SEG, T - seg * SEG)  # the last segment may be short
    k_next = _fetch(k_ptr, b, seg, 0, SEG, rows, c, c_ok, skb, skt, TB)
    # Without v (prefill) its loads are masked off whole: no memory is read.
    v_next = _fetch(v_ptr, b, seg, 0, SEG, rows, c, c_ok & HAS_V, svb, svt, TB)
    for i0 in range(0, rows, TB):
        t, j, ok, plain = _block(pos_ptr, b, seg, i0, SEG, rows, T, c_ok, TB, HAS_POS)
        u = _f32(k_next) * _f32(v_next) if HAS_V else _f32(k_next)
        k_next = _fetch(k_ptr, b, seg, i0 + TB, SEG, rows, c, c_ok, skb, skt, TB)
        v_next = _fetch(v_ptr, b, seg, i0 + TB, SEG, rows, c, c_ok & HAS_V, svb, svt, TB)
        for jj in tl.static_range(TB):
            if i0 + jj < rows:
                keep = _keep_in(pos_ptr, b, seg * SEG + i0 + jj, T, plain, HAS_POS)
                sr, si = _scan_step(sr, si, pr, pi, keep, _col(u, j, jj))
    tl.store(_states_at(state_ptr, b, seg, n_seg, 0, 2, lanes, C, N), sr, mask=mask)
    tl.store(_states_at(state_ptr, b, seg, n_seg, 1, 2, lanes, C, N), si, mask=mask)


@triton.jit
def _pass_fwd(rate_ptr, theta_ptr, state_ptr, init_ptr, final_ptr, pos_ptr, T, C, N, CPG,
              SEG, n_seg, HAS_INIT: tl.constexpr, HAS_FINAL: tl.constexpr,
              HAS_POS: tl.constexpr, BLOCK: tl.constexpr):
    """In place over state[b]: each segment's local end state becomes its entering state,
    starting from init[b] ([C, N] complex as (real, imag) pairs) or zero; the state after
    the last token goes to final[b] (same layout)."""
    pid, b = tl.program_id(0), tl.program_id(1)
    lanes = pid * BLOCK + tl.arange(0, BLOCK)
    ok = lanes < C * N
    rate = tl.load(rate_ptr + _param_lanes(lanes, N, CPG), mask=ok, other=0.0)
    theta = tl.load(theta_ptr + _param_lanes(lanes, N, CPG), mask=ok, other=0.0)
    pairs = (b.to(tl.int64) * C * N + lanes) * 2
    if HAS_INIT:
        sr = tl.load(init_ptr + pairs, mask=ok, other=0.0)
        si = tl.load(init_ptr + pairs + 1, mask=ok, other=0.0)
    else:
        sr = tl.zeros((BLOCK,), tl.float32)
        si = tl.zeros((BLOCK,), tl.float32)
    wr, wi = _power(rate, theta, SEG * 1.0)  # p^SEG
    for seg in range(n_seg):
        at_r = _states_at(state_ptr, b, seg, n_seg, 0, 2, lanes, C, N)
        at_i = _states_at(state_ptr, b, seg, n_seg, 1, 2, lanes, C, N)
        lr = tl.load(at_r, mask=ok, other=0.0)
        li = tl.load(at_i, mask=ok, other=0.0)
        tl.store(at_r, sr, mask=ok)
        tl.store(at_i, si, mask=ok)
        rows = tl.minimum(SEG, T - seg * SEG)
        if seg == n_seg - 1:  # the last segment may be short
            wr, wi = _power(rate, theta, rows * 1.0)
        f = _carried(pos_ptr, b, seg * SEG + rows - 1, rows, T, HAS_POS)
        sr, si = _decay_add(sr, si, wr, wi, f, lr, li)
    if HAS_FINAL:
        tl.store(final_ptr + pairs, sr, mask=ok)
        tl.store(final_ptr + pairs + 1, si, mask=ok)


@triton.jit
def _output_fwd(q_ptr, k_ptr, v_ptr, pos_ptr, rate_ptr, theta_ptr, re_ptr, im_ptr, state_ptr,
                out_ptr, T, C, N, CPG, SEG, n_seg, sqb, sqt, skb, skt, svb, svt,
                HAS_Q: tl.constexpr, HAS_V: tl.constexpr, HAS_POS: tl.constexpr,
                BC: tl.constexpr, BN: tl.constexpr, TB: tl.constexpr):
    """out = q y (or y) over each segment, from its entering state."""
    seg, pid_c, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    c, c_ok, lanes, plane, mask = _tile(pid_c, N, C, CPG, BC, BN)
    pr, pi = _poles(rate_ptr, theta_ptr, plane, mask)
    rr = tl.load(re_ptr + plane, mask=mask, other=0.0)
    ri = tl.load(im_ptr + plane, mask=mask, other=0.0)
    sr = tl.load(_states_at(state_ptr, b, seg, n_seg, 0, 2, lanes, C, N), mask=mask, other=0.0)
    si = tl.load(_states_at(state_ptr, b, seg, n_seg, 1, 2, lanes, C, N), mask=mask, other=0.0)
    rows = tl.minimum(SEG, T - seg * SEG)
    q_next = _fetch(q_ptr, b, seg, 0, SEG, rows, c, c_ok & HAS_Q, sqb, sqt, TB)
    k_next = _fetch(k_ptr, b, seg, 0, SEG, rows, c, c_ok, skb, skt, TB)
    v_next = _fetch(v_ptr, b, seg, 0, SEG, rows, c, c_ok & HAS_V, svb, svt, TB)
    for i0 in range(0, rows, TB):
        t, j, ok, plain = _block(pos_ptr, b, seg, i0, SEG, rows, T, c_ok, TB, HAS_POS)
        u = _f32(k_next) * _f32(v_next) if HAS_V else _f32(k_next)
        q = q_next
        q_next = _fetch(q_ptr, b, seg, i0 + TB, SEG, rows, c, c_ok & HAS_Q, sqb, sqt, TB)
        k_next = _fetch(k_ptr, b, seg, i0 + TB, SEG, rows, c, c_ok, skb, skt, TB)
        v_next = _fetch(v_ptr, b, seg, i0 + TB, SEG, rows, c, c_ok & HAS_V, svb, svt, TB)
        y = tl.zeros((BC, TB), tl.float32)
        for jj in tl.static_range(TB):
            if i0 + jj < rows:
                keep = _keep_in(pos_ptr, b, seg * SEG + i0 + jj, T, plain, HAS_POS)
                sr, si = _scan_step(sr, si, pr, pi, keep, _col(u, j, jj))
                y = _put(y, j, jj, tl.sum(rr * sr - ri * si, axis=1))
        if HAS_Q:
            y *= _f32(q)
        _store_tokens(out_ptr, b, t, c, T, C, y, ok)


# -- backward ---------------------------------------------------------------------------------
@triton.jit
def _fetch_all(q_ptr, k_ptr, v_ptr, dout_ptr, b, seg, i0, SEG, rows, c, c_ok, sqb, sqt, skb,
               skt, svb, svt, sdb, sdt, TB: tl.constexpr):
    """_fetch of q, k, v and dout at the same tokens: what each walk of _grads_bwd reads."""
    return (_fetch(q_ptr, b, seg, i0, SEG, rows, c, c_ok, sqb, sqt, TB),
            _fetch(k_ptr, b, seg, i0, SEG, rows, c, c_ok, skb, skt, TB),
            _fetch(v_ptr, b, seg, i0, SEG, rows, c, c_ok, svb, svt, TB),
            _fetch(dout_ptr, b, seg, i0, SEG, rows, c, c_ok, sdb, sdt, TB))


@triton.jit
def _adjoint_step(br, bi, dr, di, pr, pi, keep_next, g):
    """Token t walked backwards, from the pair (b, b' = db/dp) at t + 1:
    b' = keep[t + 1] (p b' + b), then b = keep[t + 1] p b + g[t] (an adjoint does not reach
    back across a document start), g [BC]."""
    dr, di = keep_next * (pr * dr - pi * di + br), keep_next * (pr * di + pi * dr + bi)
    br, bi = _scan_step(br, bi, pr, pi, keep_next, g)
    return br, bi, dr, di


@triton.jit
def _local_bwd(q_ptr, dout_ptr, pos_ptr, rate_ptr, theta_ptr, rstate_ptr, T, C, N, CPG, SEG,
               n_seg, sqb, sqt, sdb, sdt, HAS_POS: tl.constexpr, BC: tl.constexpr,
               BN: tl.constexpr, TB: tl.constexpr):
    """(b, b') at each segment's first token, walking back from a zero start at its end ->
    rstate[b, seg, 0:4]."""
    seg, pid_c, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    c, c_ok, lanes, plane, mask = _tile(pid_c, N, C, CPG, BC, BN)
    pr, pi = _poles(rate_ptr, theta_ptr, plane, mask)
    br = tl.zeros((BC, BN), tl.float32)
    bi = tl.zeros((BC, BN), tl.float32)
    dr = tl.zeros((BC, BN), tl.float32)  # b' = db/dp
    di = tl.zeros((BC, BN), tl.float32)
    rows = tl.minimum(SEG, T - seg * SEG)
    keep_next = _keep(pos_ptr, b, seg * SEG + rows, T, HAS_POS)
    d_next = _fetch(dout_ptr, b, seg, rows - TB, SEG, rows, c, c_ok, sdb, sdt, TB)
    q_next = _fetch(q_ptr, b, seg, rows - TB, SEG, rows, c, c_ok, sqb, sqt, TB)
    for r0 in range(0, rows, TB):  # blocks from the segment's end: tokens i0 .. i0 + TB - 1
        i0 = rows - r0 - TB
        t, j, ok, plain = _block(pos_ptr, b, seg, i0, SEG, rows, T, c_ok, TB, HAS_POS)
        g = _f32(d_next) * _f32(q_next)
        d_next = _fetch(dout_ptr, b, seg, i0 - TB, SEG, rows, c, c_ok, sdb, sdt, TB)
        q_next = _fetch(q_ptr, b, seg, i0 - TB, SEG, rows, c, c_ok, sqb, sqt, TB)
        for jj in tl.static_range(TB):
            col = TB - 1 - jj
            if i0 + col >= 0:
                br, bi, dr, di = _adjoint_step(br, bi, dr, di, pr, pi, keep_next,
                                               _col(g, j, col))
                keep_next = _keep_in(pos_ptr, b, seg * SEG + i0 + col, T, plain, HAS_POS)
    at = _states_at(rstate_ptr, b, seg, n_seg, 0, 4, lanes, C, N)
    tl.store(at, br, mask=mask)
    tl.store(at + C * N, bi, mask=mask)
    tl.store(at + 2 * C * N, dr, mask=mask)
    tl.store(at + 3 * C * N, di, mask=mask)


@triton.jit
def _pass_bwd(rate_ptr, theta_ptr, rstate_ptr, pos_ptr, T, C, N, CPG, SEG, n_seg,
              HAS_POS: tl.constexpr, BLOCK: tl.constexpr):
    """In place over rstate[b]: each segment's local (b, b') becomes the pair entering it
    from its right (at the next segment's first token; zero for the last segment)."""
    pid, b = tl.program_id(0), tl.program_id(1)
    lanes = pid * BLOCK + tl.arange(0, BLOCK)
    ok = lanes < C * N
    rate = tl.load(rate_ptr + _param_lanes(lanes, N, CPG), mask=ok, other=0.0)
    theta = tl.load(theta_ptr + _param_lanes(lanes, N, CPG), mask=ok, other=0.0)
    wr, wi = _power(rate, theta, SEG * 1.0)  # p^SEG
    vr, vi = _power(rate, theta, SEG - 1.0)
    vr, vi = SEG * vr, SEG * vi  # SEG p^(SEG-1): how b reaches b' over a segment
    br = tl.zeros((BLOCK,), tl.float32)
    bi = tl.zeros((BLOCK,), tl.float32)
    dr = tl.zeros((BLOCK,), tl.float32)
    di = tl.zeros((BLOCK,), tl.float32)
    for back in range(n_seg):
        seg = n_seg - 1 - back
        at = _states_at(rstate_ptr, b, seg, n_seg, 0, 4, lanes, C, N)
        lbr = tl.load(at, mask=ok, other=0.0)
        lbi = tl.load(at + C * N, mask=ok, other=0.0)
        ldr = tl.load(at + 2 * C * N, mask=ok, other=0.0)
        ldi = tl.load(at + 3 * C * N, mask=ok, other=0.0)
        tl.store(at, br, mask=ok)
        tl.store(at + C * N, bi, mask=ok)
        tl.store(at + 2 * C * N, dr, mask=ok)
        tl.store(at + 3 * C * N, di, mask=ok)
        # The pair at the next segment's first token reaches back through SEG tokens (only
        # the last segment can be short, and nothing enters it from the right).
        f = _carried(pos_ptr, b, (seg + 1) * SEG, SEG, T, HAS_POS)
        dr, di = (f * (wr * dr - wi * di + vr * br - vi * bi) + ldr,
                  f * (wr * di + wi * dr + vr * bi + vi * br) + ldi)
        br, bi = _decay_add(br, bi, wr, wi, f, lbr, lbi)


@triton.jit
def _grads_bwd(q_ptr, k_ptr, v_ptr, dout_ptr, pos_ptr, rate_ptr, theta_ptr, re_ptr, im_ptr,
               fstate_ptr, rstate_ptr, dq_ptr, dk_ptr, dv_ptr, part_ptr, T, C, N, CPG, SEG,
               n_seg, sqb, sqt, skb, skt, svb, svt, sdb, sdt, HAS_POS: tl.constexpr,
               BC: tl.constexpr, BN: tl.constexpr, TB: tl.constexpr):
    """Per segment: forward from the forward's entering state for dq and sum g s
    (-> part[b, seg, 0:2]), then back from the entering (b, b') for du, dk, dv and
    W = sum u b' (-> part[b, seg, 2:4])."""
    seg, pid_c, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    c, c_ok, lanes, plane, mask = _tile(pid_c, N, C, CPG, BC, BN)
    pr, pi = _poles(rate_ptr, theta_ptr, plane, mask)
    rr = tl.load(re_ptr + plane, mask=mask, other=0.0)
    ri = tl.load(im_ptr + plane, mask=mask, other=0.0)
    at = _states_at(fstate_ptr, b, seg, n_seg, 0, 2, lanes, C, N)
    sr = tl.load(at, mask=mask, other=0.0)
    si = tl.load(at + C * N, mask=mask, other=0.0)
    wr = tl.zeros((BC, BN), tl.float32)  # sum_t g s, then sum_t u b'
    wi = tl.zeros((BC, BN), tl.float32)
    rows = tl.minimum(SEG, T - seg * SEG)
    q_next, k_next, v_next, d_next = _fetch_all(q_ptr, k_ptr, v_ptr, dout_ptr, b, seg, 0,
                                                SEG, rows, c, c_ok, sqb, sqt, skb, skt, svb,
                                                svt, sdb, sdt, TB)
    for i0 in range(0, rows, TB):
        t, j, ok, plain = _block(pos_ptr, b, seg, i0, SEG, rows, T, c_ok, TB, HAS_POS)
        u = _f32(k_next) * _f32(v_next)
        dout = _f32(d_next)
        g = dout * _f32(q_next)
        q_next, k_next, v_next, d_next = _fetch_all(q_ptr, k_ptr, v_ptr, dout_ptr, b, seg,
                                                    i0 + TB, SEG, rows, c, c_ok, sqb, sqt, skb,
                                                    skt, svb, svt, sdb, sdt, TB)
        y = tl.zeros((BC, TB), tl.float32)
        for jj in tl.static_range(TB):
            if i0 + jj < rows:
                keep = _keep_in(pos_ptr, b, seg * SEG + i0 + jj, T, plain, HAS_POS)
                sr, si = _scan_step(sr, si, pr, pi, keep, _col(u, j, jj))
                y = _put(y, j, jj, tl.sum(rr * sr - ri * si, axis=1))
                gj = _col(g, j, jj)[:, None]
                wr += gj * sr
                wi += gj * si
        _store_tokens(dq_ptr, b, t, c, T, C, dout * y, ok)
    out = _states_at(part_ptr, b, seg, n_seg, 0, 4, lanes, C, N)
    tl.store(out, wr, mask=mask)
    tl.store(out + C * N, wi, mask=mask)

    at = _states_at(rstate_ptr, b, seg, n_seg, 0, 4, lanes, C, N)
    br = tl.load(at, mask=mask, other=0.0)
    bi = tl.load(at + C * N, mask=mask, other=0.0)
    dr = tl.load(at + 2 * C * N, mask=mask, other=0.0)
    di = tl.load(at + 3 * C * N, mask=mask, other=0.0)
    wr = tl.zeros((BC, BN), tl.float32)
    wi = tl.zeros((BC, BN), tl.float32)
    keep_next = _keep(pos_ptr, b, seg * SEG + rows, T, HAS_POS)
    q_next, k_next, v_next, d_next = _fetch_all(q_ptr, k_ptr, v_ptr, dout_ptr, b, seg,
                                                rows - TB, SEG, rows, c, c_ok, sqb, sqt, skb,
                                                skt, svb, svt, sdb, sdt, TB)
    for r0 in range(0, rows, TB):
        i0 = rows - r0 - TB
        t, j, ok, plain = _block(pos_ptr, b, seg, i0, SEG, rows, T, c_ok, TB, HAS_POS)
        k = _f32(k_next)
        v = _f32(v_next)
        u = k * v
        g = _f32(d_next) * _f32(q_next)
        q_next, k_next, v_next, d_next = _fetch_all(q_ptr, k_ptr, v_ptr, dout_ptr, b, seg,
                                                    i0 - TB, SEG, rows, c, c_ok, sqb, sqt, skb,
                                                    skt, svb, svt, sdb, sdt, TB)
        du = tl.zeros((BC, TB), tl.float32)
        for jj in tl.static_range(TB):
            col = TB - 1 - jj
            if i0 + col >= 0:
                br, bi, dr, di = _adjoint_step(br, bi, dr, di, pr, pi, keep_next,
                                               _col(g, j, col))
                keep_next = _keep_in(pos_ptr, b, seg * SEG + i0 + col, T, plain, HAS_POS)
                du = _put(du, j, col, tl.sum(rr * br - ri * bi, axis=1))
                uj = _col(u, j, col)[:, None]
                wr += uj * dr
                wi += uj * di
        _store_tokens(dk_ptr, b, t, c, T, C, du * v, ok)
        _store_tokens(dv_ptr, b, t, c, T, C, du * k, ok)
    tl.store(out + 2 * C * N, wr, mask=mask)
    tl.store(out + 3 * C * N, wi, mask=mask)
