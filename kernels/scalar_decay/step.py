"""One decoding step of scalar-decay linear attention for a batch of states, in one kernel:

    S <- exp(g) S + k^T v        o = q S                  per sequence and v-head

the recurrent form that retention's and Mamba-2's `step` run (q/k heads grouped as in
kernel.py). The state stays float32 and is updated in place; each program owns a [Dk, BV]
slab of one head's state, so the step reads and writes the state once and the token's
vectors once: the step is bound by the state's bytes (2 x 4 Dk Dv per head and token).

The state's layout is given by two strides, so retention's [B, H, Dk, Dv] and Mamba-2's
[B, H, P, N] (Dv = P first, Dk = N last) are both updated where they lie.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _step_kernel(q_ptr, k_ptr, v_ptr, g_ptr, state_ptr, o_ptr, stride_sk, stride_sv,
                 H: tl.constexpr, HK: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
                 BK: tl.constexpr, BV: tl.constexpr):
    """Grid (B * H, Dv / BV): the batch on axis 0, the only one that may pass 65,535."""
    pid_bh, pid_v = tl.program_id(0), tl.program_id(1)
    b, h = pid_bh // H, pid_bh % H
    qk_row = (b * HK + h // (H // HK)).to(tl.int64) * DK
    rk = tl.arange(0, BK)
    rv = pid_v * BV + tl.arange(0, BV)
    mk, mv = rk < DK, rv < DV
    q = tl.load(q_ptr + qk_row + rk, mask=mk, other=0.0).to(tl.float32)  # [BK]
    k = tl.load(k_ptr + qk_row + rk, mask=mk, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + pid_bh.to(tl.int64) * DV + rv, mask=mv, other=0.0).to(tl.float32)
    decay = tl.exp(tl.load(g_ptr + pid_bh).to(tl.float32))
    at = (state_ptr + pid_bh.to(tl.int64) * DK * DV + rk[:, None] * stride_sk
          + rv[None, :] * stride_sv)  # [BK, BV]
    mask = mk[:, None] & mv[None, :]
    state = decay * tl.load(at, mask=mask, other=0.0) + k[:, None] * v[None, :]
    tl.store(at, state, mask=mask)
    o = tl.sum(q[:, None] * state, axis=0)  # [BV]
    tl.store(o_ptr + pid_bh.to(tl.int64) * DV + rv, o.to(o_ptr.dtype.element_ty), mask=mv)


def scalar_decay_step_(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                       state: torch.Tensor, state_is_vk: bool = False) -> torch.Tensor:
    """q, k [B, HK, Dk]; v [B, H, Dv]; g [B, H] log decays; state float32 contiguous,
    [B, H, Dk, Dv], or [B, H, Dv, Dk] with state_is_vk. Updates state in place and returns
    o [B, H, Dv] in float32, the state's precision."""
    if state.dtype != torch.float32 or not state.is_contiguous():
        raise ValueError(f"scalar_decay_step_: the state must be contiguous float32, got "
                         f"{state.dtype} with strides {state.stride()}")
    batch, hk, dk = q.shape
    h, dv = v.shape[1:]
    q, k, v = (t.contiguous() for t in (q, k, v))
    g = g.to(torch.float32).contiguous()
    o = torch.empty(v.shape, dtype=torch.float32, device=v.device)
    bv = min(64, triton.next_power_of_2(dv))
    strides = (1, dk) if state_is_vk else (dv, 1)
    _step_kernel[(batch * h, triton.cdiv(dv, bv))](
        q, k, v, g, state, o, *strides, H=h, HK=hk, DK=dk, DV=dv,
        BK=triton.next_power_of_2(dk), BV=bv, num_warps=4)
    return o
