"""`retention`: parallel == recurrent == chunkwise, the decay schedule, the module against a
reference written from the paper's equations, config errors, FLOPs."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from stripes.arch import ModelConfig
from stripes.arch.retention import Retention, RetentionConfig, log_decays
from stripes.arch.retention_forms import (
    retention_chunkwise,
    retention_parallel,
    retention_recurrent,
)
from stripes.arch.rope import rope_angles
from stripes.core.config import ConfigError
from stripes.kernels.rotary.reference import apply_rotary

from numerics import rel_error

B, T, H, DK, DV = 2, 19, 3, 4, 6
CHUNKS = [1, 3, 8, 16, 40]  # 40 > T: a single short chunk


def inputs(dtype=torch.float64, seed=0):
    """q, k [B, T, H, Dk]; v [B, T, H, Dv]; log decays [H]; an initial state [B, H, Dk, Dv]."""
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(B, T, H, DK, generator=g, dtype=torch.float64) for _ in range(2))
    v = torch.randn(B, T, H, DV, generator=g, dtype=torch.float64)
    state = torch.randn(B, H, DK, DV, generator=g, dtype=torch.float64)
    # Fast, medium and slow decays, so old tokens and the initial state both matter.
    log_decay = torch.log(torch.tensor([0.5, 0.9, 0.999], dtype=torch.float64))
    return *(t.to(dtype) for t in (q, k, v)), log_decay, state.to(dtype)


def definition(q, k, v, log_decay, state):
    """o_t = sum_{s<=t} gamma^(t-s) (q_t . k_s) v_s + gamma^(t+1) q_t S_init, term by term."""
    gamma = log_decay.exp()  # [H]
    o = torch.zeros(*q.shape[:3], v.shape[-1], dtype=q.dtype)
    for t in range(q.shape[1]):
        for s in range(t + 1):
            score = (q[:, t] * k[:, s]).sum(-1) * gamma ** (t - s)  # [B, H]
            o[:, t] += score[..., None] * v[:, s]
        o[:, t] += gamma[:, None] ** (t + 1) * torch.einsum("bhd,bhde->bhe", q[:, t], state)
    return o


def test_parallel_form_matches_the_definition():
    q, k, v, log_decay, state = inputs()
    o, _ = retention_parallel(q, k, v, log_decay, state)
    assert rel_error(o, definition(q, k, v, log_decay, state)) < 1e-12


@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("chunk", CHUNKS)
def test_three_forms_agree_float64(chunk, with_state):
    q, k, v, log_decay, state = inputs()
    state = state if with_state else None
    o_par, s_par = retention_parallel(q, k, v, log_decay, state, return_state=True)
    o_rec, s_rec = retention_recurrent(q, k, v, log_decay, state, return_state=True)
    o_chk, s_chk = retention_chunkwise(q, k, v, log_decay, chunk, state, return_state=True)
    assert rel_error(o_rec, o_par) < 1e-10 and rel_error(s_rec, s_par) < 1e-10
    assert rel_error(o_chk, o_par) < 1e-10 and rel_error(s_chk, s_par) < 1e-10


@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("chunk", CHUNKS)
def test_three_forms_in_float32_match_float64(chunk, with_state):
    q, k, v, log_decay, state = inputs()
    state = state if with_state else None
    o_ref, s_ref = retention_parallel(q, k, v, log_decay, state, return_state=True)
    q32, k32, v32 = q.float(), k.float(), v.float()
    s32 = None if state is None else state.float()
    forms = {
        "parallel": lambda: retention_parallel(q32, k32, v32, log_decay.float(), s32, True),
        "recurrent": lambda: retention_recurrent(q32, k32, v32, log_decay.float(), s32, True),
        "chunkwise": lambda: retention_chunkwise(q32, k32, v32, log_decay.float(), chunk, s32,
                                                 True),
    }
    for name, run in forms.items():
        o, s = run()
        assert o.dtype == torch.float32 and s.dtype == torch.float32, name
        assert rel_error(o, o_ref) < 1e-5 and rel_error(s, s_ref) < 1e-5, name


def test_paper_schedule_up_to_sixteen_heads():
    for n_heads in (1, 4, 16):
        expected = [math.log1p(-(2.0 ** (-5 - h))) for h in range(n_heads)]
        assert log_decays(n_heads, 20.0) == tuple(expected)


def test_every_one_of_32_heads_decays():
    # The paper's schedule in float32 has heads that never decay: the trap this avoids.
    assert torch.tensor(1 - 2.0 ** (-5 - 31), dtype=torch.float32) == 1.0
    cfg = RetentionConfig(n_heads=32)
    cfg.validate(64, "retention")
    mixer = Retention(64, cfg)
    log_decay = mixer._log_decay(torch.zeros((), dtype=torch.float32))  # [32] float32
    assert (log_decay < 0).all() and (log_decay.exp() < 1).all()
    assert math.isclose(log_decay[-1].exp().item(), 1 - 2.0**-20, rel_tol=1e-9)
    # One old token (t = 0) and nothing after it: in float32, each head's read-out of that
    # token, gamma_h^t, must strictly shrink at every step.
    steps, dk, dv = 12, 2, 1
    k = torch.zeros(1, steps, 32, dk)
    v = torch.zeros(1, steps, 32, dv)
    k[:, 0, :, 0], v[:, 0] = 1.0, 1.0
    q = torch.zeros(1, steps, 32, dk)
    q[..., 0] = 1.0
    o, _ = retention_recurrent(q, k, v, log_decay)  # [1, steps, 32, 1]
    readout = o[0, :, :, 0]  # [steps, 32]
    assert (readout[1:] < readout[:-1]).all()


def test_decay_exponents_spread_below_the_cap():
    exps = [-math.log2(-math.expm1(lg)) for lg in log_decays(32, 20.0)]
    assert math.isclose(exps[0], 5.0) and math.isclose(exps[-1], 20.0, rel_tol=1e-9)
    gaps = [b - a for a, b in zip(exps, exps[1:], strict=False)]
    assert all(math.isclose(gap, 15 / 31, rel_tol=1e-6) for gap in gaps)


# -- the module ---------------------------------------------------------------------------------
D = 32


def make(**kw) -> Retention:
    torch.manual_seed(0)
    cfg = RetentionConfig(**{"n_heads": 4, "chunk_size": 5, **kw})
    cfg.validate(D, "retention")
    mixer = Retention(D, cfg).double()
    mixer.init_weights(0.2, 0.2)
    with torch.no_grad():  # a non-trivial GroupNorm weight, so its use is checked
        mixer.norm_weight.uniform_(0.5, 1.5)
    return mixer


def reference(mixer: Retention, x: torch.Tensor) -> torch.Tensor:
    """Eq. 5, 8, 9 written out: rotated q, k; the definition; per-head GroupNorm; swish gate."""
    B_, T_, _ = x.shape
    H_, dk, dv = mixer.n_heads, mixer.head_dim, mixer.head_value_dim
    q = (x @ mixer.q_proj.weight.T).view(B_, T_, H_, dk)
    k = (x @ mixer.k_proj.weight.T).view(B_, T_, H_, dk)
    v = (x @ mixer.v_proj.weight.T).view(B_, T_, H_, dv)
    cos, sin = rope_angles(torch.arange(T_), dk, mixer.cfg.rope, torch.float64)
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin) / math.sqrt(dk)
    log_decay = torch.tensor([math.log1p(-(2.0 ** (-5 - h))) for h in range(H_)],
                             dtype=torch.float64)
    o = definition(q, k, v, log_decay, torch.zeros(B_, H_, dk, dv, dtype=torch.float64))
    mean = o.mean(-1, keepdim=True)
    var = o.var(-1, unbiased=False, keepdim=True)
    normed = ((o - mean) / torch.sqrt(var + mixer.cfg.norm_eps)).reshape(B_, T_, -1)
    normed = normed * mixer.norm_weight
    gate = x @ mixer.g_proj.weight.T
    return (gate * torch.sigmoid(gate) * normed) @ mixer.out_proj.weight.T


@pytest.mark.parametrize("form", ["chunkwise", "parallel"])
def test_module_matches_reference(form):
    mixer = make(form=form)
    x = torch.randn(2, 13, D, dtype=torch.float64)
    assert rel_error(mixer(x), reference(mixer, x)) < 1e-12


def test_parallel_and_chunkwise_modules_agree():
    chunkwise, parallel = make(form="chunkwise"), make(form="parallel")
    x = torch.randn(2, 23, D, dtype=torch.float64)
    doc_ids = torch.tensor([[0] * 10 + [1] * 13, [0] * 23])
    assert rel_error(chunkwise(x), parallel(x)) < 1e-10
    assert rel_error(chunkwise(x, doc_ids), parallel(x, doc_ids)) < 1e-10


def test_meta_build_keeps_the_decays():
    mixer = make()
    with torch.device("meta"):
        on_meta = Retention(D, mixer.cfg)
    on_meta = on_meta.to_empty(device="cpu").double()
    on_meta.init_weights(0.2, 0.2)
    on_meta.load_state_dict(mixer.state_dict())  # strict: the decays are not weights
    x = torch.randn(2, 11, D, dtype=torch.float64)
    assert rel_error(on_meta(x), mixer(x)) < 1e-14


def test_bf16_decoding_keeps_a_float32_state():
    mixer = make()
    x = torch.randn(1, 12, D, dtype=torch.float64)
    expected = mixer(x)
    low = mixer.to(torch.bfloat16)
    state = low.allocate_state(1, 12, torch.device("cpu"), torch.bfloat16)
    assert state.memory.dtype == torch.float32
    xb = x.to(torch.bfloat16)
    out = [low.prefill(xb[:, :7], state)] + [low.step(xb[:, t:t + 1], state) for t in range(7, 12)]
    assert state.memory.dtype == torch.float32 and state.length == 12
    assert rel_error(torch.cat(out, 1), expected) < 3e-2


@pytest.mark.parametrize("form", ["chunkwise", "parallel"])
def test_flops_match_counted_matmuls(form):
    mixer = make(form=form).float()
    x = torch.randn(2, 20, D)  # a multiple of chunk_size=5: no padded chunk is counted
    with FlopCounterMode(display=False) as counter:
        mixer(x)
    assert counter.get_total_flops() == mixer.flops_per_token(20) * x.shape[0] * x.shape[1]


@pytest.mark.parametrize("bad, key", [
    ({"n_heads": 5}, "retention.n_heads"),  # does not divide 32
    ({"n_heads": 32}, "retention.n_heads"),  # key head size 1: odd, cannot rotate
    ({"form": "fft"}, "retention.form"),
    ({"chunk_size": 0}, "retention.chunk_size"),
    ({"value_factor": 1.1}, "retention.value_factor"),  # 35.2 channels
    ({"max_decay_exponent": 36.0}, "retention.max_decay_exponent"),
    ({"norm_eps": 0.0}, "retention.norm_eps"),
])
def test_config_errors_name_the_key(bad, key):
    with pytest.raises(ConfigError) as err:
        RetentionConfig(**{"n_heads": 4, **bad}).validate(D, "retention")
    assert err.value.key == key


def test_model_config_reports_the_full_key():
    cfg = ModelConfig(d_model=D, n_layers=1, vocab_size=11, stripes=["retention"],
                      mixers={"retention": {"n_heads": 4, "form": "fft"}})
    with pytest.raises(ConfigError, match=r"model\.mixers\.retention\.form='fft'"):
        cfg.expand()
