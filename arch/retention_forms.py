"""Retention (Sun et al., 2023, "Retentive Network", arXiv:2307.08621) in its three forms.

Per head h with decay gamma_h in (0, 1), queries/keys `[B, T, H, Dk]`, values `[B, T, H, Dv]`:

    o_t = sum_{s <= t} gamma^(t - s) (q_t . k_s) v_s  +  gamma^(t + 1) q_t S_init

where S_init `[B, H, Dk, Dv]` is the state left by earlier tokens (zero for a fresh
sequence). The state after token t is S_t = gamma^(t + 1) S_init + sum_{s <= t}
gamma^(t - s) k_s^T v_s. The three forms below compute exactly this function:

    parallel    (Q K^T * D) V, D[t, s] = gamma^(t - s) for s <= t          (paper eq. 5)
    recurrent   S_t = gamma S_{t-1} + k_t^T v_t,  o_t = q_t S_t             (paper eq. 6)
    chunkwise   parallel inside each chunk + a state carried across chunks  (paper eq. 7)

These are the references: the Triton kernels (stripes.kernels.retention) are tested against
them, and the mixer (arch/retention.py) chooses which form trains.

The paper's optional normalisations (of D's rows and of the retention scores) are left out
in every form: each rescales one (token, head) output, and the per-head GroupNorm that
follows (arch/retention.py) removes such a scale anyway.

Numerics: decays arrive as LOG decays (`log_decay` [H], computed in float64 by the caller);
every power gamma^n is formed as exp(n * log_gamma) in the compute dtype, at least float32,
so no power of a rounded gamma is ever taken and all decay factors lie in (0, 1] (no
gamma^-n rescaling that could overflow). Inputs are cast to promote_types(dtype, float32);
under autocast the matmuls may still run in bf16, the decay factors do not.
"""

from __future__ import annotations

import math

import torch

Result = tuple[torch.Tensor, torch.Tensor | None]  # (o [B, T, H, Dv], final state or None)


def retention_parallel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       log_decay: torch.Tensor, initial_state: torch.Tensor | None = None,
                       return_state: bool = False) -> Result:
    """Parallel form (eq. 5). q, k: [B, T, H, Dk]; v: [B, T, H, Dv]; log_decay: [H];
    initial_state: [B, H, Dk, Dv] or None. Returns o [B, T, H, Dv] and, when asked, the state
    after the last token [B, H, Dk, Dv]. Memory is O(T^2) per head."""
    q, k, v, log_decay = _to_compute(q, k, v, log_decay)
    T = q.shape[1]
    n = torch.arange(T, device=q.device)
    decay = _decay_matrix(n, log_decay)  # [H, T, T]
    scores = torch.einsum("bthd,bshd->bhts", q, k) * decay  # [B, H, T, T]
    o = torch.einsum("bhts,bshe->bthe", scores, v)  # [B, T, H, Dv]
    if initial_state is not None:  # token t sees S_init decayed t + 1 times
        q_decay = _powers(n + 1, log_decay)  # [T, H]
        o = o + torch.einsum("bthd,bhde->bthe", q * q_decay[..., None], initial_state.to(q))
    if not return_state:
        return o, None
    k_decay = _powers(T - 1 - n, log_decay)  # [T, H]: gamma^(T-1-s) from token s to the end
    state = torch.einsum("bshd,bshe->bhde", k * k_decay[..., None], v)  # [B, H, Dk, Dv]
    if initial_state is not None:
        state = state + torch.exp(T * log_decay).view(-1, 1, 1) * initial_state.to(q)
    return o, state


def retention_recurrent(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        log_decay: torch.Tensor, initial_state: torch.Tensor | None = None,
                        return_state: bool = False) -> Result:
    """Recurrent form (eq. 6), one token at a time; the decoding step. Shapes as
    `retention_parallel`. Memory is O(Dk Dv) per head whatever T is."""
    q, k, v, log_decay = _to_compute(q, k, v, log_decay)
    B, T, H, Dk = q.shape
    gamma = log_decay.exp().view(H, 1, 1)  # [H, 1, 1]; one step's decay, never powered
    state = _initial(initial_state, q, v)  # [B, H, Dk, Dv]
    outs = []
    for t in range(T):
        state = gamma * state + torch.einsum("bhd,bhe->bhde", k[:, t], v[:, t])
        outs.append(torch.einsum("bhd,bhde->bhe", q[:, t], state))  # [B, H, Dv]
    o = torch.stack(outs, dim=1)  # [B, T, H, Dv]
    return o, state if return_state else None


