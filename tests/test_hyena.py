"""Hyena SE / MR / LI: every convolution form against the others and against naive sums.

The contract shared by all kinds (decode == forward through the model, packing, causality,
gradients, bf16, accounting) is in test_mixers.py; this file checks the filters and forms.
"""

from __future__ import annotations

import math

import pytest
import torch

from stripes.arch import ModelConfig
from stripes.arch.hyena import (
    HyenaLI,
    HyenaLIConfig,
    HyenaMR,
    HyenaMRConfig,
    HyenaSE,
    HyenaSEConfig,
)
from stripes.arch.hyena_filters import (
    decayed_filter,
    direct_causal_conv,
    fft_causal_conv,
    modal_filter,
    modal_poles,
    modal_recurrence,
    positive_rate,
)
from stripes.core.config import ConfigError
from stripes.kernels.modal_conv import modal_conv_continue

from numerics import rel_error

D = 32
KINDS = {
    "hyena_se": (HyenaSE, HyenaSEConfig),
    "hyena_mr": (HyenaMR, HyenaMRConfig),
    "hyena_li": (HyenaLI, HyenaLIConfig),
}
SMALL = {"hyena_se": {}, "hyena_mr": {"filter_len": 16}, "hyena_li": {"state_size": 8}}


def make(kind: str, dtype=torch.float64, **kw):
    torch.manual_seed(0)
    cls, cfg_cls = KINDS[kind]
    cfg = cfg_cls(**{**SMALL[kind], **kw})
    cfg.validate(D, kind)
    mixer = cls(D, cfg)
    mixer.init_weights(0.2, 0.2)
    return mixer.to(dtype)


