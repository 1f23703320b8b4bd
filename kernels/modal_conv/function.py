"""Launchers and the autograd Function of the gated modal convolution's Triton kernels
(kernel.py has the algorithm): buffers of segment states, grids, and the host-side sum of
the parameter gradients' per-segment parts."""

from __future__ import annotations

import torch
import triton

from stripes.kernels.modal_conv.kernel import (
    BC,
    MODES_PER_LANE,
    PASS_BLOCK,
    TB,
    WARPS,
    _grads_bwd,
    _local_bwd,
    _local_fwd,
    _output_fwd,
    _pass_bwd,
    _pass_fwd,
)
from stripes.kernels.modal_conv.reference import check_continue_inputs, check_inputs

MIN_SEGMENT = 64  # tokens
PROGRAMS_PER_SM = 16  # segments are cut so that about this many programs per SM run


def _strides(*tensors: torch.Tensor) -> list[int]:
    return [s for t in tensors for s in (t.stride(0), t.stride(1))]


def _channels_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(2) == 1 else t.contiguous()


def channels_per_program(N: int) -> int:
    """BC channels, a lane each, while a lane holds at most MODES_PER_LANE modes; with more
    modes a channel spreads over more lanes (up to the warp's 32) and a program takes fewer
    channels (a lane holding 64 modes would spill most of its states)."""
    return max(1, min(BC, BC * MODES_PER_LANE // triton.next_power_of_2(N)))


def _tiles(N: int) -> dict:
    """The walking kernels' tile sizes and launch width."""
    return {"BC": channels_per_program(N), "BN": triton.next_power_of_2(N), "TB": TB,
            "num_warps": WARPS}


def segment_length(batch: int, T: int, C: int, N: int, device: torch.device) -> int:
    """Tokens a program walks: segments enough for PROGRAMS_PER_SM programs per SM (more
    segments cost more state passing, fewer leave SMs idle), none under MIN_SEGMENT."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count \
        if device.type == "cuda" else 1
    blocks = batch * triton.cdiv(C, channels_per_program(N))
    segments = max(1, min(triton.cdiv(PROGRAMS_PER_SM * sms, blocks), T // MIN_SEGMENT))
    return triton.cdiv(T, segments)


def _forward(q: torch.Tensor | None, k: torch.Tensor, v: torch.Tensor | None,
             params: list[torch.Tensor], segment: int, positions: torch.Tensor | None = None,
             initial: torch.Tensor | None = None, final: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """out = q y with u = k v (q, v None: y, u = k), resetting at document starts
    (positions: int32 [B, T]), from `initial` and into `final` (float32 [B, C, N, 2] views
    of complex states) when given. params: float32 [G, N], contiguous. Also returns the
    state entering each segment (float32 [B, segments, 2, C, N]; None when out is empty),
    which backward walks from."""
    B, T, C = k.shape
    G, N = params[0].shape
    n_seg, cpg = triton.cdiv(T, segment), C // G
    out = torch.empty(B, T, C, dtype=k.dtype, device=k.device)
    state = None
    if out.numel():
        state = torch.empty(B, n_seg, 2, C, N, dtype=torch.float32, device=k.device)
        tiles = _tiles(N)
        grid = (n_seg, triton.cdiv(C, tiles["BC"]), B)
        k_v = [k, k if v is None else v]
        pos = k if positions is None else positions
        flags = {"HAS_POS": positions is not None}
        _local_fwd[grid](*k_v, pos, params[0], params[1], state, T, C, N, cpg, segment, n_seg,
                         *_strides(*k_v), HAS_V=v is not None, **tiles, **flags)
        _pass_fwd[(triton.cdiv(C * N, PASS_BLOCK), B)](
            params[0], params[1], state, state if initial is None else initial,
            state if final is None else final, pos, T, C, N, cpg, segment, n_seg,
            HAS_INIT=initial is not None, HAS_FINAL=final is not None, BLOCK=PASS_BLOCK,
            **flags)
        q_k_v = [k if q is None else q, *k_v]
        _output_fwd[grid](*q_k_v, pos, *params, state, out, T, C, N, cpg, segment, n_seg,
                          *_strides(*q_k_v), HAS_Q=q is not None, HAS_V=v is not None,
                          **tiles, **flags)
    elif final is not None and initial is not None:
        final.copy_(initial)
    return out, state


class ModalConvFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, rate, theta, residue_re, residue_im, positions, segment):
        q, k, v = (_channels_contiguous(t) for t in (q, k, v))
        params = [p.float().contiguous() for p in (rate, theta, residue_re, residue_im)]
        out, state = _forward(q, k, v, params, segment, positions)
        ctx.save_for_backward(q, k, v, *params, positions, state)
        ctx.segment = segment
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        q, k, v, rate, theta, re, im, positions, fstate = ctx.saved_tensors
        dout = _channels_contiguous(dout)
        B, T, C = q.shape
        (G, N), segment = rate.shape, ctx.segment
        n_seg, cpg = triton.cdiv(T, segment), C // G
        dq, dk, dv = (torch.empty(B, T, C, dtype=t.dtype, device=t.device) for t in (q, k, v))
        # _grads_bwd writes every element; only an empty input leaves the sums at zero.
        part = (torch.empty if dq.numel() else torch.zeros)(B, n_seg, 4, C, N,
                                                            dtype=torch.float32,
                                                            device=q.device)
        if dq.numel():
            rstate = torch.empty(B, n_seg, 4, C, N, dtype=torch.float32, device=q.device)
            tiles = _tiles(N)
            grid = (n_seg, triton.cdiv(C, tiles["BC"]), B)
            strides = _strides(q, k, v, dout)
            pos = q if positions is None else positions
            flags = {"HAS_POS": positions is not None}
            _local_bwd[grid](q, dout, pos, rate, theta, rstate, T, C, N, cpg, segment, n_seg,
                             *_strides(q, dout), **tiles, **flags)
            _pass_bwd[(triton.cdiv(C * N, PASS_BLOCK), B)](rate, theta, rstate, pos, T, C, N,
                                                          cpg, segment, n_seg,
                                                          BLOCK=PASS_BLOCK, **flags)
            _grads_bwd[grid](q, k, v, dout, pos, rate, theta, re, im, fstate, rstate, dq, dk,
                             dv, part, T, C, N, cpg, segment, n_seg, *strides, **tiles, **flags)
        # Per channel, then per filter: every sum is linear in the channels' W and s sums.
        sums = part.sum((0, 1)).view(4, G, cpg, N).sum(2)
        gsr, gsi, wr, wi = sums.unbind(0)  # [G, N] each: sum g s, W = sum u b'
        p = torch.exp(torch.complex(-rate, theta))
        prw = p * torch.complex(re, im) * torch.complex(wr, wi)  # p R W
        return dq, dk, dv, -prw.real, -prw.imag, gsr, -gsi, None, None


def modal_gated_conv_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            rate: torch.Tensor, theta: torch.Tensor, residue_re: torch.Tensor,
                            residue_im: torch.Tensor, positions: torch.Tensor | None = None,
                            segment: int | None = None) -> torch.Tensor:
    """The Triton path of stripes.kernels.modal_conv.modal_gated_conv (same contract);
    `segment`: tokens per program (None: segment_length's choice)."""
    check_inputs(q, k, v, rate, theta, residue_re, residue_im, positions)
    B, T, C = q.shape
    if segment is None:
        segment = segment_length(B, T, C, rate.shape[1], q.device)
    if positions is not None:
        positions = positions.to(torch.int32).contiguous()
    return ModalConvFunction.apply(q, k, v, rate, theta, residue_re, residue_im, positions,
                                   max(1, segment))


def modal_conv_continue_triton(u: torch.Tensor, rate: torch.Tensor, theta: torch.Tensor,
                               residue_re: torch.Tensor, residue_im: torch.Tensor,
                               state: torch.Tensor, segment: int | None = None
                               ) -> tuple[torch.Tensor, torch.Tensor]:
    """The Triton path of stripes.kernels.modal_conv.modal_conv_continue (same contract)."""
    check_continue_inputs(u, rate, theta, residue_re, residue_im, state)
    B, T, C = u.shape
    if segment is None:
        segment = segment_length(B, T, C, rate.shape[1], u.device) if T else 1
    params = [p.float().contiguous() for p in (rate, theta, residue_re, residue_im)]
    initial = torch.view_as_real(state.to(torch.complex64).contiguous())
    final = torch.empty_like(initial)
    y, _ = _forward(None, _channels_contiguous(u), None, params, max(1, segment), None,
                    initial, final)
    return y, torch.view_as_complex(final).to(state.dtype)
