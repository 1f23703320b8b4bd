"""The contract every sequence mixer implements: training forward, decoding, and accounting.

A mixer maps activations `[B, T, D] -> [B, T, D]`. Inside, heads are `[B, T, H, Dh]`.
The decoding protocol has three calls, the same for every kind, so containers (blocks, the
model) only delegate:

    state = mixer.allocate_state(batch_size, max_len, device, dtype)
    y = mixer.prefill(x, state)    # x [B, T, D]: a prompt; fills `state`
    y = mixer.step(x, state)       # x [B, 1, D]: one new token; updates `state`

`prefill` followed by `step`s must reproduce `forward` on the concatenated input.

    mixer.track_position(state, position)   # optional: steps read the position from a
                                            # device tensor and keep every shape fixed

After `track_position`, one CUDA graph of `step` serves every later token (arch/generate.py)
for mixers that declare `fixed_shape_step`; mixers whose step does not depend on the
position need only the flag.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn


@dataclass
class MixerConfig:
    """Base of every mixer kind's settings (`model.mixers.<kind>` in YAML).

    Every kind also accepts an `mlp` entry there; the model config pops it before the typed
    merge, so it is not a field here.
    """

    def validate(self, d_model: int, key: str) -> None:
        """Raise `ConfigError` (naming `key.<field>`) for settings that cannot work."""


class Mixer(nn.Module, abc.ABC):
    """A sequence mixer: `[B, T, D] -> [B, T, D]`, causal.

    Subclasses declare, by parameter name relative to the mixer:
      fp32_params      parameters kept float32 whatever the training dtype (poles, decays)
      no_decay_params  parameters excluded from weight decay
    """

    fp32_params: ClassVar[tuple[str, ...]] = ()
    no_decay_params: ClassVar[tuple[str, ...]] = ()
    # True when, after track_position, step reads nothing from the host and keeps its shapes:
    # a CUDA graph of it replays correctly. Opt-in, so a plugin's step that reads a host-side
    # position is never frozen into a graph by mistake.
    fixed_shape_step: ClassVar[bool] = False

    def __init__(self, d_model: int, cfg: MixerConfig) -> None:
        super().__init__()
        self.d_model = d_model
        self.cfg = cfg

    @abc.abstractmethod
    def forward(self, x: torch.Tensor, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        """x: [B, T, D]; doc_ids: optional [B, T] document index per token. Packed rows: a
        document starts at each row start and wherever the index changes, and no
        information may cross that boundary (`stripes.arch.packing`). Returns [B, T, D]."""

    @abc.abstractmethod
    def allocate_state(
        self, batch_size: int, max_len: int, device: torch.device, dtype: torch.dtype
    ) -> Any:
        """Empty decoding state for `batch_size` sequences of at most `max_len` tokens."""

    @abc.abstractmethod
    def prefill(self, x: torch.Tensor, state: Any) -> torch.Tensor:
        """x: [B, T, D] prompt activations. Fills `state`, returns [B, T, D]."""

    @abc.abstractmethod
    def step(self, x: torch.Tensor, state: Any) -> torch.Tensor:
        """x: [B, 1, D] one token. Advances `state`, returns [B, 1, D]."""

    def track_position(self, state: Any, position: torch.Tensor) -> None:
        """From now on `step` reads the next token's position from `position` (0-d int64 on
        the state's device, advanced by the model after each call) instead of the host, and
        keeps its shapes fixed. Default: the step does not depend on the position."""

    @abc.abstractmethod
    def flops_per_token(self, seq_len: int) -> float:
        """Forward FLOPs per token (multiply-add = 2) when run on sequences of `seq_len`."""

    @abc.abstractmethod
    def state_bytes(self, batch_size: int, max_len: int, dtype: torch.dtype) -> int:
        """Bytes of decoding state `allocate_state` would hold."""

    def init_weights(self, std: float, out_std: float) -> None:
        """Default: every Linear ~ N(0, std), biases zero, `out_proj` ~ N(0, out_std).

        `out_std` is the depth-scaled std for projections that write into the residual.
        Mixers with special parameters (poles, decays) override and call this first.
        """
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        out_proj = getattr(self, "out_proj", None)
        if isinstance(out_proj, nn.Linear):
            nn.init.normal_(out_proj.weight, std=out_std)


def linear_flops(*layers: nn.Linear) -> float:
    """Forward FLOPs per token of applying each Linear once (2 per weight: multiply + add)."""
    return float(sum(2 * layer.in_features * layer.out_features for layer in layers))
