"""v = dt x, the input the scalar-decay kernels read for SSD, in one Triton pass each way.

In PyTorch ops this is a float32 copy of x, the product and a cast forward, and as many
float32 passes backward (dx = dt dv, ddt = sum_P x dv); at Mamba-2's widths those passes
cost about a third of the SSD kernels' own time. Here a program owns one token: its [H, P]
tile of x (read in place from a strided view, e.g. a slice of the conv's output) and its H
values of dt. The math is float32; v and dx are stored in x's dtype, ddt in float32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _token_tile(x_ptr, dt_ptr, stride_xr, stride_xh, H, P, BH: tl.constexpr,
                BP: tl.constexpr):
    """This program's token: x [BH, BP] and dt [BH] in float32, the offsets of its [H, P]
    tile in a contiguous [tokens, H, P] tensor and of its dt, and their masks."""
    row = tl.program_id(0).to(tl.int64)
    h, p = tl.arange(0, BH), tl.arange(0, BP)
    h_ok = h < H
    mask = h_ok[:, None] & (p < P)[None, :]
    x = tl.load(x_ptr + row * stride_xr + h[:, None] * stride_xh + p[None, :], mask=mask,
                other=0.0).to(tl.float32)
    dt_at = row * H + h
    dt = tl.load(dt_ptr + dt_at, mask=h_ok, other=0.0)
    return x, dt, row * H * P + h[:, None] * P + p[None, :], mask, dt_at, h_ok


@triton.jit
def _scale_fwd_kernel(x_ptr, dt_ptr, v_ptr, stride_xr, stride_xh, H, P,
                      BH: tl.constexpr, BP: tl.constexpr):
    x, dt, at, mask, _, _ = _token_tile(x_ptr, dt_ptr, stride_xr, stride_xh, H, P, BH, BP)
    tl.store(v_ptr + at, (x * dt[:, None]).to(v_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _scale_bwd_kernel(x_ptr, dt_ptr, dv_ptr, dx_ptr, ddt_ptr, stride_xr, stride_xh, H, P,
                      BH: tl.constexpr, BP: tl.constexpr):
    x, dt, at, mask, dt_at, h_ok = _token_tile(x_ptr, dt_ptr, stride_xr, stride_xh, H, P,
                                               BH, BP)
    dv = tl.load(dv_ptr + at, mask=mask, other=0.0).to(tl.float32)
    tl.store(dx_ptr + at, (dv * dt[:, None]).to(dx_ptr.dtype.element_ty), mask=mask)
    tl.store(ddt_ptr + dt_at, tl.sum(dv * x, axis=1), mask=h_ok)


def _tokens(x: torch.Tensor) -> torch.Tensor:
    """x [B, T, H, P] as [B * T, H, P] with P contiguous, a view where the strides allow."""
    flat = x.reshape(-1, *x.shape[2:])
    return flat if flat.stride(-1) == 1 or flat.shape[-1] == 1 else flat.contiguous()


def _launch(H: int, P: int) -> dict:
    BH, BP = triton.next_power_of_2(H), triton.next_power_of_2(P)
    return dict(BH=BH, BP=BP, num_warps=max(1, min(16, BH * BP // 256)))


class _ScaleByDt(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, dt: torch.Tensor) -> torch.Tensor:
        Bsz, T, H, P = x.shape
        x3, dt2 = _tokens(x), dt.reshape(-1, H).to(torch.float32).contiguous()
        v = torch.empty(Bsz, T, H, P, dtype=x.dtype, device=x.device)
        if v.numel():
            _scale_fwd_kernel[(x3.shape[0],)](x3, dt2, v, x3.stride(0), x3.stride(1), H, P,
                                              **_launch(H, P))
        ctx.save_for_backward(x3, dt2)
        ctx.dt_dtype = dt.dtype
        return v

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dv: torch.Tensor):
        x3, dt2 = ctx.saved_tensors
        Bsz, T, H, P = dv.shape
        dv = dv.contiguous()
        dx = torch.empty(Bsz, T, H, P, dtype=x3.dtype, device=x3.device)
        ddt = torch.empty(Bsz, T, H, dtype=torch.float32, device=x3.device)
        if dx.numel():
            _scale_bwd_kernel[(x3.shape[0],)](x3, dt2, dv, dx, ddt, x3.stride(0), x3.stride(1),
                                              H, P, **_launch(H, P))
        return dx, ddt.to(ctx.dt_dtype)


def scale_by_dt(x: torch.Tensor, dt: torch.Tensor) -> torch.Tensor:
    """v [B, T, H, P] = dt[..., None] * x in x's dtype (float32 math); x [B, T, H, P], dt
    [B, T, H]. Gradients to x (its dtype) and dt (its dtype)."""
    return _ScaleByDt.apply(x, dt)