def retention_chunkwise(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        log_decay: torch.Tensor, chunk_size: int,
                        initial_state: torch.Tensor | None = None,
                        return_state: bool = False) -> Result:
    """Chunkwise form (eq. 7): chunks of `chunk_size` tokens (any positive integer; T need
    not be a multiple) run the parallel form inside and pass a state across:

        o_[i] = (Q_[i] K_[i]^T * D) V_[i]  +  xi * (Q_[i] R_{i-1}),      xi_j = gamma^(j+1)
        R_i   = K_[i]^T (zeta * V_[i])  +  gamma^L_i R_{i-1},           zeta_j = gamma^(L_i-1-j)

    with L_i the number of real tokens in chunk i (the last chunk may be short) and R_{-1} =
    S_init. Shapes as `retention_parallel`. Memory is O(T C) per head for the scores plus one
    [Dk, Dv] state per chunk."""
    q, k, v, log_decay = _to_compute(q, k, v, log_decay)
    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    C = min(chunk_size, T)
    N = math.ceil(T / C)
    pad = N * C - T  # zero tokens after the end: k = v = 0 adds nothing to any state
    q, k, v = (torch.nn.functional.pad(t, (0, 0, 0, 0, 0, pad)).view(B, N, C, H, -1)
               for t in (q, k, v))  # each [B, N, C, H, D*]
    i = torch.arange(C, device=q.device)
    lengths = torch.full((N,), C, device=q.device)
    lengths[-1] = T - (N - 1) * C  # real tokens per chunk, [N]

    # Inside each chunk: the parallel form on C tokens.
    scores = torch.einsum("bnihd,bnjhd->bnhij", q, k) * _decay_matrix(i, log_decay)
    o = torch.einsum("bnhij,bnjhe->bnihe", scores, v)  # [B, N, C, H, Dv]

    # What each chunk adds to the state: sum_j gamma^(L-1-j) k_j^T v_j. Padding has j >= L,
    # a negative exponent that is clamped to 0: it multiplies k = 0 there.
    to_end = (lengths[:, None] - 1 - i).clamp(min=0)  # [N, C]
    k_decay = _powers(to_end, log_decay)  # [N, C, H]
    added = torch.einsum("bnjhd,bnjhe->bnhde", k * k_decay[..., None], v)  # [B, N, H, Dk, Dv]
    chunk_decay = _powers(lengths, log_decay)  # [N, H]: the state's decay across a chunk

    # Carry the state across chunks: a short sequential scan over N of elementwise updates.
    state = _initial(initial_state, q, v)  # [B, H, Dk, Dv]
    entering = []
    for n in range(N):
        entering.append(state)
        state = chunk_decay[n].view(H, 1, 1) * state + added[:, n]
    entering = torch.stack(entering, dim=1)  # [B, N, H, Dk, Dv]: R_{i-1} for each chunk i

    # Each token reads the state that entered its chunk, decayed j + 1 times.
    q_decay = _powers(i + 1, log_decay)  # [C, H]
    o = o + torch.einsum("bnihd,bnhde->bnihe", q * q_decay[..., None], entering)
    o = o.reshape(B, N * C, H, Dv)[:, :T]  # [B, T, H, Dv]
    return o, state if return_state else None


# -- helpers ----------------------------------------------------------------------------------
def _to_compute(q, k, v, log_decay):
    """Cast to promote_types(dtype, float32): the reference never computes below float32."""
    compute = torch.promote_types(q.dtype, torch.float32)
    return (q.to(compute), k.to(compute), v.to(compute),
            log_decay.to(device=q.device, dtype=compute))


def _powers(exponents: torch.Tensor, log_decay: torch.Tensor) -> torch.Tensor:
    """gamma_h^n = exp(n * log gamma_h): exponents [...] (>= 0) -> [..., H]."""
    return torch.exp(exponents[..., None].to(log_decay.dtype) * log_decay)


def _decay_matrix(n: torch.Tensor, log_decay: torch.Tensor) -> torch.Tensor:
    """D[h, t, s] = gamma_h^(t - s) for s <= t, else 0 (eq. 5): n [T] -> [H, T, T]."""
    gap = n[:, None] - n[None, :]  # [T, T]
    # Clamp before exp: exp of a positive exponent could overflow, and inf * 0 is NaN.
    powers = _powers(gap.clamp(min=0), log_decay).permute(2, 0, 1)  # [H, T, T]
    return torch.where(gap >= 0, powers, 0.0)


def _initial(initial_state: torch.Tensor | None, q: torch.Tensor,
             v: torch.Tensor) -> torch.Tensor:
    """The state before the first token: S_init, or zeros [B, H, Dk, Dv]."""
    if initial_state is not None:
        return initial_state.to(q)
    B, H, Dk, Dv = q.shape[0], q.shape[-2], q.shape[-1], v.shape[-1]
    return q.new_zeros(B, H, Dk, Dv)
