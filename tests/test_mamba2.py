"""`mamba` (Mamba-2): chunked SSD == sequential scan, stability, init, precision, config.

The shared contract (decode == forward, packing, causality, ...) is in test_mixers.py.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from stripes.arch import ModelConfig
from stripes.arch.mamba2 import Mamba2, Mamba2Config
from stripes.arch.ssd import segsum, ssd_chunked, ssd_scan
from stripes.core.config import ConfigError

from numerics import rel_error

F64 = torch.float64


def ssd_inputs(T=21, H=4, P=3, G=2, N=5, batch=2, dtype=F64, dt_range=(0.01, 1.0), seed=0,
               A_max=3.0):
    """x [B, T, H, P], dt [B, T, H], A [H], B/C [B, T, G, N], h0 [B, H, P, N]."""
    g = torch.Generator().manual_seed(seed)
    lo, hi = dt_range
    x = torch.randn(batch, T, H, P, generator=g, dtype=dtype)
    dt = lo + (hi - lo) * torch.rand(batch, T, H, generator=g, dtype=dtype)
    A = -A_max * torch.rand(H, generator=g, dtype=dtype).clamp_min(0.05)
    B = torch.randn(batch, T, G, N, generator=g, dtype=dtype)
    C = torch.randn(batch, T, G, N, generator=g, dtype=dtype)
    h0 = torch.randn(batch, H, P, N, generator=g, dtype=dtype)
    return x, dt, A, B, C, h0


# -- the SSD functions -----------------------------------------------------------------------
def test_segsum_is_the_sum_of_each_segment_and_exact_for_large_prefixes():
    a = torch.randn(3, 9, dtype=F64)
    out = segsum(a)
    for i in range(9):
        for j in range(9):
            if j < i:
                assert rel_error(out[:, i, j], a[:, j + 1:i + 1].sum(-1)) < 1e-15
            else:  # an empty segment on the diagonal, -inf (decay 0) above it
                assert (out[:, i, j] == (0.0 if i == j else -math.inf)).all()
    # Prefix sums reach -64000, where a difference of two of them keeps ~1e-3 in float32;
    # each segment sum must still be exact.
    big = torch.full((64,), -1000.0)
    steps = torch.arange(64)
    expected = -1000.0 * (steps[:, None] - steps[None, :]).float()
    lower = steps[:, None] >= steps[None, :]
    assert torch.equal(segsum(big)[lower], expected[lower])
    assert torch.isneginf(segsum(big)[~lower]).all()


@pytest.mark.parametrize("chunk", [1, 4, 8, 32])  # T = 21: not a multiple; 32 > T
@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("groups", [1, 2])
def test_chunked_equals_scan_float64(chunk, with_state, groups):
    x, dt, A, B, C, h0 = ssd_inputs(G=groups)
    h0 = h0 if with_state else None
    y_ref, h_ref = ssd_scan(x, dt, A, B, C, h0)
    y, h = ssd_chunked(x, dt, A, B, C, chunk, h0)
    assert y.dtype == h.dtype == F64
    assert rel_error(y, y_ref) < 1e-10
    assert rel_error(h, h_ref) < 1e-10


@pytest.mark.parametrize("chunk", [4, 16])
def test_float32_forms_stay_within_1e5_of_float64(chunk):
    inputs = ssd_inputs(T=40, G=1)
    y_ref, h_ref = ssd_scan(*inputs)
    low = [t.float() for t in inputs]
    for y, h in (ssd_chunked(*low[:5], chunk, low[5]), ssd_scan(*low)):
        assert y.dtype == torch.float32
        assert rel_error(y, y_ref) < 1e-5
        assert rel_error(h, h_ref) < 1e-5


def test_chunked_gradients_equal_scan_gradients():
    inputs = [t.requires_grad_() for t in ssd_inputs(T=13)]
    w_y = torch.randn(2, 13, 4, 3, dtype=F64)
    w_h = torch.randn(2, 4, 3, 5, dtype=F64)

    def grads(fn):
        y, h = fn(*inputs)
        return torch.autograd.grad((y * w_y).sum() + (h * w_h).sum(), inputs)

    chunked = grads(lambda x, dt, A, B, C, h0: ssd_chunked(x, dt, A, B, C, 4, h0))
    for g, g_ref in zip(chunked, grads(ssd_scan), strict=True):
        assert rel_error(g, g_ref) < 1e-10


def test_large_decays_stay_finite_and_exact():
    # dt ~ 5..15 with A = -16: dt A down to -240 per step, cumulative -1e4 within a chunk.
    inputs = list(ssd_inputs(T=37, dt_range=(5.0, 15.0)))
    inputs[2] = torch.full((4,), -16.0, dtype=F64)
    y_ref, h_ref = ssd_scan(*inputs)
    y, h = ssd_chunked(*inputs[:5], 16, inputs[5])
    assert rel_error(y, y_ref) < 1e-10 and rel_error(h, h_ref) < 1e-10
    low = [t.float().requires_grad_() for t in inputs]
    y32, h32 = ssd_chunked(*low[:5], 16, low[5])
    assert torch.isfinite(y32).all() and torch.isfinite(h32).all()
    assert rel_error(y32, y_ref) < 1e-5 and rel_error(h32, h_ref) < 1e-5
    (y32.sum() + h32.sum()).backward()
    assert all(torch.isfinite(t.grad).all() for t in low)


def test_ssd_runs_in_float32_under_bf16_autocast():
    inputs = [t.float() for t in ssd_inputs(T=24)]
    y_ref, _ = ssd_chunked(*inputs[:5], 8, inputs[5])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, h = ssd_chunked(*inputs[:5], 8, inputs[5])
    assert y.dtype == h.dtype == torch.float32
    assert rel_error(y, y_ref) < 1e-6


# -- the block ---------------------------------------------------------------------------------
D_MODEL = 32


def make(dtype=F64, **kw) -> Mamba2:
    torch.manual_seed(0)
    cfg = Mamba2Config(**{"d_state": 6, "head_dim": 8, "n_groups": 2, "chunk_size": 4, **kw})
    cfg.validate(D_MODEL, "mamba")
    mixer = Mamba2(D_MODEL, cfg).to(dtype)
    mixer.init_weights(0.2, 0.2)
    return mixer


def reference_block(m: Mamba2, x: torch.Tensor) -> torch.Tensor:
    """The block written out token by token: conv as a sum over taps, the SSM as recurrence
    (S1) head by head, the gated RMSNorm per group of d_inner / G channels."""
    batch, T, _ = x.shape
    H, P, G, N, K = m.n_heads, m.cfg.head_dim, m.cfg.n_groups, m.cfg.d_state, m.cfg.d_conv
    z, xBC, dt = (x @ m.in_proj.weight.T).split([m.d_inner, m.conv_dim, H], dim=-1)
    conv = m.conv1d.bias.expand(batch, T, -1).clone()
    for t in range(T):
        for k in range(K):  # tap k weighs input t - (K - 1) + k
            if t - (K - 1) + k >= 0:
                conv[:, t] += m.conv1d.weight[:, 0, k] * xBC[:, t - (K - 1) + k]
    xs, B, C = F.silu(conv).split([m.d_inner, G * N, G * N], dim=-1)
    xs, B, C = xs.view(batch, T, H, P), B.view(batch, T, G, N), C.view(batch, T, G, N)
    dt = F.softplus(dt + m.dt_bias)
    A = -torch.exp(m.A_log)
    h = x.new_zeros(batch, H, P, N)
    y = x.new_zeros(batch, T, H, P)
    for t in range(T):
        for head in range(H):
            g = head // (H // G)
            h[:, head] = (torch.exp(dt[:, t, head] * A[head])[:, None, None] * h[:, head]
                          + dt[:, t, head, None, None] * xs[:, t, head, :, None]
                          * B[:, t, g, None, :])
            y[:, t, head] = (torch.einsum("bpn,bn->bp", h[:, head], C[:, t, g])
                             + m.D[head] * xs[:, t, head])
    gated = (y.reshape(batch, T, m.d_inner) * F.silu(z)).view(batch, T, G, -1)
    normed = gated / torch.sqrt(gated.pow(2).mean(-1, keepdim=True) + m.cfg.norm_eps)
    return (normed.view(batch, T, -1) * m.norm.weight) @ m.out_proj.weight.T


@pytest.mark.parametrize("kw", [{}, {"n_groups": 1, "d_conv": 3}])
def test_block_matches_token_by_token_reference(kw):
    m = make(**kw)
    x = torch.randn(2, 13, D_MODEL, dtype=F64)
    assert rel_error(m(x), reference_block(m, x)) < 1e-10


def test_init_ranges():
    m = make(head_dim=2, n_groups=1)  # 32 heads: a spread of dt and A
    cfg = m.cfg
    dt = F.softplus(m.dt_bias)
    assert (dt >= cfg.dt_min * (1 - 1e-9)).all() and (dt <= cfg.dt_max * (1 + 1e-9)).all()
    assert dt.max() / dt.min() > 10  # log-uniform over two decades, not a constant
    minus_A = torch.exp(m.A_log)  # A = -exp(A_log)
    assert (minus_A >= cfg.A_init_min).all() and (minus_A <= cfg.A_init_max).all()
    assert torch.equal(m.D, torch.ones_like(m.D))
    assert torch.equal(m.norm.weight, torch.ones_like(m.norm.weight))
    bound = 1 / math.sqrt(cfg.d_conv)
    assert m.conv1d.weight.abs().max() <= bound and m.conv1d.bias.abs().max() <= bound
    floored = make(head_dim=2, dt_min=1e-6, dt_max=1e-2, dt_init_floor=1e-3)
    assert (F.softplus(floored.dt_bias) >= 1e-3 * (1 - 1e-9)).all()


def test_bf16_autocast_and_bf16_weights_stay_near_float32():
    m = make(torch.float32)
    x = torch.randn(2, 24, D_MODEL)
    reference = m(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = m(x)
    assert torch.isfinite(low).all() and rel_error(low, reference) < 3e-2
    # As the trainer runs it: bf16 weights, the declared fp32 parameters kept float32.
    bf16 = make(torch.bfloat16)
    for name in Mamba2.fp32_params:
        getattr(bf16, name).data = getattr(m, name).data.clone()
    out = bf16(x.bfloat16())
    assert out.dtype == torch.bfloat16 and rel_error(out, reference) < 3e-2


@pytest.mark.parametrize("T", [32, 5])  # a multiple of chunk_size, and shorter than a chunk
def test_flops_equal_the_counted_matmuls(T):
    m = make(torch.float32, chunk_size=8)
    with FlopCounterMode(display=False) as counter:
        m(torch.randn(2, T, D_MODEL))
    # The short conv runs as stripes.kernels.causal_conv (shifted multiply-adds on CPU), which
    # FlopCounterMode does not count as a convolution: add its 2 FLOPs per tap and channel.
    conv = 2 * T * 2 * m.cfg.d_conv * m.conv_dim
    assert counter.get_total_flops() + conv == pytest.approx(2 * T * m.flops_per_token(T),
                                                             rel=1e-12)


@pytest.mark.parametrize("field, value", [
    ("d_state", 0), ("expand", 0), ("head_dim", -1), ("n_groups", 0), ("d_conv", 0),
    ("chunk_size", 0), ("head_dim", 24), ("n_groups", 3), ("dt_min", 0.0), ("dt_max", 5e-4),
    ("dt_init_floor", 0.0), ("dt_init_floor", 1.0), ("A_init_min", 0.0), ("A_init_max", 0.5),
    ("norm_eps", 0.0),
])
def test_config_errors_name_the_key(field, value):
    cfg = Mamba2Config(**{"head_dim": 16, field: value})  # 64 / 16 = 4 heads
    with pytest.raises(ConfigError) as err:
        cfg.validate(D_MODEL, "model.mixers.mamba")
    assert err.value.key == f"model.mixers.mamba.{field}"
    assert "\n" not in str(err.value)


def test_config_errors_through_the_model_config():
    def expand(settings):
        return ModelConfig(d_model=D_MODEL, n_layers=1, vocab_size=11, stripes=["mamba"],
                           mixers={"mamba": settings}).expand()

    assert expand({"d_state": 16, "head_dim": 16})[0].mixer.d_state == 16
    for settings, key in (({"head_dim": 24}, "head_dim"), ({"d_stat": 16}, "d_stat")):
        with pytest.raises(ConfigError, match=f"model.mixers.mamba.{key}"):
            expand(settings)
