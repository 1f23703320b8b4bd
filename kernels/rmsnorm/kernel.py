"""Triton RMSNorm (+ residual add): forward and backward kernels, their launchers, and the
autograd Function behind `rms_norm_triton`.

Layout: inputs are viewed as [rows, D] with a contiguous last dim. A forward program owns one
row; a backward program owns a contiguous run of rows and keeps its weight-gradient partial
sum in registers, written once to a float32 [n_programs, D] buffer that is summed afterwards
(no atomics, so the result does not depend on scheduling).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from stripes.kernels.rmsnorm import MAX_D, TRITON_DTYPES
from stripes.kernels.rmsnorm.reference import check_inputs


@triton.jit
def _rms_norm_fwd_kernel(
    x_ptr, res_ptr, w_ptr, y_ptr, h_ptr, rstd_ptr,  # [rows, D] x4 (res, h optional), [D], [rows]
    D, eps,
    HAS_RESIDUAL: tl.constexpr, BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # int64: rows * D may pass 2^31
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    offs = row * D + cols
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)  # [BLOCK_D]
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        h = (r + x).to(h_ptr.dtype.element_ty)
        tl.store(h_ptr + offs, h, mask=mask)
        # Normalise the stored (rounded) h, exactly what an unfused add-then-norm sees, and
        # what the backward recomputes from.
        x = h.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=0) / D + eps)  # masked lanes are 0: the sum is exact
    tl.store(rstd_ptr + row, rstd)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs, (x * rstd * w).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rms_norm_bwd_kernel(
    h_ptr, w_ptr, rstd_ptr, dy_ptr, dh_ptr,  # [rows, D], [D], [rows], [rows, D], [rows, D]
    dx_ptr, dr_ptr, dw_partial_ptr,  # [rows, D], [rows, D], [n_programs, D] float32
    n_rows, D, rows_per_program,
    HAS_DH: tl.constexpr, STORE_DR: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_R: tl.constexpr, NUM_STAGES: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    col_mask = cols < D
    w = tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]  # [1, BLOCK_D]
    dw = tl.zeros([BLOCK_D], dtype=tl.float32)
    row_start = pid.to(tl.int64) * rows_per_program  # int64 bounds: the row index is int64
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    # BLOCK_R rows at a time: their loads are in flight together, which one row per
    # iteration (a load, a reduction, a store, in sequence) leaves the memory system idle for.
    for first in tl.range(row_start, row_end, BLOCK_R, num_stages=NUM_STAGES):
        rows = first + tl.arange(0, BLOCK_R)  # [BLOCK_R]
        row_mask = rows < row_end
        offs = rows[:, None] * D + cols[None, :]  # [BLOCK_R, BLOCK_D]
        mask = row_mask[:, None] & col_mask[None, :]
        rstd = tl.load(rstd_ptr + rows, mask=row_mask, other=0.0)[:, None]  # [BLOCK_R, 1]
        h_hat = tl.load(h_ptr + offs, mask=mask, other=0.0).to(tl.float32) * rstd
        dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        dw += tl.sum(dy * h_hat, axis=0)
        # y = h_hat * w with h_hat = h * rstd(h):
        # dL/dh = rstd * (dy * w - h_hat * mean(dy * w * h_hat)).
        dyw = dy * w
        dh = rstd * (dyw - h_hat * (tl.sum(dyw * h_hat, axis=1) / D)[:, None])
        if HAS_DH:  # h is also an output (the residual stream): its own gradient adds here
            dh += tl.load(dh_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(dx_ptr + offs, dh.to(dx_ptr.dtype.element_ty), mask=mask)
        if STORE_DR:
            tl.store(dr_ptr + offs, dh.to(dr_ptr.dtype.element_ty), mask=mask)
    tl.store(dw_partial_ptr + pid * D + cols, dw, mask=col_mask)


def row_block_and_warps(d: int) -> tuple[int, int]:
    """BLOCK_D covers the row; about 8 values a thread, from 1 warp up to 32 for 8k+ rows.
    (ptxas for sm_90: the backward at BLOCK_D 8192 spills with 16 warps, not with 32.)"""
    block_d = triton.next_power_of_2(d)
    return block_d, min(max(block_d // 256, 1), 32)


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


@dataclass(frozen=True)
class BackwardConfig:
    """Launch shape of the backward: rows per loop iteration, warps, programs per SM and
    software-pipelining stages of the row loop."""
    block_r: int
    num_warps: int
    programs_per_sm: int
    num_stages: int


def backward_config(d: int, itemsize: int) -> BackwardConfig:
    """Picked on an H200 at 65,536 x 2048 from a sweep of block_r {1, 2, 4}, warps {4, 8, 16},
    programs per SM {1, 2, 4, 8} and stages {1, 2}, timed as CUDA graph replays: 16-bit rows
    go four at a time with the next rows' loads pipelined; float32 rows, twice the registers
    a row, go one at a time on more programs instead, where four at a time measured slower.
    bench/kernels.py gives the resulting f+b times (BENCHMARKS.md)."""
    block_d, num_warps = row_block_and_warps(d)
    if itemsize >= 4:
        return BackwardConfig(block_r=1, num_warps=num_warps, programs_per_sm=8, num_stages=1)
    block_r = max(1, min(4, 8192 // block_d))  # at most 8k elements a tensor in registers
    return BackwardConfig(block_r=block_r, num_warps=num_warps, programs_per_sm=2, num_stages=2)


def row_programs(rows: int, device: torch.device, per_sm: int) -> int:
    """per_sm programs per SM, all resident in one wave, keep the partial buffer small. The
    interpreter (CPU) gets 4, enough to exercise several rows per program and a tail."""
    target = per_sm * _sm_count(device.index or 0) if device.type == "cuda" else 4
    return max(min(rows, target), 1)


def _forward(x: Tensor, weight: Tensor, residual: Tensor | None, eps: float,
             out_dtype: torch.dtype | None) -> tuple[Tensor, Tensor | None, Tensor]:
    """x, residual: contiguous [rows, D]; weight: [D]. Returns y (out_dtype, else x's or h's
    dtype), h (None without residual) and rstd [rows] float32."""
    rows, d = x.shape
    h = None if residual is None else torch.empty((rows, d), dtype=residual.dtype,
                                                  device=x.device)
    y = torch.empty((rows, d), dtype=out_dtype or (x.dtype if h is None else h.dtype),
                    device=x.device)
    rstd = torch.empty((rows,), dtype=torch.float32, device=x.device)
    if rows == 0:
        return y, h, rstd
    block_d, num_warps = row_block_and_warps(d)
    _rms_norm_fwd_kernel[(rows,)](
        x, residual, weight, y, h, rstd, d, eps,
        HAS_RESIDUAL=residual is not None, BLOCK_D=block_d, num_warps=num_warps,
    )
    return y, h, rstd


def _backward(h: Tensor, weight: Tensor, rstd: Tensor, grad_y: Tensor, grad_h: Tensor | None,
              x_dtype: torch.dtype, residual_dtype: torch.dtype | None
              ) -> tuple[Tensor, Tensor | None, Tensor]:
    """h, grad_y, grad_h: contiguous [rows, D]; rstd [rows]. Returns grad_x (x_dtype),
    grad_residual (residual_dtype; grad_x itself when the dtypes agree, None without
    residual) and the float32 weight gradient [D]."""
    rows, d = h.shape
    dx = torch.empty((rows, d), dtype=x_dtype, device=h.device)
    store_dr = residual_dtype is not None and residual_dtype != x_dtype
    dr = torch.empty((rows, d), dtype=residual_dtype, device=h.device) if store_dr else None
    config = backward_config(d, h.element_size())
    n_programs = row_programs(rows, h.device, config.programs_per_sm)
    rows_per_program = triton.cdiv(rows, n_programs)
    n_programs = triton.cdiv(rows, rows_per_program) if rows else 1  # no idle programs
    dw_partial = torch.empty((n_programs, d), dtype=torch.float32, device=h.device)
    if rows == 0:
        dw_partial.zero_()
    else:
        _rms_norm_bwd_kernel[(n_programs,)](
            h, weight, rstd, grad_y, grad_h, dx, dr, dw_partial, rows, d, rows_per_program,
            HAS_DH=grad_h is not None, STORE_DR=store_dr,
            BLOCK_D=triton.next_power_of_2(d), BLOCK_R=config.block_r,
            NUM_STAGES=config.num_stages, num_warps=config.num_warps,
        )
    if residual_dtype is not None and not store_dr:
        dr = dx  # same values and dtype: autograd accepts one tensor for both inputs
    return dx, dr, dw_partial.sum(0)


class _RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, residual: Tensor | None, eps: float,
                out_dtype: torch.dtype | None):
        shape, d = x.shape, x.shape[-1]
        x2 = x.reshape(-1, d).contiguous()  # [rows, D]
        r2 = None if residual is None else residual.reshape(-1, d).contiguous()
        y, h, rstd = _forward(x2, weight.contiguous(), r2, eps, out_dtype)
        # The backward needs only the norm's input (h, or x) and rstd; it recomputes h_hat.
        ctx.save_for_backward(x2 if h is None else h, weight, rstd)
        ctx.x_dtype = x.dtype
        ctx.residual_dtype = None if residual is None else residual.dtype
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None
        if h is None:
            return y.view(shape)
        return y.view(shape), h.view(shape)

    @staticmethod
    def backward(ctx, grad_y: Tensor | None, grad_h: Tensor | None = None):
        h, weight, rstd = ctx.saved_tensors
        shape = grad_y.shape if grad_y is not None else grad_h.shape
        d = h.shape[-1]
        if grad_h is not None:
            grad_h = grad_h.reshape(-1, d).contiguous()
        if grad_y is None:
            # Only h was used downstream: dh = grad_h passes through the add unchanged.
            if grad_h is None:
                return None, None, None, None, None
            dr = grad_h.to(ctx.residual_dtype)
            return grad_h.to(ctx.x_dtype).view(shape), None, dr.view(shape), None, None
        dx, dr, dw = _backward(h, weight.contiguous(), rstd, grad_y.reshape(-1, d).contiguous(),
                               grad_h, ctx.x_dtype, ctx.residual_dtype)
        dw = dw.to(weight.dtype) if ctx.needs_input_grad[1] else None
        return dx.view(shape), dw, None if dr is None else dr.view(shape), None, None


def rms_norm_triton(x: Tensor, weight: Tensor, eps: float, residual: Tensor | None = None,
                    out_dtype: torch.dtype | None = None) -> Tensor | tuple[Tensor, Tensor]:
    """Triton `rms_norm` (see `stripes.kernels.rmsnorm.rms_norm`): x, weight and residual in
    float32, bfloat16 or float16, D <= MAX_D."""
    check_inputs(x, weight, residual)
    tensors = (x, weight) if residual is None else (x, weight, residual)
    for t in tensors:
        if t.dtype not in TRITON_DTYPES:
            raise ValueError(f"rms_norm_triton: dtype {t.dtype} is not supported; use "
                             "float32, bfloat16 or float16 (the reference takes float64)")
    if x.shape[-1] > MAX_D:
        raise ValueError(f"rms_norm_triton: D = {x.shape[-1]} is wider than {MAX_D}, the "
                         "widest row kept in registers")
    if out_dtype is not None and out_dtype not in TRITON_DTYPES:
        raise ValueError(f"rms_norm_triton: out_dtype {out_dtype} is not supported; use "
                         "float32, bfloat16 or float16")
    return _RMSNormFunction.apply(x, weight, residual, eps, out_dtype)
