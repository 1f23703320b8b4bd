"""Rotary position embedding (Su et al., 2021, RoFormer), rotate-half layout, with the
frequency scalings used to extend a trained context.

Pairs are (x[i], x[i + Dh/2]), the layout of Hugging Face Llama checkpoints, so grafted
q/k projections need no permutation. Angles are computed in float64 for the positions at
hand (a float32 position x frequency product is off by ~0.1 rad at position 10^6) and the
rotation (kernels/rotary: `apply_rotary`) runs in at least float32: nothing depends on a
maximum length stored in the model, so a longer context needs no checkpoint surgery.

Scalings (`RopeConfig.scaling`, factor s = new context / original context), each a rule on
the inverse frequencies w_i = theta^(-2i/Dh):
  none    w_i
  linear  w_i / s                                    position interpolation (Chen et al. 2023)
  ntk     theta' = theta s^(Dh/(Dh-2)), w_i' = theta'^(-2i/Dh)
          ("NTK-aware" base change: the highest frequency stays, the lowest is divided by s)
  yarn    (1 - ramp_i) w_i / s + ramp_i w_i, with ramp_i = clamp((r_i - beta_slow) /
          (beta_fast - beta_slow), 0, 1) and r_i = L_orig w_i / (2 pi), the turns a pair
          makes over the original context: pairs that turn many times keep their frequency,
          slow ones are interpolated; cos and sin are scaled by 0.1 ln(s) + 1, so the
          attention logits by its square (Peng et al. 2023, "YaRN")
Raising theta alone ("adjusted base frequency", ABF, as in Code Llama) is `theta` itself.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from stripes.core.config import ConfigError, require_positive


@dataclass
class RopeConfig:
    theta: float = 10000.0  # base of the frequencies theta^(-2i/Dh)
    scaling: str = "none"  # one of SCALINGS: how the frequencies stretch to a longer context
    factor: float = 1.0  # s: the new context over the original (>= 1)
    original_max_len: int = 4096  # yarn: the context the frequencies were trained at
    beta_fast: float = 32.0  # yarn: pairs turning more than this often are kept
    beta_slow: float = 1.0  # yarn: pairs turning less than this often are interpolated

    def validate(self, key: str) -> None:
        require_positive(f"{key}.theta", self.theta)
        if self.scaling not in SCALINGS:
            raise ConfigError(f"{key}.scaling", self.scaling, ", ".join(SCALINGS),
                              "unknown RoPE scaling")
        if not (math.isfinite(self.factor) and self.factor >= 1.0):
            raise ConfigError(f"{key}.factor", self.factor, "a finite number >= 1",
                              "the context is extended, never shrunk")
        require_positive(f"{key}.original_max_len", self.original_max_len, integer=True)
        if not 0 < self.beta_slow < self.beta_fast:
            raise ConfigError(f"{key}.beta_fast", self.beta_fast,
                              f"a number > beta_slow = {self.beta_slow} > 0",
                              "yarn's ramp runs from beta_slow to beta_fast turns")


def check_rotary_heads(key: str, n_heads: int, d_model: int) -> None:
    """`n_heads` must split d_model into heads of even size (RoPE turns pairs of channels)."""
    if n_heads <= 0 or d_model % n_heads:
        raise ConfigError(key, n_heads, f"a divisor of d_model={d_model}",
                          "heads split d_model evenly")
    if (d_model // n_heads) % 2:
        raise ConfigError(key, n_heads, "a head size d_model/n_heads that is even",
                          "RoPE rotates pairs of channels")


def inv_frequencies(head_dim: int, theta: float,
                    device: torch.device | None = None) -> torch.Tensor:
    """theta^(-2i/Dh) for i in [0, Dh/2): [Dh/2] float64."""
    exponents = torch.arange(0, head_dim, 2, device=device, dtype=torch.float64) / head_dim
    return theta ** (-exponents)


def _unscaled(rope: RopeConfig, head_dim: int, device) -> torch.Tensor:
    return inv_frequencies(head_dim, rope.theta, device)


def _linear(rope: RopeConfig, head_dim: int, device) -> torch.Tensor:
    return inv_frequencies(head_dim, rope.theta, device) / rope.factor


def _ntk(rope: RopeConfig, head_dim: int, device) -> torch.Tensor:
    if head_dim <= 2:  # one pair: its frequency is the highest, which NTK keeps
        return inv_frequencies(head_dim, rope.theta, device)
    return inv_frequencies(head_dim, rope.theta * rope.factor ** (head_dim / (head_dim - 2)),
                           device)


def _yarn(rope: RopeConfig, head_dim: int, device) -> torch.Tensor:
    w = inv_frequencies(head_dim, rope.theta, device)
    turns = rope.original_max_len * w / (2 * math.pi)  # [Dh/2]
    ramp = ((turns - rope.beta_slow) / (rope.beta_fast - rope.beta_slow)).clamp(0.0, 1.0)
    return (1 - ramp) * w / rope.factor + ramp * w


# name -> (scaled inverse frequencies [Dh/2] float64)
SCALINGS: dict[str, Callable[[RopeConfig, int, torch.device | None], torch.Tensor]] = {
    "none": _unscaled, "linear": _linear, "ntk": _ntk, "yarn": _yarn}


def rope_magnitude(rope: RopeConfig) -> float:
    """What cos and sin are multiplied by: yarn's 0.1 ln(s) + 1 (s > 1), else 1."""
    if rope.scaling == "yarn" and rope.factor > 1:
        return 0.1 * math.log(rope.factor) + 1.0
    return 1.0


def rope_angles(positions: torch.Tensor, head_dim: int, rope: RopeConfig,
                dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """positions: [T] integer positions -> (cos, sin), each [T, Dh/2] in `dtype`, with the
    config's scaling applied to the frequencies (and, for yarn, the magnitude)."""
    w = SCALINGS[rope.scaling](rope, head_dim, positions.device)
    angles = torch.outer(positions.double(), w)
    scale = rope_magnitude(rope)
    return (scale * angles.cos()).to(dtype), (scale * angles.sin()).to(dtype)