def naive_conv(u: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """y[b, t, c] = sum_{j <= t, j < L} h[c, j] u[b, t - j, c], as written."""
    y = torch.zeros_like(u)
    for t in range(u.shape[1]):
        for j in range(min(t + 1, h.shape[1])):
            y[:, t] += h[:, j] * u[:, t - j]
    return y


def naive_modal_filter(mixer: HyenaLI, length: int) -> torch.Tensor:
    """Re(sum_n R_n p_n^t) with p^t by repeated multiplication, [G, length]."""
    rate = mixer.log_rate.detach().exp()
    p = torch.exp(torch.complex(-rate, mixer.theta.detach()))  # [G, N]
    r = torch.complex(mixer.residue_re.detach(), mixer.residue_im.detach())
    power, taps = torch.ones_like(p), []
    for _ in range(length):
        taps.append((r * power).real.sum(-1))
        power = power * p
    return torch.stack(taps, dim=1)


def naive_filter(mixer, length: int) -> torch.Tensor:
    """The long filter of each kind from its definition, [G, L]."""
    if isinstance(mixer, HyenaLI):
        return naive_modal_filter(mixer, length)
    taps = mixer.filter_taps.detach()
    if isinstance(mixer, HyenaMR):
        t = torch.arange(taps.shape[1], dtype=taps.dtype)
        return taps * torch.exp(-mixer.log_decay.detach().exp()[:, None] * t)
    return taps


def naive_operator(mixer, x: torch.Tensor) -> torch.Tensor:
    """out_proj(q * (h * (k * v))) with naive convolutions; channel c uses filter c // (D/G)."""
    z = x @ mixer.in_proj.weight.T  # [B, T, 3D]
    z = naive_conv(z, mixer.short_filter.detach())
    q, k, v = z.split(D, dim=-1)
    h = naive_filter(mixer, x.shape[1])
    h = h[torch.arange(D) // (D // h.shape[0])]  # [D, L]
    return (q * naive_conv(k * v, h)) @ mixer.out_proj.weight.T


# -- convolutions -----------------------------------------------------------------------------
@pytest.mark.parametrize("T", [1, 13, 31])
@pytest.mark.parametrize("L", [1, 5, 40])
def test_fft_conv_equals_direct_conv(T, L):
    g = torch.Generator().manual_seed(T * 100 + L)
    u = torch.randn(2, T, 3, dtype=torch.float64, generator=g)
    h = torch.randn(3, L, dtype=torch.float64, generator=g)
    direct = direct_causal_conv(u, h)
    assert rel_error(direct, naive_conv(u, h)) < 1e-12
    assert rel_error(fft_causal_conv(u, h), direct) < 1e-10


def test_fft_conv_runs_float32_for_bf16_inputs():
    u = torch.randn(2, 9, 3, dtype=torch.float64)
    h = torch.randn(3, 5, dtype=torch.float64)
    low = fft_causal_conv(u.bfloat16(), h.float())
    assert low.dtype == torch.bfloat16
    # Only the input and output roundings of bf16 (2^-9 each), none from the FFT itself.
    assert rel_error(low, naive_conv(u.bfloat16().double(), h.float().double())) < 1e-2


def modal_params(C=3, N=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    log_rate = torch.empty(C, N, dtype=torch.float64).uniform_(math.log(0.01), 0, generator=g)
    theta = torch.empty(C, N, dtype=torch.float64).uniform_(-math.pi, math.pi, generator=g)
    residues = torch.randn(C, N, dtype=torch.complex128, generator=g)
    return log_rate, theta, residues


def test_modal_recurrence_equals_fft_path():
    log_rate, theta, residues = modal_params()
    u = torch.randn(2, 29, 3, dtype=torch.float64)
    state = torch.zeros(2, 3, 4, dtype=torch.complex128)
    fft = fft_causal_conv(u, modal_filter(log_rate, theta, residues, 29))
    rec, _ = modal_recurrence(u, modal_poles(log_rate, theta), residues, state)
    assert rel_error(rec, fft) < 1e-10


@pytest.mark.parametrize("T", [1, 2, 17])
def test_modal_conv_continue_carries_a_state(T):
    log_rate, theta, residues = modal_params()
    u = torch.randn(2, T, 3, dtype=torch.float64)
    state = torch.randn(2, 3, 4, dtype=torch.complex128)
    params = (positive_rate(log_rate), theta, residues.real, residues.imag)
    y, new_state = modal_conv_continue(u, *params, state)
    y_rec, state_rec = modal_recurrence(u, modal_poles(log_rate, theta), residues, state)
    assert rel_error(y, y_rec) < 1e-10
    assert rel_error(torch.view_as_real(new_state), torch.view_as_real(state_rec)) < 1e-10
    # The carry matters: without it the outputs differ.
    y_fresh, _ = modal_conv_continue(u, *params, torch.zeros_like(state))
    assert rel_error(y_fresh, y_rec) > 1e-3


# -- filters ----------------------------------------------------------------------------------
def test_li_filter_has_no_baked_in_length():
    mixer = make("hyena_li", torch.float32)
    short, long = mixer.filter(24), mixer.filter(61)
    assert torch.equal(short, long[:, :24])
    assert rel_error(mixer.double().filter(61), naive_modal_filter(mixer, 61)) < 1e-10


def test_mr_filter_is_taps_times_positive_decay():
    mixer = make("hyena_mr")
    assert (mixer.log_decay.exp() > 0).all()
    assert rel_error(mixer.filter(), naive_filter(mixer, 16)) < 1e-14


EXTREMES = [-float("inf"), -1e4, -100.0, -30.0, -14.0, 0.0, 14.0, 30.0, 1e4, float("inf")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_poles_inside_unit_circle_and_decays_positive(dtype):
    mixer = make("hyena_li", dtype)
    assert (modal_poles(mixer.log_rate, mixer.theta).abs() < 1).all()  # after init
    log_rate = torch.tensor(EXTREMES, dtype=dtype)[:, None]  # [10, 1]
    theta = torch.tensor([[0.0, 1e-3, 3.0, -2.0, 1e6]], dtype=dtype).expand(10, 5)
    poles = modal_poles(log_rate.expand(10, 5), theta)
    assert (poles.abs() < 1).all()
    residues = torch.ones(10, 5, dtype=poles.dtype)
    assert torch.isfinite(modal_filter(log_rate.expand(10, 5), theta, residues, 50)).all()
    decay = positive_rate(log_rate.flatten())
    assert (decay > 0).all() and torch.isfinite(decay).all()
    taps = torch.ones(10, 16, dtype=dtype)
    assert torch.isfinite(decayed_filter(taps, log_rate.flatten())).all()


@pytest.mark.parametrize("kind", ["hyena_mr", "hyena_li"])
def test_fp32_filter_under_bf16(kind):
    mixer = make(kind, torch.float32)
    x = torch.randn(2, 23, D)
    reference = mixer(x)
    filter_args = (23,) if kind == "hyena_li" else ()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert mixer.filter(*filter_args).dtype == torch.float32
        low = mixer(x)
    assert torch.isfinite(low).all() and rel_error(low, reference) < 3e-2
    # A bf16 module whose fp32 parameters the trainer kept in float32, and one where they
    # were cast too: the filter is float32 either way.
    mixer = mixer.bfloat16()
    assert mixer.filter(*filter_args).dtype == torch.float32
    for name in mixer.fp32_params:
        getattr(mixer, name).data = getattr(mixer, name).data.float()
    assert mixer.filter(*filter_args).dtype == torch.float32
    low = mixer(x.bfloat16())
    assert torch.isfinite(low).all() and rel_error(low, reference) < 3e-2


# -- the operator and its decoding forms ------------------------------------------------------
@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("groups", [None, 4])
def test_operator_matches_naive_reference(kind, groups):
    mixer = make(kind, filter_groups=groups)
    x = torch.randn(2, 21, D, dtype=torch.float64)
    assert rel_error(mixer(x), naive_operator(mixer, x)) < 1e-12


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("groups", [None, 4])
def test_chunked_prefill_and_steps_equal_forward(kind, groups):
    mixer = make(kind, filter_groups=groups)
    x = torch.randn(2, 40, D, dtype=torch.float64)
    state = mixer.allocate_state(2, 40, torch.device("cpu"), torch.float64)
    chunks = [mixer.prefill(x[:, a:b], state) for a, b in ((0, 1), (1, 3), (3, 25))]
    chunks += [mixer.step(x[:, t:t + 1], state) for t in range(25, 40)]
    assert rel_error(torch.cat(chunks, 1), mixer(x)) < 1e-10


@pytest.mark.parametrize("kind", list(KINDS))
def test_state_bytes_and_flops(kind):
    mixer = make(kind, filter_groups=8)
    for dtype in (torch.bfloat16, torch.float32, torch.float64):
        state = mixer.allocate_state(3, 64, torch.device("cpu"), dtype)
        held = sum(t.numel() * t.element_size() for t in (state.short, state.long))
        assert mixer.state_bytes(3, 64, dtype) == held
    proj = 2 * D * 3 * D + 2 * D * D
    assert mixer.flops_per_token(64) > proj + 2 * 3 * 3 * D
    if getattr(mixer, "direct", False):  # constant per token, 2 FLOPs per tap and channel
        L = mixer.cfg.filter_len
        assert mixer.flops_per_token(64) == proj + 2 * 3 * 3 * D + 2 * D + 2 * L * D
    elif kind == "hyena_li":  # the recurrence: 12 FLOPs per mode, channel and token
        N = mixer.cfg.state_size
        assert mixer.flops_per_token(64) == mixer.flops_per_token(4096) \
            == proj + 2 * 3 * 3 * D + 2 * D + 12 * N * D
    else:  # FFT: grows like log T per token
        assert mixer.flops_per_token(4096) > mixer.flops_per_token(64)


@pytest.mark.parametrize("kind", ["hyena_se", "hyena_mr"])
def test_explicit_filters_convolve_by_length(kind, monkeypatch):
    """SE and MR convolve directly up to DIRECT_MAX_TAPS taps and by FFT beyond, whatever
    their kind; both ways compute the same function, packed documents included."""
    import stripes.arch.hyena as hyena

    mixer = make(kind, filter_len=9)
    x = torch.randn(2, 24, D, dtype=torch.float64)
    doc_ids = torch.tensor([[0] * 10 + [1] * 14, [0] * 24])
    assert mixer.direct and mixer.packs_documents
    direct = mixer(x), mixer(x, doc_ids)
    monkeypatch.setattr(hyena, "DIRECT_MAX_TAPS", 8)
    assert not mixer.direct and not mixer.packs_documents
    assert mixer.train_conv is hyena.fft_causal_conv
    for a, b in zip(direct, (mixer(x), mixer(x, doc_ids)), strict=True):
        assert rel_error(a, b) < 1e-10


@pytest.mark.parametrize("kind", ["hyena_se", "hyena_mr"])
def test_grouped_filters_convolve_by_matmul(kind, monkeypatch):
    """Groups of 16 channels take the block-Toeplitz kernel from TOEPLITZ_MIN_TAPS to
    TOEPLITZ_MAX_TAPS taps, keeping packed documents apart; the FFT beyond computes the same
    function."""
    import stripes.arch.hyena as hyena

    monkeypatch.setattr(hyena, "use_triton", lambda *t: True)  # as on CUDA: the kernel's
    # public function still runs its CPU fallback on these float64 tensors
    assert not make(kind, filter_len=hyena.TOEPLITZ_MIN_TAPS - 1, filter_groups=2).by_matmul
    mixer = make(kind, filter_len=20, filter_groups=D // 16)
    calls = []
    real = hyena.toeplitz_gated_conv
    monkeypatch.setattr(hyena, "toeplitz_gated_conv",
                        lambda *a: calls.append(a[3].shape) or real(*a))
    x = torch.randn(2, 24, D, dtype=torch.float64)
    doc_ids = torch.tensor([[0] * 10 + [1] * 14, [0] * 24])
    assert mixer.by_matmul and mixer.direct and mixer.packs_documents
    by_matmul = mixer(x), mixer(x, doc_ids)
    assert calls == [(D // 16, 20)] * 2  # the [G, L] filter, never spread to [D, L]
    monkeypatch.setattr(hyena, "TOEPLITZ_MAX_TAPS", 19)
    monkeypatch.setattr(hyena, "DIRECT_MAX_TAPS", 19)
    assert not mixer.by_matmul and not mixer.packs_documents
    for a, b in zip(by_matmul, (mixer(x), mixer(x, doc_ids)), strict=True):
        assert rel_error(a, b) < 1e-10
    assert len(calls) == 2
    monkeypatch.setattr(hyena, "use_triton", lambda *t: False)  # off CUDA: the old paths
    monkeypatch.setattr(hyena, "TOEPLITZ_MAX_TAPS", 512)
    assert not mixer.by_matmul


# -- configuration ----------------------------------------------------------------------------
@pytest.mark.parametrize("kind, key, value", [
    ("hyena_se", "filter_len", 0),
    ("hyena_mr", "filter_len", -3),
    ("hyena_li", "state_size", 0),
    ("hyena_se", "short_len", 0),
    ("hyena_li", "filter_groups", 5),
    ("hyena_mr", "filter_groups", 0),
])
def test_config_errors_name_the_key(kind, key, value):
    cfg = ModelConfig(d_model=D, n_layers=1, vocab_size=11, stripes=[kind],
                      mixers={kind: {key: value}})
    with pytest.raises(ConfigError) as err:
        cfg.expand()
    assert err.value.key == f"model.mixers.{kind}.{key}"
