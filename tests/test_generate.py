"""Sampling through prefill/step agrees with the full forward."""

from __future__ import annotations

import torch

from stripes.arch import StripedLM
from stripes.arch.generate import generate


def build(cfg) -> StripedLM:
    torch.manual_seed(0)
    model = StripedLM(cfg).double()
    model.init_weights()
    return model


def test_greedy_matches_argmax_of_the_full_forward(tiny_cfg):
    model = build(tiny_cfg)
    prompt = torch.randint(0, tiny_cfg.vocab_size, (2, 9))
    out = generate(model, prompt, max_new_tokens=12, temperature=0)
    assert out.shape == (2, 21) and torch.equal(out[:, :9], prompt)
    for t in range(9, 21):  # each new token is the argmax after everything before it
        assert torch.equal(out[:, t], model(out[:, :t])[:, -1].argmax(-1))


def test_sampling_is_seeded_and_top_k_limits_choices(tiny_cfg):
    model = build(tiny_cfg)
    prompt = torch.randint(0, tiny_cfg.vocab_size, (3, 5))
    draw = lambda seed, **kw: generate(model, prompt, 8, temperature=1.0,
                                       generator=torch.Generator().manual_seed(seed), **kw)
    assert torch.equal(draw(1), draw(1))
    assert not torch.equal(draw(1), draw(2))
    assert torch.equal(draw(3, top_k=1), generate(model, prompt, 8, temperature=0))


def test_stops_when_every_row_emitted_the_stop_token(tiny_cfg):
    model = build(tiny_cfg)
    prompt = torch.randint(0, tiny_cfg.vocab_size, (1, 4))
    first = generate(model, prompt, 1, temperature=0)[0, -1].item()
    out = generate(model, prompt, 10, temperature=0, stop_token=first)
    assert out.shape == (1, 5)
