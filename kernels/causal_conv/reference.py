"""PyTorch reference for the gated causal depthwise convolution with document resets:

    u[b, t, c]   = x[b, t, c] * x2[b, t, c]                      (x2 optional)
    y[b, t, c]   = bias[c] + sum_{j < L, j <= pos[b, t]} h[c, j] u[b, t - j, c]
    y[b, t, c]   = silu(y[b, t, c])                               (silu optional)
    out[b, t, c] = gate[b, t, c] * y[b, t, c]                    (gate optional)

pos[b, t] counts the steps since the start of t's document (t itself without documents),
so no tap reaches across a document start: each document is convolved as if alone.
Hyena's featurizer (a 3-tap conv), Hyena-SE's gated long filter (q * (h * (k v))) and
Mamba-2's short conv (with bias and SiLU) are all this function.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

MAX_PIECES = 3  # the Triton backward reads the output's gradient from up to three pieces


def check_inputs(x: torch.Tensor, h: torch.Tensor, bias: torch.Tensor | None,
                 x2: torch.Tensor | None, gate: torch.Tensor | None,
                 positions: torch.Tensor | None, split: Sequence[int] | None = None) -> None:
    if x.dim() != 3 or h.dim() != 2 or h.shape[0] != x.shape[2]:
        raise ValueError(f"causal_conv: x must be [B, T, C] and h [C, L], got x "
                         f"{tuple(x.shape)} and h {tuple(h.shape)}")
    for name, t in (("x2", x2), ("gate", gate)):
        if t is not None and t.shape != x.shape:
            raise ValueError(f"causal_conv: {name} must have x's shape {tuple(x.shape)}, got "
                             f"{tuple(t.shape)}")
    if bias is not None and bias.shape != (x.shape[2],):
        raise ValueError(f"causal_conv: bias must be [C] = [{x.shape[2]}], got "
                         f"{tuple(bias.shape)}")
    if positions is not None and positions.shape != x.shape[:2]:
        raise ValueError(f"causal_conv: positions must be [B, T] = {list(x.shape[:2])}, got "
                         f"{tuple(positions.shape)}")
    if split is not None and (not 1 <= len(split) <= MAX_PIECES or sum(split) != x.shape[2]
                              or min(split) < 1):
        raise ValueError(f"causal_conv: split must be 1 to {MAX_PIECES} positive sizes adding "
                         f"up to C = {x.shape[2]}, got {list(split)}")


def causal_conv(x: torch.Tensor, h: torch.Tensor, bias: torch.Tensor | None = None,
                x2: torch.Tensor | None = None, gate: torch.Tensor | None = None,
                positions: torch.Tensor | None = None, silu: bool = False,
                split: Sequence[int] | None = None) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """Same contract as stripes.kernels.causal_conv.causal_conv: computes in
    promote_types(x, h, float32), one shifted product per tap, and returns x's dtype."""
    check_inputs(x, h, bias, x2, gate, positions, split)
    T, L = x.shape[1], h.shape[1]
    dtype = torch.promote_types(torch.promote_types(x.dtype, h.dtype), torch.float32)
    u = x.to(dtype) if x2 is None else x.to(dtype) * x2.to(dtype)  # [B, T, C]
    if positions is None:
        positions = torch.arange(T, device=x.device).expand(x.shape[0], T)
    y = torch.zeros_like(u)
    for j in range(min(L, T)):
        earlier = torch.nn.functional.pad(u, (0, 0, j, 0))[:, :T]  # u[t - j]
        reaches = (positions >= j)[..., None]  # the tap stays inside t's document
        y = y + torch.where(reaches, earlier, 0.0) * h[:, j].to(dtype)
    if bias is not None:
        y = y + bias.to(dtype)
    if silu:
        y = torch.nn.functional.silu(y)
    if gate is not None:
        y = y * gate.to(dtype)
    y = y.to(x.dtype)
    return y if split is None else y.split(list(split), dim=-1)
