"""A pre-norm residual block: x + mixer(norm(x)), then x + mlp(norm(x)).

The block knows nothing of the mixer's kind: training and decoding calls are delegated.
Activations are `[B, T, D]`.

In training a block leaves its last add to the next one: it returns the residual stream and
its MLP's output apart, and the next block's first norm adds them as it reads them
(kernels/rmsnorm's fused add). The stream is float32 under autocast, so every add done on its
own is a full extra read and write of it, forward and backward.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from stripes.arch.config import LayerSpec
from stripes.arch.layers import RMSNorm, build_mlp
from stripes.arch.registry import get_mixer


class Block(nn.Module):
    def __init__(self, spec: LayerSpec, d_model: int, norm_eps: float) -> None:
        super().__init__()
        self.name, self.kind = spec.name, spec.kind
        self.mixer_norm = RMSNorm(d_model, norm_eps)
        self.mixer = get_mixer(spec.kind).module(d_model, spec.mixer)
        self.mlp = build_mlp(d_model, spec.mlp)
        self.mlp_norm = RMSNorm(d_model, norm_eps) if self.mlp is not None else None

    def forward(self, x: torch.Tensor, doc_ids: torch.Tensor | None = None,
                pending: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x: the residual stream; pending: the previous block's output not yet added to it
        (None for the first block). Returns the same pair for the next block; the stream after
        this block is their sum."""
        if pending is None:
            y = self.mixer_norm(x)
        else:
            y, x = self.mixer_norm(pending, residual=x)
        return self._mlp(x, self.mixer(y, doc_ids))

    def _mlp(self, x: torch.Tensor, mixed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x + mixed, mlp(norm(x + mixed))), the add fused into the norm; (x, mixed) when the
        block has no MLP."""
        if self.mlp is None:
            return x, mixed
        y, x = self.mlp_norm(mixed, residual=x)
        return x, self.mlp(y)

    # -- decoding: the mixer's protocol, with the same residual wiring -----------------------
    def allocate_state(self, batch_size: int, max_len: int, device, dtype) -> Any:
        return self.mixer.allocate_state(batch_size, max_len, device, dtype)

    def prefill(self, x: torch.Tensor, state: Any) -> torch.Tensor:
        x, out = self._mlp(x, self.mixer.prefill(self.mixer_norm(x), state))
        return x + out

    def step(self, x: torch.Tensor, state: Any) -> torch.Tensor:
        x, out = self._mlp(x, self.mixer.step(self.mixer_norm(x), state))
        return x + out

    def track_position(self, state: Any, position: torch.Tensor) -> None:
        self.mixer.track_position(state, position)

    # -- accounting -------------------------------------------------------------------------
    def init_weights(self, std: float, out_std: float) -> None:
        self.mixer_norm.init_weights()
        self.mixer.init_weights(std, out_std)
        if self.mlp is not None:
            self.mlp_norm.init_weights()
            self.mlp.init_weights(std, out_std)

    def flops_per_token(self, seq_len: int) -> float:
        mlp = self.mlp.flops_per_token() if self.mlp is not None else 0.0
        return self.mixer.flops_per_token(seq_len) + mlp
