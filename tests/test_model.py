"""StripedLM on the tiny hybrid: decoding == forward, causality, init, gradients, precision."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from stripes.arch import StripedLM

from numerics import rel_error


def build(cfg, dtype=torch.float64) -> StripedLM:
    torch.manual_seed(0)
    model = StripedLM(cfg).to(dtype)
    model.init_weights()
    return model


def tokens(cfg, B=2, T=40, seed=1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg.vocab_size, (B, T), generator=g)


@pytest.mark.parametrize("prompt", [1, 5, 20])  # the tiny window is 8: 20 wraps the ring
def test_prefill_then_steps_reproduce_forward(tiny_cfg, prompt):
    model = build(tiny_cfg)
    ids = tokens(tiny_cfg)
    full = model(ids)
    state = model.allocate_state(batch_size=2, max_len=ids.shape[1])
    logits = [model.prefill(ids[:, :prompt], state)]
    for t in range(prompt, ids.shape[1]):
        logits.append(model.step(ids[:, t : t + 1], state))
    assert rel_error(torch.cat(logits, dim=1), full) < 1e-12


def test_chunked_prefill_matches_forward(tiny_cfg):
    model = build(tiny_cfg)
    ids = tokens(tiny_cfg, T=30)
    state = model.allocate_state(2, 30)
    chunks = [model.prefill(ids[:, a:b], state) for a, b in ((0, 3), (3, 14), (14, 30))]
    assert rel_error(torch.cat(chunks, dim=1), model(ids)) < 1e-12


def test_decoding_past_max_len_is_refused(tiny_cfg):
    model = build(tiny_cfg)
    state = model.allocate_state(1, 4)
    model.prefill(tokens(tiny_cfg, B=1, T=4), state)
    with pytest.raises(ValueError, match="max_len=4"):
        model.step(tokens(tiny_cfg, B=1, T=1), state)


def test_causal(tiny_cfg):
    model = build(tiny_cfg)
    ids = tokens(tiny_cfg)
    changed = ids.clone()
    changed[:, 25:] = (changed[:, 25:] + 1) % tiny_cfg.vocab_size
    a, b = model(ids), model(changed)
    assert rel_error(a[:, :25], b[:, :25]) < 1e-14  # FFT convolutions mix in rounding only
    assert not torch.allclose(a[:, 25:], b[:, 25:])


def test_packed_documents_equal_separate(tiny_cfg):
    model = build(tiny_cfg)
    a, b = tokens(tiny_cfg, B=1, T=11, seed=2), tokens(tiny_cfg, B=1, T=17, seed=3)
    doc_ids = torch.tensor([[0] * 11 + [1] * 17])
    packed = model(torch.cat((a, b), dim=1), doc_ids)
    assert rel_error(packed[:, :11], model(a)) < 1e-12
    assert rel_error(packed[:, 11:], model(b)) < 1e-12


def test_meta_build_then_init(tiny_cfg):
    with torch.device("meta"):
        model = StripedLM(tiny_cfg)
    assert all(p.is_meta for p in model.parameters())
    model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))  # whatever init_weights forgets stays NaN
    torch.manual_seed(0)
    model.init_weights()
    for name, p in model.named_parameters():
        assert torch.isfinite(p).all(), f"{name} is not set by init_weights"
    assert torch.equal(model.norm.weight, torch.ones_like(model.norm.weight))
    attn = next(b.mixer for b in model.blocks if b.kind == "attn")
    # Residual-writing projections are depth-scaled: std / sqrt(2 * n_layers) = std / 2.83.
    ratio = attn.out_proj.weight.std() / attn.q_proj.weight.std()
    assert 0.25 < ratio < 0.45


def test_gradients_reach_every_parameter(tiny_cfg):
    model = build(tiny_cfg, torch.float32)
    ids = tokens(tiny_cfg)
    model.loss(ids[:, :-1], ids[:, 1:]).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_loss_ignores_masked_targets(tiny_cfg):
    model = build(tiny_cfg, torch.float32)
    ids = tokens(tiny_cfg)
    targets = ids[:, 1:].clone()
    targets[:, :10] = -100
    logits = model(ids[:, :-1])
    expected = F.cross_entropy(logits[:, 10:].flatten(0, 1), ids[:, 11:].flatten())
    assert torch.allclose(model.loss(ids[:, :-1], targets), expected)


def test_bf16_autocast_stays_near_float32(tiny_cfg):
    model = build(tiny_cfg, torch.float32)
    ids = tokens(tiny_cfg)
    reference = model(ids)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = model(ids)
    assert low.dtype == torch.bfloat16
    assert rel_error(low, reference) < 3e-2  # bf16 keeps 8 bits of mantissa: ~4e-3 per op


def test_tied_embeddings_share_the_matrix(tiny_cfg):
    untied = StripedLM(tiny_cfg)
    tiny_cfg.tie_embeddings = True
    tied = StripedLM(tiny_cfg)
    assert tied.lm_head is None
    assert untied.num_params() - tied.num_params() == tiny_cfg.vocab_size * tiny_cfg.d_model


def test_no_decay_names(tiny_cfg):
    model = StripedLM(tiny_cfg)
    names = set(model.no_decay_parameter_names())
    assert "embed.weight" in names and "norm.weight" in names
    assert "blocks.0.mixer_norm.weight" in names
    assert "blocks.3.mixer.q_proj.weight" not in names  # attn
    assert "blocks.1.mixer.A_log" in names  # mamba declares it
    fp32 = set(model.fp32_parameter_names())
    assert {"blocks.1.mixer.A_log", "blocks.5.mixer.log_rate"} <= fp32
    assert not any(name.startswith("blocks.3.") for name in fp32)  # attention declares none
