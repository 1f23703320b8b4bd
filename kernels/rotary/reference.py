"""Rotary position embedding in plain PyTorch, both pair layouts: what the kernel must match.

Each pair of channels (a, b) of every head is turned by its angle:
(a, b) -> (a cos - b sin, b cos + a sin). Token t of x uses row `offset + t` of the cos/sin
tables, so a decoding step at position p passes x of length 1 with offset p.
- interleaved=False pairs (x[i], x[i + Dh/2]): the rotate-half layout of Llama checkpoints
  and of stripes' attention and retention mixers.
- interleaved=True pairs (x[2i], x[2i+1]): the GPT-J / original RoFormer layout.
The rotation runs in at least float32 (float64 stays float64); the result has x's dtype.
The input checks live here so the public function, this reference and the Triton path reject
the same inputs with the same message.
"""

from __future__ import annotations

import torch


def check_rotary_inputs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                        offset: int) -> None:
    """x: [B, T, H, Dh] with Dh even; cos, sin: [L, Dh/2] with L >= offset + T."""
    if x.dim() != 4:
        raise ValueError(f"apply_rotary: x must be [B, T, H, Dh], got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"apply_rotary: x must be floating point, got {x.dtype}")
    T, Dh = x.shape[1], x.shape[3]
    if Dh % 2:
        raise ValueError(f"apply_rotary: head size Dh={Dh} must be even (pairs are rotated)")
    if cos.dim() != 2 or cos.shape[1] != Dh // 2 or sin.shape != cos.shape:
        raise ValueError(f"apply_rotary: cos {tuple(cos.shape)} and sin {tuple(sin.shape)} "
                         f"must both be [L, Dh/2] = [L, {Dh // 2}]")
    if not (cos.is_floating_point() and sin.is_floating_point()):
        raise ValueError(f"apply_rotary: cos ({cos.dtype}) and sin ({sin.dtype}) must be "
                         "floating point")
    if x.device != cos.device or x.device != sin.device:
        raise ValueError(f"apply_rotary: x ({x.device}), cos ({cos.device}) and sin "
                         f"({sin.device}) must be on the same device")
    L = cos.shape[0]
    if offset < 0 or offset + T > L:
        raise ValueError(f"apply_rotary: tables have L={L} rows but offset={offset} and T={T} "
                         "need 0 <= offset and offset + T <= L")


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, offset: int = 0,
                 interleaved: bool = False) -> torch.Tensor:
    """x: [B, T, H, Dh]; cos, sin: [L, Dh/2] -> rotated x: [B, T, H, Dh] in x's dtype."""
    check_rotary_inputs(x, cos, sin, offset)
    T = x.shape[1]
    compute = torch.promote_types(torch.promote_types(x.dtype, cos.dtype), torch.float32)
    cos = cos[offset:offset + T, None, :]  # [T, 1, Dh/2], broadcast over B and H
    sin = sin[offset:offset + T, None, :]
    xc = x.to(compute)
    if interleaved:
        a, b = xc[..., 0::2], xc[..., 1::2]  # each [B, T, H, Dh/2]
        out = torch.stack((a * cos - b * sin, b * cos + a * sin), dim=-1).flatten(-2)
    else:
        a, b = xc.chunk(2, dim=-1)  # each [B, T, H, Dh/2]
        out = torch.cat((a * cos - b * sin, b * cos + a * sin), dim=-1)
    return out.to(x.dtype)


def apply_rotary_qk(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                    offset: int = 0, interleaved: bool = False
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """q: [B, T, H, Dh], k: [B, T, H_kv, Dh] -> both rotated by the same angles."""
    return (apply_rotary(q, cos, sin, offset, interleaved),
            apply_rotary(k, cos, sin, offset, interleaved))
