"""Every mixer kind honours the same contract (arch/mixer.py), checked on a 2-layer model.

Kind-specific equivalences (parallel == recurrent == chunkwise, FFT == direct, SSD == scan)
live in each kind's own test file; this file checks what all kinds share.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from stripes.arch import ModelConfig, StripedLM

from numerics import rel_error

# Small settings per kind, so each model runs in well under a second on CPU.
KINDS = {
    "attn": {"n_heads": 4, "n_kv_heads": 2},
    "attn_window": {"kind": "attn", "n_heads": 4, "window": 5},
    "hyena_se": {},
    "hyena_mr": {"filter_len": 16},
    "hyena_li": {"state_size": 8},
    "mamba": {"d_state": 16, "head_dim": 16, "expand": 2, "chunk_size": 8},
    "retention": {"n_heads": 4, "chunk_size": 8},
}


def config(name: str) -> ModelConfig:
    return ModelConfig(d_model=64, n_layers=2, vocab_size=97, max_seq_len=64, stripes=[name],
                       mixers={name: dict(KINDS[name])})


def build(name: str, dtype=torch.float64) -> StripedLM:
    torch.manual_seed(0)
    model = StripedLM(config(name)).to(dtype)
    model.init_weights()
    return model


def tokens(B=2, T=37, seed=1, vocab=97) -> torch.Tensor:
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


def tensor_bytes(state) -> int:
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if dataclasses.is_dataclass(state):
        state = [getattr(state, f.name) for f in dataclasses.fields(state)]
    elif isinstance(state, dict):
        state = list(state.values())
    if isinstance(state, list | tuple):
        return sum(tensor_bytes(s) for s in state)
    return 0


kinds = pytest.mark.parametrize("name", list(KINDS))


@kinds
@pytest.mark.parametrize("prompt", [1, 6, 23])
def test_prefill_then_steps_reproduce_forward(name, prompt):
    model = build(name)
    ids = tokens()
    state = model.allocate_state(2, ids.shape[1])
    out = [model.prefill(ids[:, :prompt], state)]
    out += [model.step(ids[:, t:t + 1], state) for t in range(prompt, ids.shape[1])]
    assert rel_error(torch.cat(out, 1), model(ids)) < 1e-10


@kinds
def test_prefill_continues_from_a_filled_state(name):
    model = build(name)
    ids = tokens()
    state = model.allocate_state(2, ids.shape[1])
    out = [model.prefill(ids[:, a:b], state) for a, b in ((0, 5), (5, 6), (6, 30), (30, 37))]
    assert rel_error(torch.cat(out, 1), model(ids)) < 1e-10


@kinds
def test_training_forward_equals_the_no_grad_forward(name):
    # With grad, projections of one input run as one matmul (arch/projection.py).
    model = build(name)
    ids = tokens()
    with torch.no_grad():
        separate = model(ids)
    assert rel_error(model(ids), separate) < 1e-13


@kinds
def test_causal(name):
    model = build(name)
    ids = tokens()
    changed = ids.clone()
    changed[:, 20:] = (changed[:, 20:] + 1) % 97
    a, b = model(ids), model(changed)
    assert rel_error(a[:, :20], b[:, :20]) < 1e-14
    assert not torch.allclose(a[:, 20:], b[:, 20:])


@kinds
def test_packed_documents_equal_separate(name):
    model = build(name)
    a, b, c = tokens(1, 9, 2), tokens(1, 17, 3), tokens(1, 5, 4)
    doc_ids = torch.tensor([[0] * 9 + [1] * 17 + [0] * 5])  # a change of index starts a doc
    packed = model(torch.cat((a, b, c), dim=1), doc_ids)
    assert rel_error(packed[:, :9], model(a)) < 1e-10
    assert rel_error(packed[:, 9:26], model(b)) < 1e-10
    assert rel_error(packed[:, 26:], model(c)) < 1e-10


@kinds
def test_gradients_reach_every_parameter(name):
    model = build(name, torch.float32)
    ids = tokens()
    model.loss(ids[:, :-1], ids[:, 1:]).backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, pname


@kinds
def test_bf16_autocast_stays_near_float32(name):
    model = build(name, torch.float32)
    ids = tokens()
    reference = model(ids)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = model(ids)
    assert rel_error(low, reference) < 3e-2


@kinds
def test_meta_build_accounting_and_declared_names(name):
    with torch.device("meta"):
        model = StripedLM(config(name))
    model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))  # whatever init_weights forgets stays NaN
    model.init_weights()
    for pname, p in model.named_parameters():
        assert torch.isfinite(p).all(), f"{pname} is not set by init_weights"
    params = dict(model.named_parameters())
    for declared in model.fp32_parameter_names() + model.no_decay_parameter_names():
        assert declared in params, declared
    assert model.flops_per_token(64) > 0
    mixer = model.blocks[0].mixer
    state = mixer.allocate_state(3, 64, torch.device("cpu"), torch.bfloat16)
    assert mixer.state_bytes(3, 64, torch.bfloat16) == tensor_bytes(state)
