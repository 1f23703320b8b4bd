"""RoPE frequency scalings for context extension against their formulas, and their config
errors."""

from __future__ import annotations

import math

import pytest
import torch

from stripes.arch.rope import RopeConfig, inv_frequencies, rope_angles, rope_magnitude
from stripes.core.config import ConfigError

DH = 64
POSITIONS = torch.arange(0, 4096, 37)


def freqs(rope: RopeConfig) -> torch.Tensor:
    """The frequencies rope_angles used, read back from the angle of position 1."""
    cos, sin = rope_angles(torch.tensor([1]), DH, rope, torch.float64)
    return torch.atan2(sin, cos)[0]


def test_none_is_the_plain_frequencies():
    assert torch.allclose(freqs(RopeConfig(theta=500.0)), inv_frequencies(DH, 500.0))


def test_linear_interpolates_positions():
    """Position p under factor s turns exactly as position p / s did before."""
    cos, sin = rope_angles(POSITIONS * 4, DH, RopeConfig(scaling="linear", factor=4.0),
                           torch.float64)
    cos0, sin0 = rope_angles(POSITIONS, DH, RopeConfig(), torch.float64)
    assert torch.allclose(cos, cos0, atol=1e-9) and torch.allclose(sin, sin0, atol=1e-9)


def test_ntk_keeps_the_highest_frequency_and_divides_the_lowest_by_s():
    w0 = inv_frequencies(DH, 10000.0)
    w = freqs(RopeConfig(scaling="ntk", factor=8.0))
    assert math.isclose(w[0], w0[0], rel_tol=1e-12)
    assert math.isclose(w[-1], w0[-1] / 8.0, rel_tol=1e-9)
    assert torch.all(w[1:] < w0[1:])  # every other pair slows down


def test_yarn_ramps_between_kept_and_interpolated_pairs():
    rope = RopeConfig(scaling="yarn", factor=16.0, original_max_len=4096)
    w0 = inv_frequencies(DH, rope.theta)
    w = freqs(rope)  # atan2 reads the angle, whatever the magnitude
    turns = rope.original_max_len * w0 / (2 * math.pi)
    fast, slow = turns > rope.beta_fast, turns < rope.beta_slow
    assert fast.any() and slow.any()
    assert torch.allclose(w[fast], w0[fast])  # many turns: kept
    assert torch.allclose(w[slow], w0[slow] / 16.0)  # under one turn: interpolated
    middle = ~(fast | slow)
    ramp = (turns[middle] - 1.0) / 31.0
    assert torch.allclose(w[middle], (1 - ramp) * w0[middle] / 16.0 + ramp * w0[middle])


def test_yarn_scales_cos_and_sin_by_its_temperature():
    rope = RopeConfig(scaling="yarn", factor=16.0)
    cos, sin = rope_angles(POSITIONS, DH, rope, torch.float64)
    assert torch.allclose(cos.square() + sin.square(),
                          torch.full_like(cos, (0.1 * math.log(16.0) + 1.0) ** 2))
    assert rope_magnitude(RopeConfig(scaling="yarn", factor=1.0)) == 1.0
    assert rope_magnitude(RopeConfig(scaling="linear", factor=4.0)) == 1.0


@pytest.mark.parametrize("field, value, key", [
    ("scaling", "dynamic", "rope.scaling"), ("factor", 0.5, "rope.factor"),
    ("theta", 0.0, "rope.theta"), ("original_max_len", 0, "rope.original_max_len"),
    ("beta_fast", 0.5, "rope.beta_fast"),
])
def test_config_errors_name_the_key(field, value, key):
    with pytest.raises(ConfigError) as err:
        RopeConfig(**{field: value}).validate("rope")
    assert err.value.key == key and "\n" not in str(err.value)
