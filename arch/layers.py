"""Building blocks shared by every architecture: RMSNorm and the MLPs.

All modules take and return activations `[B, T, D]`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from stripes.arch.projection import Linear
from stripes.kernels.rmsnorm import rms_norm
from stripes.kernels.swiglu import swiglu

if TYPE_CHECKING:  # layers must not import the config module: it imports MLP_CLASSES from here
    from stripes.arch.config import MLPConfig


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight, in at least float32 (Zhang & Sennrich, 2019).

    Given `residual`, it first adds x to the residual stream and returns (norm(h), h) with
    h = residual + x: the pre-norm block's add-then-normalise in one pass (kernels/rmsnorm).
    """

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        # Under autocast the output is written in the autocast dtype: what the projections
        # reading it would each cast it to (one bf16 write instead of a float32 write and a
        # cast per projection, and no cast back per projection for the gradients). The
        # price: autograd adds the projections' gradients of it in bf16, not float32.
        device = x.device.type
        autocast = torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device)
        out_dtype = torch.get_autocast_dtype(device) if autocast else None
        return rms_norm(x, self.weight, self.eps, residual, out_dtype)

    def init_weights(self) -> None:
        nn.init.ones_(self.weight)


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)) (Shazeer, 2020). Names match Llama's for grafting."""

    def __init__(self, d_model: int, hidden: int) -> None:
        super().__init__()
        self.gate_proj = Linear(d_model, hidden, bias=False)
        self.up_proj = Linear(d_model, hidden, bias=False)
        self.down_proj = Linear(hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Two matmuls, not arch/projection.py's one: the SwiGLU kernel streams flat memory,
        # so gate and up cut from one output would each be copied (more bytes than the
        # x-gradient addition that fusing saves).
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))

    def flops_per_token(self) -> float:
        return 2.0 * 3 * self.gate_proj.in_features * self.gate_proj.out_features

    def init_weights(self, std: float, out_std: float) -> None:
        nn.init.normal_(self.gate_proj.weight, std=std)
        nn.init.normal_(self.up_proj.weight, std=std)
        nn.init.normal_(self.down_proj.weight, std=out_std)


class GeluMLP(nn.Module):
    """down(gelu(up(x))): the GPT-2 / Hyena-paper MLP."""

    def __init__(self, d_model: int, hidden: int) -> None:
        super().__init__()
        self.up_proj = Linear(d_model, hidden, bias=False)
        self.down_proj = Linear(hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.gelu(self.up_proj(x), approximate="tanh"))

    def flops_per_token(self) -> float:
        return 2.0 * 2 * self.up_proj.in_features * self.up_proj.out_features

    def init_weights(self, std: float, out_std: float) -> None:
        nn.init.normal_(self.up_proj.weight, std=std)
        nn.init.normal_(self.down_proj.weight, std=out_std)


# The MLP kinds a config may name; "none" leaves the block without an MLP.
MLP_CLASSES: dict[str, type[nn.Module] | None] = {"swiglu": SwiGLU, "gelu": GeluMLP, "none": None}


def build_mlp(d_model: int, cfg: MLPConfig) -> nn.Module | None:
    """The MLP a block uses, or None when its kind says `none` (kinds validated at config)."""
    cls = MLP_CLASSES[cfg.kind]
    return None if cls is None else cls(d_model, cfg.hidden_size(d_model))
