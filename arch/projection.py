"""Linear projections of one input whose output is used in pieces, as one matmul.

Attention's q, k, v; retention's q, k, v and gate; Mamba's z, xBC, dt; the SwiGLU's gate and
up: each reads the same x [N, D] and hands each piece of the output to a different op.

    y = x W^T + b,  W = cat(W_1, ..., W_m) [sum n_j, D],  y = (y_1 | ... | y_k) by `sizes`

Forward casts and concatenates the weights in one pass into one buffer in the compute dtype
(autocast's, else x's): the same bytes as autocast casting each weight, and one wide matmul
instead of several narrow ones.

Backward takes each piece's gradient where it lies:

    dx = sum_i dy_i W_i    (W_i: the rows of W behind piece i; accumulated in place by addmm)
    dW_i = dy_i^T x,       db_i = sum over tokens of dy_i

Autograd's own backward of a split would first copy every piece's gradient into one [N, sum]
tensor, a copy as large as the output (for Mamba's in_proj at hybrid-1b's batch 0.8 GB read
and written); separate Linears instead add their x gradients pairwise. Here the only extra
traffic is addmm reading dx once per piece after the first. dx is rounded to x's dtype after
each piece, as the separate Linears' additions round.

Without grad (decoding) the caller should apply each layer alone: concatenating copies the
weights on every call, and reading the weights is what a decoding step costs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def project_all(x: torch.Tensor, *layers: nn.Linear) -> tuple[torch.Tensor, ...]:
    """(layer(x) for each layer); one matmul (fused_linear) while grad is enabled."""
    if not torch.is_grad_enabled():
        return tuple(layer(x) for layer in layers)
    return fused_linear(x, [layer.weight for layer in layers], _biases(layers),
                        [layer.out_features for layer in layers])


def project_split(x: torch.Tensor, layer: nn.Linear, sizes: Sequence[int]
                  ) -> tuple[torch.Tensor, ...]:
    """layer(x).split(sizes, dim=-1), with fused_linear's backward while grad is enabled."""
    if not torch.is_grad_enabled():
        return layer(x).split(list(sizes), dim=-1)
    return fused_linear(x, [layer.weight], _biases([layer]), sizes)


def _biases(layers: Sequence[nn.Linear]) -> list[torch.Tensor] | None:
    has_bias = [layer.bias is not None for layer in layers]
    if any(has_bias) and not all(has_bias):
        raise ValueError("fused projections take layers that all have a bias or none")
    return [layer.bias for layer in layers] if all(has_bias) else None


def fused_linear(x: torch.Tensor, weights: Sequence[torch.Tensor],
                 biases: Sequence[torch.Tensor] | None, sizes: Sequence[int]
                 ) -> tuple[torch.Tensor, ...]:
    """x [..., D]; weights [n_j, D] (stacked in order: W), biases [n_j] or None -> the pieces
    [..., sizes[i]] of x W^T + b. sum(sizes) must equal sum(n_j)."""
    rows = sum(w.shape[0] for w in weights)
    if sum(sizes) != rows:
        raise ValueError(f"fused_linear: sizes {list(sizes)} add up to {sum(sizes)}, not to "
                         f"the weights' {rows} rows")
    params = [*weights, *(biases or ())]
    return _FusedLinear.apply(x, tuple(sizes), len(weights), *params)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    device = x.device.type
    if torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


class _FusedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, sizes, n_weights, *params):
        weights, biases = params[:n_weights], params[n_weights:]
        dtype = _compute_dtype(x)
        D = x.shape[-1]
        with torch.autocast(x.device.type, enabled=False):  # the dtypes are explicit here
            x2 = x.reshape(-1, D).to(dtype)  # [N, D]
            # One pass reads each (float32) weight and writes it into W in the compute dtype.
            w = torch.cat(weights, out=x2.new_empty(sum(t.shape[0] for t in weights), D))
            b = torch.cat(biases).to(dtype) if biases else None
            y = F.linear(x2, w, b)  # [N, sum(sizes)]
        ctx.save_for_backward(x2, w)
        ctx.sizes, ctx.shape, ctx.x_dtype = sizes, x.shape, x.dtype
        ctx.weight_rows = [t.shape[0] for t in weights]
        ctx.weight_dtypes = [t.dtype for t in weights]
        ctx.has_bias = bool(biases)
        ctx.set_materialize_grads(False)
        return tuple(piece.view(*x.shape[:-1], n) for piece, n in zip(y.split(sizes, dim=-1),
                                                                      sizes, strict=True))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads):
        x2, w = ctx.saved_tensors
        n_weights = len(ctx.weight_rows)
        need_x = ctx.needs_input_grad[0]
        need_w = any(ctx.needs_input_grad[3:3 + n_weights])
        need_b = ctx.has_bias and any(ctx.needs_input_grad[3 + n_weights:])
        dx = None
        dw = x2.new_empty(w.shape) if need_w else None
        db = x2.new_empty(w.shape[0]) if need_b else None
        start = 0
        for grad, n in zip(grads, ctx.sizes, strict=True):
            rows = slice(start, start + n)
            start += n
            if grad is None:  # an unused piece: its rows of W get no gradient
                for t in (dw, db):
                    if t is not None:
                        t[rows].zero_()
                continue
            g = grad.reshape(-1, n).to(x2.dtype)  # [N, n]
            if need_x:
                dx = g @ w[rows] if dx is None else dx.addmm_(g, w[rows])
            if need_w:
                torch.mm(g.t(), x2, out=dw[rows])
            if need_b:
                torch.sum(g, dim=0, out=db[rows])
        if need_x and dx is None:
            dx = x2.new_zeros(x2.shape)
        dx = None if dx is None else dx.view(ctx.shape).to(ctx.x_dtype)
        dws = [None] * n_weights if dw is None else list(dw.split(ctx.weight_rows))
        dbs = [None] * n_weights if db is None else list(db.split(ctx.weight_rows))
        return (dx, None, None, *dws, *(dbs if ctx.has_bias else ()))
