"""The state space dual (SSD) layer of Mamba-2 as pure functions: the chunked training
algorithm, and the sequential scan that defines it and that it must reproduce.

Dao & Gu 2024, "Transformers are SSMs" (arXiv:2405.21060). Per head, with the selective
SSM's transition restricted to a scalar times the identity (SSD, §3.2 and §5) and the
Mamba-2 discretisation, the state h_t [P, N] follows

    h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T          y_t = h_t C_t              (S1)

Unrolled (the semiseparable matrix form of §3), with a_t = dt_t A <= 0,

    y_i = sum_{j <= i} exp(a_{j+1} + ... + a_i) (C_i . B_j) dt_j x_j               (S2)

i.e. y = (L o C B^T) (dt x) with the 1-semiseparable mask L_ij = exp(segsum(a)_ij): masked
attention with a decay (§4-5). The chunked algorithm (§6) cuts the sequence into chunks of
Q steps: inside a chunk, (S2) is computed as a Q x Q "attention" (diagonal blocks); across
chunks, only the [P, N] states pass, each decayed by its chunk's total decay (off-diagonal
blocks, which are low rank).

Shapes, for every function here: x [B, T, H, P], dt [B, T, H] (already positive), A [H]
(negative), B and C [B, T, G, N] -> y [B, T, H, P] and the final state [B, H, P, N]. The
G groups of B/C are shared by H / G consecutive heads: head h reads group h // (H / G).
Both functions compute in at least float32 with autocast off, whatever the input dtype:
they are the references that the Triton kernels must match, and states accumulate.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def segsum(a: torch.Tensor) -> torch.Tensor:
    """a [..., T] -> [..., T, T] with out[..., i, j] = a_{j+1} + ... + a_i for j <= i, -inf above.

    exp(segsum(a)) is the decay from step j to step i: the mask L of (S2). Each entry is the
    sum of its own terms (a masked cumulative sum down the columns), never the difference of
    two prefix sums, which would lose every digit when the prefix sums are large (dt A of
    -100 per step reaches -1e4 in a chunk; float32 then keeps only ~1e-3 of the difference).
    Entries above the diagonal are -inf, so the mask exponentiates to exactly 0 there and no
    positive number is ever exponentiated.
    """
    T = a.shape[-1]
    below = torch.ones(T, T, dtype=torch.bool, device=a.device).tril(-1)  # [k, j]: k > j
    terms = a[..., :, None].expand(*a.shape, T).masked_fill(~below, 0.0)  # [..., k, j] = a_k
    out = terms.cumsum(dim=-2)  # [..., i, j] = sum over j < k <= i of a_k
    causal = torch.ones(T, T, dtype=torch.bool, device=a.device).tril()  # [i, j]: j <= i
    return out.masked_fill(~causal, float("-inf"))


def ssd_scan(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
             C: torch.Tensor, initial_state: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference: recurrence (S1), one step at a time. Also the decoding step (T = 1).

    x [B, T, H, P], dt [B, T, H], A [H], B/C [B, T, G, N], initial_state [B, H, P, N] or None
    (zeros) -> y [B, T, H, P], final state [B, H, P, N], in promote_types(x, float32).
    """
    batch, T, H, P = x.shape
    G, N = B.shape[-2:]
    dtype = torch.promote_types(x.dtype, torch.float32)
    with torch.autocast(x.device.type, enabled=False):
        x, dt, A = x.to(dtype), dt.to(dtype), A.to(dtype)
        B = B.to(dtype).repeat_interleave(H // G, dim=2)  # [B, T, H, N]: each head's group
        C = C.to(dtype).repeat_interleave(H // G, dim=2)  # [B, T, H, N]
        h = x.new_zeros(batch, H, P, N) if initial_state is None else initial_state.to(dtype)
        ys = []
        for t in range(T):
            decay = torch.exp(dt[:, t] * A)[:, :, None, None]  # [B, H, 1, 1]
            inp = (dt[:, t, :, None] * x[:, t])[..., None] * B[:, t, :, None, :]  # [B, H, P, N]
            h = decay * h + inp
            ys.append(torch.einsum("bhpn,bhn->bhp", h, C[:, t]))  # y_t = h_t C_t
        return torch.stack(ys, dim=1), h  # [B, T, H, P], [B, H, P, N]


def ssd_chunked(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                C: torch.Tensor, chunk_size: int, initial_state: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """The training form: the four steps of the SSD algorithm (§6) over chunks of Q steps.

    Same arguments and results as `ssd_scan`. Q = min(chunk_size, T) (a chunk longer than
    the sequence would only add padding); T need not be a multiple of Q: the tail is padded
    with dt = 0 and x = 0, steps that decay by exp(0) = 1 and add nothing, so the state
    passes through them unchanged, and their outputs are cut off.
    """
    batch, T, H, P = x.shape
    G, N = B.shape[-2:]
    Q = min(chunk_size, T)
    pad = -T % Q
    n = (T + pad) // Q  # chunks
    dtype = torch.promote_types(x.dtype, torch.float32)
    with torch.autocast(x.device.type, enabled=False):
        x, dt, A, B, C = (t.to(dtype) for t in (x, dt, A, B, C))
        x, dt, B, C = (_pad_time(t, pad) for t in (x, dt, B, C))
        X = (x * dt[..., None]).view(batch, n, Q, G, H // G, P)  # dt_j x_j; heads -> (G, H/G)
        B = B.view(batch, n, Q, G, N)  # [B, n, Q, G, N]
        C = C.view(batch, n, Q, G, N)
        a = (dt * A).view(batch, n, Q, H).transpose(2, 3)  # [B, n, H, Q]: log-decay per step

        # 1. Diagonal blocks: (S2) restricted to pairs (i, j) inside one chunk.
        L = torch.exp(segsum(a)).view(batch, n, G, H // G, Q, Q)  # [B, n, G, H/G, i, j]
        CB = torch.einsum("bcign,bcjgn->bcgij", C, B)  # [B, n, G, i, j]: C_i . B_j per group
        y_diag = torch.einsum("bcghij,bcjghp->bcighp", L * CB[:, :, :, None], X)

        # 2. Chunk states: what each chunk leaves in h when it starts from zero.
        to_end = L[..., -1, :].permute(0, 1, 4, 2, 3)[..., None]  # [B, n, j, G, H/G, 1]
        states = torch.einsum("bcjghp,bcjgn->bcghpn", X * to_end, B)  # [B, n, G, H/G, P, N]

        # 3. State passing: a scalar SSM over chunks, written with its own segsum mask (the
        # same duality one level up). Entry z is the state after z chunks; z = 0 is h_0.
        h0 = x.new_zeros(batch, H, P, N) if initial_state is None else initial_state.to(dtype)
        states = torch.cat((h0[:, None], states.reshape(batch, n, H, P, N)), dim=1)
        chunk_a = F.pad(a.sum(-1), (0, 0, 1, 0)).transpose(1, 2)  # [B, H, n + 1], 0 first
        passing = torch.exp(segsum(chunk_a))  # [B, H, z, c]: decay from chunk c to z
        entering = torch.einsum("bhzc,bchpn->bzhpn", passing, states)  # [B, n + 1, H, P, N]
        final = entering[:, -1]  # [B, H, P, N]
        entering = entering[:, :-1].reshape(batch, n, G, H // G, P, N)  # into each chunk

        # 4. Off-diagonal blocks: the state entering a chunk, decayed to step i, read by C_i.
        from_start = torch.exp(a.cumsum(-1)).permute(0, 1, 3, 2)  # [B, n, i, H]
        y_off = torch.einsum("bcign,bcghpn->bcighp", C, entering)  # [B, n, i, G, H/G, P]
        y_off = y_off * from_start.reshape(batch, n, Q, G, H // G, 1)

        y = (y_diag + y_off).reshape(batch, n * Q, H, P)[:, :T]  # [B, T, H, P]
        return y, final


def _pad_time(t: torch.Tensor, pad: int) -> torch.Tensor:
    """Zero-pad dim 1 (time) of [B, T, ...] by `pad` steps at the end."""
    return F.pad(t, (0, 0) * (t.ndim - 2) + (0, pad))
