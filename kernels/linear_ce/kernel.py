"""Fused linear + cross-entropy: tokens in chunks, so the [N, V] logits never exist at once.

For each chunk of C rows the host loop does
    logits = x_c @ W^T                       torch matmul, x's dtype      [C, V]
    _cross_entropy_rows_kernel               one program per row:
        pass 1  online max / sum-exp over the row in BLOCK_V blocks (float32) -> lse,
                loss_row = lse - logit[target]
        pass 2  logits <- softmax - onehot(target) (zero for ignored rows), in place
    grad_x_c  = dlogits @ W                  written straight into grad_x  [C, D]
    grad_W   += dlogits^T @ x_c              accumulated in float32        [V, D]
so the whole backward is done during the forward: the loss needs a full pass over the
logits anyway, and their gradient costs one more read and write of a row that is still in
L2. Autograd's backward then only multiplies the saved gradients by grad_output times the
reduction's scale (1/count for "mean", 1 for "sum"). The count stays on the device, so
unless the targets are checked (one host read) nothing here waits for the queued forward.

The weight gradient is summed over every chunk, so it is accumulated in float32: bf16
accumulation of many chunk products drifts. On CUDA a bf16 x bf16 product is added into the
float32 buffer by one cuBLAS call (addmm with out_dtype=float32, torch >= 2.8); on CPU
(interpreter tests) the operands are upcast instead.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from stripes.kernels.linear_ce.reference import check_inputs

# Largest block of a row that one program loads at a time; a row that fits is read once and
# written once, longer rows loop (pass 2 re-reads the row, mostly from L2). Holding a whole
# 32k row instead (64 KiB of float32 registers) leaves one program per SM in flight, and the
# loads stall: on an H200 a 2048 x 32000 bf16 chunk took 126 us that way and 96 us streamed in
# 8192-column blocks at 8 warps (bench/linear_ce_sweep.py). Tests lower it so that small
# vocabularies still cross several blocks.
MAX_BLOCK_V = 8192
# Default chunk: at most this many bytes of logits live at once (see default_chunk_tokens).
LOGITS_BUDGET_BYTES = 128 * 2**20


@triton.jit
def _cross_entropy_rows_kernel(logits_ptr, targets_ptr, loss_ptr, V, stride_row, ignore_index,
                               BLOCK_V: tl.constexpr, ONE_BLOCK: tl.constexpr,
                               WRITE_GRAD: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # int64: C * V can pass 2^31 for large vocabularies
    row_ptr = logits_ptr + row * stride_row
    target = tl.load(targets_ptr + row)
    counted = target != ignore_index
    cols = tl.arange(0, BLOCK_V)  # [BLOCK_V]

    # Pass 1: the row's log-sum-exp in float32.
    if ONE_BLOCK:  # the whole row (V <= BLOCK_V) stays in registers for pass 2
        z_row = tl.load(row_ptr + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        m = tl.max(z_row, axis=0)
        s = tl.sum(tl.exp(z_row - m), axis=0)
    else:  # running max m and sum of exp(z - m), rescaled whenever the max grows
        m = float("-inf")
        s = 0.0
        for start in range(0, V, BLOCK_V):
            offs = start + cols
            z = tl.load(row_ptr + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(z, axis=0))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
            m = m_new
    lse = m + tl.log(s)
    # Ignored rows read column 0 instead of an out-of-range index, and count zero. A target
    # outside [0, V) (only possible unchecked, see check_targets) reads column 0 too and
    # makes the row's loss and gradient NaN: whatever checks the loss or the gradients' norm
    # (the trainer's guard, DeepSpeed's overflow check) then skips the step.
    in_range = (target >= 0) & (target < V)
    z_target = tl.load(row_ptr + tl.where(counted & in_range, target, 0)).to(tl.float32)
    row_loss = tl.where(in_range, lse - z_target, float("nan"))
    tl.store(loss_ptr + row, tl.where(counted, row_loss, 0.0))

    # Pass 2: d loss_row / d logits = softmax - onehot(target), zero for an ignored row,
    # written over the logits themselves (they are not needed again). The reduction's scale
    # (1/count for "mean") is left to backward's scaling: scaled here, a bf16 row would keep
    # its precision but an fp16 row's small probabilities would underflow to zero.
    if WRITE_GRAD:
        if ONE_BLOCK:
            grad = tl.exp(z_row - lse) - tl.where(cols == target, 1.0, 0.0)
            grad = tl.where(counted, tl.where(in_range, grad, float("nan")), 0.0)
            tl.store(row_ptr + cols, grad.to(logits_ptr.dtype.element_ty), mask=cols < V)
        else:
            for start in range(0, V, BLOCK_V):
                offs = start + cols
                mask = offs < V
                z = tl.load(row_ptr + offs, mask=mask, other=0.0).to(tl.float32)
                grad = tl.exp(z - lse) - tl.where(offs == target, 1.0, 0.0)
                grad = tl.where(counted, tl.where(in_range, grad, float("nan")), 0.0)
                tl.store(row_ptr + offs, grad.to(logits_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _scale_kernel(src_ptr, dst_ptr, scale_ptr, n, BLOCK: tl.constexpr):
    """dst = src * scale (a float32 scalar read on the device), rounded once to dst's dtype."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    scale = tl.load(scale_ptr).to(tl.float32)
    src = tl.load(src_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(dst_ptr + offs, (src * scale).to(dst_ptr.dtype.element_ty), mask=mask)


def scale_into(src: torch.Tensor, dst: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """dst = src * scale for contiguous tensors of one shape (dst may be src: in place); scale
    is a 0-dim tensor on their device, so no host sync. One read and one write of each element,
    in place where asked: torch's out-of-place mul held a second copy of grad_x at the peak."""
    block = 4096
    _scale_kernel[(triton.cdiv(src.numel(), block),)](
        src, dst, scale.to(torch.float32), src.numel(), BLOCK=block, num_warps=8)
    return dst


def default_chunk_tokens(n: int, vocab: int, itemsize: int) -> int:
    """Rows per chunk: as many as keep one chunk's logits within LOGITS_BUDGET_BYTES (128 MiB),
    rounded down to a multiple of 256 when that many fit (keeps the matmuls' M dimension
    tile-aligned), at least 1 and at most n. E.g. V = 32,000 in bf16 -> 2,048 rows."""
    rows = LOGITS_BUDGET_BYTES // (vocab * itemsize)
    if rows >= 256:
        rows -= rows % 256
    return max(1, min(n, rows))


def _launch_config(vocab: int) -> tuple[int, int]:
    """(BLOCK_V, num_warps): a whole row in one block up to MAX_BLOCK_V, one warp per 1024
    columns up to 8 (the fastest of 4, 8, 16 and 32 at 8192 columns in the sweep)."""
    block = min(MAX_BLOCK_V, triton.next_power_of_2(vocab))
    return block, max(1, min(8, block // 1024))


def _accumulate_f32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b with the product formed in acc's precision (float32, or float64)."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    elif a.is_cuda:  # bf16/fp16 operands, float32 accumulate and output in one cuBLAS call
        torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
    else:  # CPU has no out_dtype kernels
        acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))


def linear_cross_entropy_forward(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                                 ignore_index: int, reduction: str, chunk_tokens: int | None,
                                 grad_x_needed: bool, grad_w_needed: bool,
                                 check_targets: bool = True):
    """Loss and, where asked, its gradients for the summed loss (backward scales them).

    Returns (loss float32 scalar, grad_x [N, D] in x's dtype or None, grad_w [V, D] float32
    (float64 for float64 inputs) or None, the reduction's scale: a float32 0-dim tensor on
    the device, 1/count for "mean", or None for "sum").
    """
    check_inputs(x, weight, targets, ignore_index, reduction, chunk_tokens, check_targets)
    x, weight, targets = x.contiguous(), weight.contiguous(), targets.contiguous()
    n, d = x.shape
    vocab = weight.shape[0]
    scale = ((targets != ignore_index).sum().clamp(min=1).to(torch.float32).reciprocal()
             if reduction == "mean" else None)
    chunk = min(chunk_tokens or default_chunk_tokens(n, vocab, x.element_size()), max(n, 1))
    write_grad = grad_x_needed or grad_w_needed
    block_v, num_warps = _launch_config(vocab)

    losses = torch.empty(n, dtype=torch.float32, device=x.device)  # [N]
    logits_buf = torch.empty(chunk, vocab, dtype=x.dtype, device=x.device)  # [C, V], reused
    grad_x = torch.empty(n, d, dtype=x.dtype, device=x.device) if grad_x_needed else None
    acc_dtype = torch.promote_types(x.dtype, torch.float32)
    grad_w = (torch.zeros(vocab, d, dtype=acc_dtype, device=x.device)
              if grad_w_needed else None)  # [V, D]

    for start in range(0, n, chunk):
        end = min(start + chunk, n)
        x_c = x[start:end]  # [c, D]
        logits = logits_buf[: end - start]  # [c, V], contiguous prefix of the buffer
        torch.mm(x_c, weight.t(), out=logits)
        _cross_entropy_rows_kernel[(end - start,)](
            logits, targets[start:end], losses[start:end], vocab, logits.stride(0),
            ignore_index, BLOCK_V=block_v, ONE_BLOCK=block_v >= vocab, WRITE_GRAD=write_grad,
            num_warps=num_warps)
        if grad_x_needed:  # [c, V] @ [V, D], rounded once
            torch.mm(logits, weight, out=grad_x[start:end])
        if grad_w_needed:
            _accumulate_f32(grad_w, logits.t(), x_c)  # += [V, c] @ [c, D]

    loss = losses.sum()
    return (loss if scale is None else loss * scale), grad_x, grad_w, scale


class LinearCrossEntropyFunction(torch.autograd.Function):
    """Forward computes the loss and both gradients; backward scales them by grad_output."""

    @staticmethod
    def forward(ctx, x, weight, targets, ignore_index, reduction, chunk_tokens, grad_x_needed,
                grad_w_needed, check_targets):
        with torch.autocast(x.device.type, enabled=False):  # matmuls stay in x's dtype
            loss, grad_x, grad_w, scale = linear_cross_entropy_forward(
                x, weight.to(x.dtype), targets, ignore_index, reduction, chunk_tokens,
                grad_x_needed, grad_w_needed, check_targets)
        ctx.save_for_backward(grad_x, grad_w)
        ctx.scale = scale
        ctx.weight_dtype = weight.dtype
        ctx.backward_done = False
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        # The saved gradients are scaled in place (grad_x, and grad_w when the weight is
        # float32) or rounded into the weight's dtype: no copy of either exists beside the
        # saved one. A second backward over the same forward (retain_graph) would see scaled
        # values, so it is refused.
        if ctx.backward_done:
            raise RuntimeError("linear_cross_entropy: backward ran twice over one forward; "
                               "its saved gradients are consumed by the first (no retain_graph)")
        ctx.backward_done = True
        grad_x, grad_w = ctx.saved_tensors
        if ctx.scale is not None:  # "mean": the summed loss's gradients times 1/count
            grad_output = grad_output * ctx.scale
        dx = scale_into(grad_x, grad_x, grad_output) if grad_x is not None else None
        dw = None
        if grad_w is not None:  # scaled in float32 and rounded once
            out = grad_w if grad_w.dtype == ctx.weight_dtype else torch.empty(
                grad_w.shape, dtype=ctx.weight_dtype, device=grad_w.device)
            dw = scale_into(grad_w, out, grad_output)
        return dx, dw, None, None, None, None, None, None, None


def linear_cross_entropy_triton(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                                ignore_index: int = -100, reduction: str = "mean",
                                chunk_tokens: int | None = None, check_targets: bool = True
                                ) -> torch.Tensor:
    """The Triton path of stripes.kernels.linear_ce.linear_cross_entropy (same contract).

    Autocast casting is the public function's job: called directly, this computes in x's
    dtype. A weight of another dtype is cast to it inside, and gets its gradient in its own
    dtype (the public function's autocast path passes float32 weights so)."""
    # ctx.needs_input_grad ignores no_grad mode, so decide here: under no_grad (evaluation)
    # the kernel skips its gradient pass and neither gradient matmul runs.
    grad_enabled = torch.is_grad_enabled()
    return LinearCrossEntropyFunction.apply(x, weight, targets, ignore_index, reduction,
                                            chunk_tokens, grad_enabled and x.requires_grad,
                                            grad_enabled and weight.requires_grad, check_targets)
