"""`attn` against a naive float64 reference: GQA, sliding window, packed documents, backends."""

from __future__ import annotations

import math

import pytest
import torch

from stripes.arch.attention import Attention, AttnConfig
from stripes.arch.rope import RopeConfig, rope_angles
from stripes.core.config import ConfigError
from stripes.kernels.rotary.reference import apply_rotary

from numerics import rel_error

D = 32


def make(**kw) -> Attention:
    torch.manual_seed(0)
    cfg = AttnConfig(**{"n_heads": 4, "n_kv_heads": 2, **kw})
    cfg.validate(D, "attn")
    attn = Attention(D, cfg).double()
    attn.init_weights(0.2, 0.2)
    return attn


def reference(attn: Attention, x: torch.Tensor, doc_ids=None) -> torch.Tensor:
    """Textbook attention: explicit scores, mask and softmax, KV heads repeated for GQA."""
    B, T, _ = x.shape
    H, Hkv, Dh = attn.n_heads, attn.n_kv_heads, attn.head_dim
    q = (x @ attn.q_proj.weight.T).view(B, T, H, Dh)
    k = (x @ attn.k_proj.weight.T).view(B, T, Hkv, Dh)
    v = (x @ attn.v_proj.weight.T).view(B, T, Hkv, Dh)
    cos, sin = rope_angles(torch.arange(T), Dh, attn.cfg.rope, torch.float64)
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    k, v = k.repeat_interleave(H // Hkv, dim=2), v.repeat_interleave(H // Hkv, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(Dh)
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    allowed = (j <= i).expand(B, T, T)
    if attn.cfg.window is not None:
        allowed = allowed & (i - j < attn.cfg.window)
    if doc_ids is not None:
        allowed = allowed & (doc_ids[:, :, None] == doc_ids[:, None, :])
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    y = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v)
    return y.reshape(B, T, H * Dh) @ attn.out_proj.weight.T


@pytest.mark.parametrize("grad", [True, False])  # one qkv matmul when training, three else
@pytest.mark.parametrize("kw", [{}, {"n_kv_heads": 4}, {"n_kv_heads": 1, "window": 5}])
def test_matches_reference(kw, grad):
    attn = make(**kw)
    x = torch.randn(2, 13, D, dtype=torch.float64)
    with torch.set_grad_enabled(grad):
        assert rel_error(attn(x), reference(attn, x)) < 1e-12


def test_rope_rotates_pairs_by_position():
    x = torch.randn(1, 3, 1, 4, dtype=torch.float64)
    cos, sin = rope_angles(torch.arange(3), 4, RopeConfig(theta=100.0), dtype=torch.float64)
    y = apply_rotary(x, cos, sin)
    # Rotation keeps each (x[i], x[i + Dh/2]) pair's length; position 0 is the identity.
    pairs = lambda t: t[..., :2] ** 2 + t[..., 2:] ** 2
    assert torch.allclose(pairs(y), pairs(x))
    assert torch.equal(y[:, 0], x[:, 0])
    # Pair 0 turns by 1 rad per position (theta^0); pair 1 by theta^(-1/2) = 0.1 rad.
    angle = torch.atan2(y[0, 2, 0, 2], y[0, 2, 0, 0]) - torch.atan2(x[0, 2, 0, 2], x[0, 2, 0, 0])
    assert math.isclose(math.remainder(float(angle), 2 * math.pi), 2.0, rel_tol=1e-9)


@pytest.mark.parametrize("kw", [{}, {"window": 4}])
def test_packed_documents_equal_separate_runs(kw):
    attn = make(**kw)
    a, b = torch.randn(1, 7, D, dtype=torch.float64), torch.randn(1, 9, D, dtype=torch.float64)
    packed = torch.cat((a, b), dim=1)
    doc_ids = torch.tensor([[0] * 7 + [1] * 9])
    y = attn(packed, doc_ids)
    # RoPE is relative, so a document's output does not depend on where it sits in the row.
    assert rel_error(y[:, :7], attn(a)) < 1e-12
    assert rel_error(y[:, 7:], attn(b)) < 1e-12
    assert rel_error(y, reference(attn, packed, doc_ids)) < 1e-12


def test_causal():
    attn = make(window=6)
    x = torch.randn(1, 12, D, dtype=torch.float64)
    x2 = x.clone()
    x2[:, 8:] += torch.randn_like(x2[:, 8:])
    y, y2 = attn(x), attn(x2)
    assert torch.equal(y[:, :8], y2[:, :8])
    assert not torch.allclose(y[:, 8:], y2[:, 8:])


def test_ring_smaller_than_window_refuses_to_wrap():
    attn = make(window=8)
    state = attn.allocate_state(1, 4, torch.device("cpu"), torch.float64)  # 4 slots < window
    x = torch.randn(1, 5, D, dtype=torch.float64)
    attn.prefill(x[:, :3], state)
    attn.step(x[:, 3:4], state)
    with pytest.raises(ValueError, match="past the cache of 4"):
        attn.step(x[:, 4:5], state)


def test_explicit_math_backend_matches_auto():
    attn = make()
    x = torch.randn(2, 10, D, dtype=torch.float64)
    math_attn = make(backend="math")
    assert rel_error(math_attn(x), attn(x)) < 1e-12


@pytest.mark.parametrize("window", [None, 1, 4, 50])
def test_flops_count_attended_keys(window):
    attn = make(window=window)
    T = 20
    keys = sum(min(t + 1, window or T) for t in range(T))
    core = 4 * attn.n_heads * attn.head_dim * keys / T
    proj = 2 * sum(m.weight.numel() for m in (attn.q_proj, attn.k_proj, attn.v_proj, attn.out_proj))
    assert math.isclose(attn.flops_per_token(T), proj + core)


def test_flash_attn_backend_without_package_is_a_config_error():
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match=r"stripes\[flash\]"):
            make(backend="flash_attn")
    else:
        pytest.skip("flash-attn is installed here")
