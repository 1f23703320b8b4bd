"""Decoding as CUDA graph replays (arch/generate.py) gives the eager steps' tokens and
logits, for every mixer kind, in float32 and in bf16."""

from __future__ import annotations

import pytest
import torch

from stripes.arch import ArchFile, StripedLM
from stripes.arch.generate import GenerationStats, generate
from stripes.core.config import load_config

from conftest import TINY
from numerics import rel_error

pytestmark = pytest.mark.gpu


def build(dtype: torch.dtype) -> StripedLM:
    cfg = load_config(ArchFile, TINY).model
    torch.manual_seed(0)
    model = StripedLM(cfg).cuda()
    model.init_weights()
    return model.to(dtype).eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_graph_replays_give_the_eager_tokens(dtype):
    model = build(dtype)
    prompt = torch.randint(0, 256, (4, 11), device="cuda",
                           generator=torch.Generator("cuda").manual_seed(0))
    stats = GenerationStats()
    graphed = generate(model, prompt, 24, temperature=0, cuda_graph=True, stats=stats)
    eager = generate(model, prompt, 24, temperature=0, cuda_graph=False)
    assert torch.equal(graphed, eager)  # past the sliding window's wrap (window 8) too
    assert stats.new_tokens == 24


def test_graph_logits_follow_the_eager_steps():
    from stripes.arch.generate import _GraphedStep

    model = build(torch.float32)
    prompt = torch.randint(0, 256, (2, 5), device="cuda")
    tokens = torch.randint(0, 256, (2, 12), device="cuda")
    eager_state, graph_state = model.allocate_state(2, 20), model.allocate_state(2, 20)
    model.prefill(prompt, eager_state)
    model.prefill(prompt, graph_state)
    model.track_position_on_device(graph_state)
    step = _GraphedStep(model, graph_state)
    for t in range(tokens.shape[1]):
        want = model.step(tokens[:, t:t + 1], eager_state)[:, -1]
        got = step(tokens[:, t]).clone()
        assert rel_error(got, want) < 1e-5, t
    assert graph_state.length == eager_state.length == 17
    assert int(graph_state.position) == 17
