"""Triton gated norms (Mamba-2's and RetNet's, formula in reference.py): forward and backward
kernels, launchers and the autograd Function behind `gated_norm_triton`.

Layout: y, x, z are viewed as [rows, C] with the channel stride 1 and any row stride, so the
slices of a projection's output (z, and x inside xBC) are read where they lie. A program
owns one group of channels: one row of it in the forward, a run of rows in the backward,
whose weight and skip gradient partials stay in registers and are written once to float32
[n_programs, C] buffers summed afterwards (no atomics: the result does not depend on
scheduling). The backward recomputes u, silu(z) and the normalised row from the inputs and
the float32 rstd (and mean) saved per row and group, so nothing float32 of [rows, C] is kept.

Backward, with n = (h - mean) rstd the normalised group and dn the gradient reaching n w:
    dw += dn n;   dh = rstd (dn w - n mean(dn w n) [- mean(dn w), centered])
gate_first: dn = dout, du = dh gate, dz = dh u silu'(z)
otherwise:  dn = dout gate, du = dh, dz = dout n w silu'(z)
and dy = du, dx = du skip, dskip += du x, with silu'(z) = sig (1 + z (1 - sig)).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from stripes.kernels.gated_norm import MAX_GROUP, TRITON_DTYPES
from stripes.kernels.gated_norm.reference import check_inputs
from stripes.kernels.rmsnorm.kernel import row_block_and_warps, row_programs


@triton.jit
def _gated_norm_fwd_kernel(
    y_ptr, x_ptr, z_ptr, skip_ptr, w_ptr, out_ptr, rstd_ptr, mean_ptr,  # stats: [rows, G]
    stride_y, stride_x, stride_z, C, group_size, eps,
    HAS_SKIP: tl.constexpr, CENTERED: tl.constexpr, GATE_FIRST: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # int64: rows * stride may pass 2^31
    group = tl.program_id(1)
    n_groups = tl.num_programs(1)
    cols = tl.arange(0, BLOCK)
    mask = cols < group_size
    ch = group * group_size + cols  # channel index in [0, C)
    u = tl.load(y_ptr + row * stride_y + ch, mask=mask, other=0.0).to(tl.float32)
    if HAS_SKIP:
        x = tl.load(x_ptr + row * stride_x + ch, mask=mask, other=0.0).to(tl.float32)
        u += x * tl.load(skip_ptr + ch, mask=mask, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + row * stride_z + ch, mask=mask, other=0.0).to(tl.float32)
    gate = z * tl.sigmoid(z)  # masked lanes: 0
    h = u * gate if GATE_FIRST else u
    if CENTERED:
        mean = tl.sum(h, axis=0) / group_size
        h = tl.where(mask, h - mean, 0.0)
        tl.store(mean_ptr + row * n_groups + group, mean)
    rstd = tl.rsqrt(tl.sum(h * h, axis=0) / group_size + eps)
    tl.store(rstd_ptr + row * n_groups + group, rstd)
    out = h * rstd * tl.load(w_ptr + ch, mask=mask, other=0.0).to(tl.float32)
    if not GATE_FIRST:
        out *= gate
    tl.store(out_ptr + row * C + ch, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gated_norm_bwd_kernel(
    y_ptr, x_ptr, z_ptr, skip_ptr, w_ptr, rstd_ptr, mean_ptr, dout_ptr,
    dy_ptr, dx_ptr, dz_ptr, dw_partial_ptr, dskip_partial_ptr,  # partials: [n_programs, C]
    stride_y, stride_x, stride_z, stride_dout, n_rows, C, group_size, rows_per_program,
    HAS_SKIP: tl.constexpr, CENTERED: tl.constexpr, GATE_FIRST: tl.constexpr,
    BLOCK: tl.constexpr, BLOCK_R: tl.constexpr,
):
    pid = tl.program_id(0)
    group = tl.program_id(1)
    n_groups = tl.num_programs(1)
    cols = tl.arange(0, BLOCK)
    col_mask = cols < group_size
    ch = group * group_size + cols
    w = tl.load(w_ptr + ch, mask=col_mask, other=0.0).to(tl.float32)[None, :]  # [1, BLOCK]
    if HAS_SKIP:
        s = tl.load(skip_ptr + ch, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    dw = tl.zeros([BLOCK], dtype=tl.float32)
    ds = tl.zeros([BLOCK], dtype=tl.float32)
    row_start = pid.to(tl.int64) * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    for first in range(row_start, row_end, BLOCK_R):
        rows = first + tl.arange(0, BLOCK_R)  # [BLOCK_R]
        row_mask = rows < row_end
        mask = row_mask[:, None] & col_mask[None, :]  # [BLOCK_R, BLOCK]
        r = rows[:, None]
        c = ch[None, :]
        u = tl.load(y_ptr + r * stride_y + c, mask=mask, other=0.0).to(tl.float32)
        if HAS_SKIP:
            x = tl.load(x_ptr + r * stride_x + c, mask=mask, other=0.0).to(tl.float32)
            u += x * s
        z = tl.load(z_ptr + r * stride_z + c, mask=mask, other=0.0).to(tl.float32)
        sig = tl.sigmoid(z)
        gate = z * sig  # silu(z)
        stat = rows * n_groups + group
        rstd = tl.load(rstd_ptr + stat, mask=row_mask, other=0.0)[:, None]
        n = u * gate if GATE_FIRST else u
        if CENTERED:
            n = tl.where(mask, n - tl.load(mean_ptr + stat, mask=row_mask, other=0.0)[:, None],
                         0.0)
        n *= rstd  # the normalised group
        dout = tl.load(dout_ptr + r * stride_dout + c, mask=mask, other=0.0).to(tl.float32)
        dn = dout if GATE_FIRST else dout * gate
        dw += tl.sum(dn * n, axis=0)
        dnw = dn * w
        dh = dnw - n * (tl.sum(dnw * n, axis=1) / group_size)[:, None]
        if CENTERED:
            dh -= (tl.sum(dnw, axis=1) / group_size)[:, None]
        dh = tl.where(mask, dh * rstd, 0.0)
        dsilu = sig * (1.0 + z * (1.0 - sig))
        if GATE_FIRST:
            du = dh * gate
            dz = dh * u * dsilu
        else:
            du = dh
            dz = dout * n * w * dsilu
        tl.store(dy_ptr + r * C + c, du.to(dy_ptr.dtype.element_ty), mask=mask)
        if HAS_SKIP:
            tl.store(dx_ptr + r * C + c, (du * s).to(dx_ptr.dtype.element_ty), mask=mask)
            ds += tl.sum(du * x, axis=0)
        tl.store(dz_ptr + r * C + c, dz.to(dz_ptr.dtype.element_ty), mask=mask)
    tl.store(dw_partial_ptr + pid * C + ch, dw, mask=col_mask)
    if HAS_SKIP:
        tl.store(dskip_partial_ptr + pid * C + ch, ds, mask=col_mask)


def _rows(t: Tensor) -> Tensor:
    """t [..., C] as [rows, C] with channel stride 1, a view where the strides allow."""
    flat = t.reshape(-1, t.shape[-1])  # a view unless the leading dims cannot merge
    return flat if flat.shape[-1] <= 1 or flat.stride(-1) == 1 else flat.contiguous()


def _launch_shape(group_size: int, itemsize: int) -> tuple[int, int, int, int]:
    """(BLOCK, forward warps, BLOCK_R, backward warps). BLOCK covers a group; the forward's
    warps are the plain RMSNorm's. The backward keeps about eight [BLOCK_R, BLOCK] tensors
    live, so it takes BLOCK_R rows together only up to 4k elements a tile (16-bit inputs;
    float32 one row) and gives each thread about 4 values a tensor: ptxas for sm_90 spilled
    at C = 4096 with 16 warps and not with 32 (not yet swept on a GPU)."""
    block, num_warps = row_block_and_warps(group_size)
    block_r = 1 if itemsize >= 4 else max(1, min(4, 4096 // block))
    return block, num_warps, block_r, min(32, max(1, block * block_r // 128))


class _GatedNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y: Tensor, z: Tensor, weight: Tensor, x: Tensor | None,
                skip: Tensor | None, group_size: int, eps: float, centered: bool,
                gate_first: bool) -> Tensor:
        shape, C = y.shape, y.shape[-1]
        y2, z2 = _rows(y), _rows(z)
        x2 = None if x is None else _rows(x)
        rows, G = y2.shape[0], C // group_size
        out = torch.empty((rows, C), dtype=z.dtype, device=y.device)
        rstd = torch.empty((rows, G), dtype=torch.float32, device=y.device)
        mean = torch.empty_like(rstd) if centered else None
        if rows:
            block, num_warps, _, _ = _launch_shape(group_size, y.element_size())
            _gated_norm_fwd_kernel[(rows, G)](
                y2, x2, z2, skip, weight, out, rstd, mean,
                y2.stride(0), 0 if x2 is None else x2.stride(0), z2.stride(0), C,
                group_size, eps, HAS_SKIP=x is not None, CENTERED=centered,
                GATE_FIRST=gate_first, BLOCK=block, num_warps=num_warps)
        ctx.save_for_backward(y2, x2, z2, skip, weight, rstd, mean)
        ctx.shape, ctx.group_size = shape, group_size
        ctx.centered, ctx.gate_first = centered, gate_first
        return out.view(shape)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        y2, x2, z2, skip, weight, rstd, mean = ctx.saved_tensors
        rows, C = y2.shape
        group_size, G = ctx.group_size, C // ctx.group_size
        dout = _rows(grad_out)
        dy = torch.empty((rows, C), dtype=y2.dtype, device=y2.device)
        dz = torch.empty((rows, C), dtype=z2.dtype, device=y2.device)
        dx = None if x2 is None else torch.empty((rows, C), dtype=x2.dtype, device=y2.device)
        block, _, block_r, num_warps = _launch_shape(group_size, y2.element_size())
        # About 2 programs per SM over all groups, as the plain RMSNorm's 16-bit backward.
        n_programs = max(1, row_programs(rows, y2.device, 2) // G)
        rows_per_program = triton.cdiv(rows, n_programs) if rows else 1
        n_programs = triton.cdiv(rows, rows_per_program) if rows else 1
        # Every program writes its group's columns of its row: no memset needed but with no rows.
        partial = torch.zeros if rows == 0 else torch.empty
        dw_partial = partial((n_programs, C), dtype=torch.float32, device=y2.device)
        ds_partial = None if x2 is None else partial((n_programs, C), dtype=torch.float32,
                                                      device=y2.device)
        if rows:
            _gated_norm_bwd_kernel[(n_programs, G)](
                y2, x2, z2, skip, weight, rstd, mean, dout, dy, dx, dz, dw_partial, ds_partial,
                y2.stride(0), 0 if x2 is None else x2.stride(0), z2.stride(0), dout.stride(0),
                rows, C, group_size, rows_per_program, HAS_SKIP=x2 is not None,
                CENTERED=ctx.centered, GATE_FIRST=ctx.gate_first, BLOCK=block, BLOCK_R=block_r,
                num_warps=num_warps)
        shape = ctx.shape
        dskip = None if ds_partial is None else ds_partial.sum(0).to(skip.dtype)
        return (dy.view(shape), dz.view(shape), dw_partial.sum(0).to(weight.dtype),
                None if dx is None else dx.view(shape), dskip, None, None, None, None)


def gated_norm_triton(y: Tensor, z: Tensor, weight: Tensor, group_size: int, eps: float,
                      x: Tensor | None = None, skip: Tensor | None = None, *,
                      centered: bool = False, gate_first: bool = True) -> Tensor:
    """Triton `gated_norm` (see `stripes.kernels.gated_norm`): y, z, x in float32, bfloat16
    or float16; weight and skip in any of those; groups of at most MAX_GROUP channels."""
    check_inputs(y, z, weight, group_size, x, skip)
    if group_size > MAX_GROUP:
        raise ValueError(f"gated_norm_triton: group_size {group_size} is wider than "
                         f"{MAX_GROUP}, the widest group kept in registers")
    for t in (y, z, weight, x, skip):
        if t is not None and t.dtype not in TRITON_DTYPES:
            raise ValueError(f"gated_norm_triton: dtype {t.dtype} is not supported; use "
                             "float32, bfloat16 or float16 (the reference takes float64)")
    return _GatedNormFunction.apply(y, z, weight.contiguous(), x,
                                    None if skip is None else skip.contiguous(),
                                    group_size, eps, centered, gate_first)
