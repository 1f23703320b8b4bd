"""Linear projections of one input whose output is used in pieces, as one matmul.

Attention's q, k, v; retention's q, k, v and gate; Mamba's z, xBC, dt: each reads the same
x [N, D] and hands each piece of the output to a different op.

    y = x W^T + b,  W = cat(W_1, ..., W_m) [sum n_j, D],  y = (y_1 | ... | y_k) by `sizes`

Forward casts and concatenates the weights in one pass into one buffer in the compute dtype
(autocast's, else x's): the same bytes as autocast casting each weight, and one wide matmul
instead of several narrow ones.

Backward takes each piece's gradient where it lies:

    dx = sum_i dy_i W_i    (W_i: the rows of W behind piece i; accumulated in place by addmm)
    dW_i = dy_i^T x,       db_i = sum over tokens of dy_i   (in the parameters' dtype)

The weight gradient is written in the weight's own dtype by the matmul itself: on CUDA a
bf16 or fp16 matmul stores float32 (cuBLAS accumulates in float32 either way). Autocast's
F.linear rounds dW to bf16 and then casts it to the float32 weight, a read and a write of
every weight gradient on every backward (3.1 ms of a hybrid-1b step in an H100 profile) and
a rounding the float32 gradient never needed. Other devices have no such matmul: there dW
is computed in the compute dtype and cast, as autocast does.

Autograd's own backward of a split first copies every piece's gradient into one [N, sum]
tensor, a copy as large as the output (Mamba's in_proj at hybrid-1b's batch: 279 MB read and
written, 0.19 ms a layer in an H100 profile); separate Linears add their x gradients
pairwise instead. Here the extra traffic is each piece after the first reading and writing
dx again inside its addmm, and x read once more for its dW. The price in numerics: dx is
rounded to the compute dtype after each piece, as separate Linears' additions round it,
where one matmul over the concatenated gradient rounds once.

The pieces are views of one output, so an op that saves a narrow piece for backward keeps
the whole output alive (callers copy such a piece out), and no piece may be modified in
place. The SwiGLU MLP keeps two Linears: its kernel streams flat memory and would copy both
pieces. Without grad (decoding) each layer runs alone: concatenating copies the weights on
every call, and reading the weights is what a decoding step costs.

`Linear` is nn.Linear whose training forward is this one with one piece, so every projection
of the model gets its weight gradient in the weight's dtype. Unlike F.linear, training casts
weights of another dtype than x to the compute dtype (F.linear raises), and its backward is
once-differentiable, without forward-mode AD.

Across the micro-batches of one optimizer step (`StepFusion`, entered by train/engine.py for
a single process whose blocks are not compiled):
- from the second micro-batch on, autograd would add each new weight gradient into `.grad`,
  a float32 read, read and write of every weight (about 3 ms a micro-batch at 1B parameters
  on an H100). Here the weight-gradient matmul adds into the existing `.grad` itself
  (beta = 1) and autograd gets None for that weight. Nothing that watches gradients arrive
  sees such a gradient: DDP's and FSDP's reductions, tensor and post-accumulate hooks on the
  weights, `torch.autograd.grad` and `backward(inputs=...)` (which get None), hence one
  process and a plain `loss.backward()` only;
- the weights are cast to the compute dtype once and reused (autocast casts them again in
  every forward: 1.8 ms of a hybrid-1b micro-batch). Without activation checkpointing the
  casts are alive at the end of every forward anyway (saved for backward), so keeping them
  until the next forward costs no peak memory; with it they would not be, and the engine
  turns caching off (`cache_casts`). A weight changed in place is cast again (its version
  counter); a change through `.data` is not seen, so call `clear()` after one, as the engine
  does before every update.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class Linear(nn.Linear):
    """nn.Linear (same parameters and names) whose training forward is `fused_linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
           ) -> torch.Tensor:
    """F.linear(x, weight, bias); while grad is enabled through fused_linear, whose backward
    writes the weight gradient in the weight's dtype (see the top of the file)."""
    if not torch.is_grad_enabled():
        return F.linear(x, weight, bias)
    return fused_linear(x, [weight], None if bias is None else [bias], [weight.shape[0]])[0]


class StepFusion:
    """One optimizer step's sharing across its micro-batches (see the top of the file):
    weights cast once, weight gradients added into `.grad` by their matmuls. The engine
    enters `micro_batch()` around each micro-batch's forward and backward, and calls
    `clear()` before the update. Forwards read it when they run, so recomputation and
    autograd's device threads see what their forward saw. `cache_casts=False` casts in
    every forward (activation checkpointing, which frees the casts between forward and
    backward) and keeps the in-place accumulation."""

    def __init__(self, cache_casts: bool = True) -> None:
        self.cache_casts = cache_casts
        # ids of the weights and the dtype -> (the weights, their versions, the cast stack)
        self._casts: dict[tuple, tuple[tuple[torch.Tensor, ...], tuple[int, ...],
                                       torch.Tensor]] = {}

    @contextlib.contextmanager
    def micro_batch(self):
        global _ACTIVE
        previous, _ACTIVE = _ACTIVE, self
        try:
            yield
        finally:
            _ACTIVE = previous

    def clear(self) -> None:
        self._casts.clear()

    def cast(self, weights: Sequence[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        """_stack(weights, dtype), reused while the same weights are unchanged."""
        if not self.cache_casts:
            return _stack(weights, dtype)
        key = (*map(id, weights), dtype)
        versions = tuple(w._version for w in weights)
        hit = self._casts.get(key)
        if hit is not None and hit[1] == versions and all(
                a is b for a, b in zip(hit[0], weights, strict=True)):
            return hit[2]
        stacked = _stack(weights, dtype)
        self._casts[key] = (tuple(weights), versions, stacked)
        return stacked


_ACTIVE: StepFusion | None = None  # the StepFusion whose micro_batch() is open


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
    """x [..., D] -> the pieces [..., sizes[i]] of x W^T + b, W = cat(weights) [sum n_j, D],
    b = cat(biases) or none. Either one weight cut into pieces of `sizes` rows, or one weight
    [sizes[i], D] a piece."""
    rows = [w.shape[0] for w in weights]
    if len(weights) != 1 and rows != list(sizes):
        raise ValueError(f"fused_linear: pieces of {list(sizes)} rows need one weight or one "
                         f"weight a piece, got weights of {rows} rows")
    if sum(sizes) != sum(rows):
        raise ValueError(f"fused_linear: sizes {list(sizes)} add up to {sum(sizes)}, not to "
                         f"the weight's {sum(rows)} rows")
    return _FusedLinear.apply(x, tuple(sizes), len(weights), *weights, *(biases or ()))


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """What F.linear would compute in: autocast's dtype while autocast is on (it leaves
    float64 alone), else x's."""
    device = x.device.type
    if (torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device)
            and x.dtype != torch.float64):
        return torch.get_autocast_dtype(device)
    return x.dtype


def _no_autocast(device: str):
    available = torch.amp.is_autocast_available(device)
    return torch.autocast(device, enabled=False) if available else contextlib.nullcontext()


def _stack(weights: Sequence[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """W in `dtype`: the weight itself where one needs no cast, else one pass that reads each
    weight and writes it cast into one buffer."""
    if len(weights) == 1 and weights[0].dtype == dtype:
        return weights[0]
    rows = sum(t.shape[0] for t in weights)
    return torch.cat(weights, out=weights[0].new_empty(rows, weights[0].shape[1], dtype=dtype))


class _FusedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, sizes, n_weights, *params):
        weights, biases = params[:n_weights], params[n_weights:]
        dtype = _compute_dtype(x)
        with _no_autocast(x.device.type):  # the dtypes are explicit here
            x2 = x.reshape(-1, x.shape[-1]).to(dtype)  # [N, D]
            recast = any(t.dtype != dtype for t in weights)
            w = (_ACTIVE.cast(weights, dtype) if recast and _ACTIVE is not None
                 else _stack(weights, dtype))
            b = torch.cat(biases).to(dtype) if biases else None
            y = F.linear(x2, w, b)  # [N, sum(sizes)]
        # A cast W is saved, as autocast saves its cast weights. Uncast weights are saved as
        # themselves and stacked again in backward: a copy saved from forward to backward
        # would keep FSDP's unsharded parameters alive between the two.
        ctx.recast = recast
        ctx.save_for_backward(x2, *((w,) if ctx.recast else weights))
        ctx.sizes, ctx.shape, ctx.x_dtype, ctx.dtype = sizes, x.shape, x.dtype, dtype
        ctx.weight_rows, ctx.has_bias = [t.shape[0] for t in weights], bool(biases)
        ctx.param_dtypes = [t.dtype for t in params]
        ctx.grad_owners = None if _ACTIVE is None else weights
        ctx.set_materialize_grads(False)
        if len(sizes) == 1:  # not a view, as F.linear's output is (FSDP2 warns of views)
            return (torch.ops.aten._unsafe_view(y, (*x.shape[:-1], sizes[0])),)
        return tuple(piece.view(*x.shape[:-1], n) for piece, n in zip(y.split(sizes, dim=-1),
                                                                      sizes, strict=True))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads):
        x2, *saved = ctx.saved_tensors
        w = saved[0] if ctx.recast else _stack(saved, ctx.dtype)
        n = len(ctx.weight_rows)
        need_x = ctx.needs_input_grad[0]
        need_w = any(ctx.needs_input_grad[3:3 + n])
        need_b = ctx.has_bias and any(ctx.needs_input_grad[3 + n:])
        # Each parameter's gradient is a tensor of its own, in its dtype, or the weight's
        # `.grad` to add into; each piece writes its rows of it.
        in_place = [ctx.needs_input_grad[3 + i] and _accumulates_into(ctx.grad_owners, i)
                    for i in range(n)]
        dws = [ctx.grad_owners[i].grad if in_place[i] else
               x2.new_empty(r, w.shape[1], dtype=dtype) for i, (r, dtype) in
               enumerate(zip(ctx.weight_rows, ctx.param_dtypes[:n], strict=True))
               ] if need_w else None
        owner = [0] * len(ctx.sizes) if n == 1 else list(range(n))  # each piece's weight
        dbs = [x2.new_empty(r, dtype=dtype) for r, dtype in
               zip(ctx.weight_rows, ctx.param_dtypes[n:], strict=True)] if need_b else None
        dx, start = None, 0
        for i, (grad, size, dw_i, db_i) in enumerate(zip(
                grads, ctx.sizes, _per_piece(dws, ctx.sizes), _per_piece(dbs, ctx.sizes),
                strict=True)):
            rows = slice(start, start + size)
            start += size
            add = in_place[owner[i]]
            if grad is None:  # an unused piece: its rows of W get no gradient
                for t in (None if add else dw_i, db_i):
                    if t is not None:
                        t.zero_()
                continue
            g = grad.reshape(-1, size).to(x2.dtype)  # [N, size]
            if need_x:  # rounded to x2's dtype after each piece, as separate Linears' sums
                dx = g @ w[rows] if dx is None else dx.addmm_(g, w[rows])
            if dw_i is not None:
                _mm_into(g.t(), x2, dw_i, accumulate=add)
            if db_i is not None:
                torch.sum(g, dim=0, dtype=db_i.dtype, out=db_i)
        if need_x and dx is None:
            dx = x2.new_zeros(x2.shape)
        dx = None if dx is None else dx.view(ctx.shape).to(ctx.x_dtype)
        dbs = (dbs or [None] * n) if ctx.has_bias else []
        dws = [None if dws is None or in_place[i] else dws[i] for i in range(n)]
        return (dx, None, None, *dws, *dbs)


def _per_piece(per_weight: list[torch.Tensor] | None, sizes: tuple[int, ...]) -> list:
    """Each piece's rows of the weights' gradients: one weight's split by `sizes`, or one
    weight a piece (fused_linear allows only these two); Nones without gradients."""
    if per_weight is None:
        return [None] * len(sizes)
    return list(per_weight[0].split(sizes)) if len(per_weight) == 1 else per_weight


def _accumulates_into(owners: Sequence[torch.Tensor] | None, i: int) -> bool:
    """Whether weight i's gradient is added into its existing `.grad` in place."""
    grad = None if owners is None else owners[i].grad
    return (grad is not None and grad.shape == owners[i].shape and grad.is_contiguous()
            and grad.dtype == owners[i].dtype)


def _mm_into(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, accumulate: bool = False
             ) -> None:
    """out = a @ b, or out += a @ b, in out's dtype: a half-precision CUDA matmul forms (and
    adds) float32 directly; elsewhere a product of another dtype is cast, as autograd would."""
    half_to_float = (a.is_cuda and out.dtype == torch.float32
                     and a.dtype in (torch.bfloat16, torch.float16))
    if not accumulate:
        if out.dtype == a.dtype:
            torch.mm(a, b, out=out)
        elif half_to_float:
            torch.mm(a, b, out_dtype=torch.float32, out=out)
        else:
            out.copy_(a @ b)
    elif out.dtype == a.dtype:
        out.addmm_(a, b)
    elif half_to_float:
        torch.addmm(out, a, b, out_dtype=torch.float32, out=out)
    else:
        out.add_(a @ b)
