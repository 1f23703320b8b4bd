"""Sampling through prefill/step agrees with the full forward; top-k/top-p cut the choices;
the CLI streams, is seeded and reports tokens/s and the decoding state's memory."""

from __future__ import annotations

import pytest
import torch

from stripes.arch import StripedLM
from stripes.arch.generate import GenerationStats, _pick, generate
from stripes.launch.cli import main

from conftest import save_trained_checkpoint


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


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3]])
    logits = probs.log().expand(4000, 4)
    gen = torch.Generator().manual_seed(0)
    # 0.5 + 0.3 = 0.8 reaches p = 0.8: tokens 1 and 3; at 0.81 token 2 joins them.
    drawn = set(_pick(logits, 1.0, None, 0.8, gen).tolist())
    assert drawn == {1, 3}
    assert set(_pick(logits, 1.0, None, 0.81, gen).tolist()) == {1, 2, 3}
    assert set(_pick(logits, 1.0, None, 1e-6, gen).tolist()) == {1}  # the likeliest only
    counts = torch.bincount(_pick(logits, 1.0, None, 0.8, gen), minlength=4).double()
    assert abs(counts[1] / counts.sum() - 0.5 / 0.8) < 0.03  # renormalised within the set


def test_stats_count_tokens_and_the_state_of_every_mixer(tiny_cfg):
    model = build(tiny_cfg)  # every mixer family, a sliding window among them
    prompt = torch.randint(0, tiny_cfg.vocab_size, (3, 7))
    stats = GenerationStats()
    out = generate(model, prompt, 5, temperature=0, stats=stats)
    assert (stats.batch_size, stats.prompt_tokens, stats.new_tokens) == (3, 7, 5)
    assert out.shape == (3, 12) and stats.prefill_s > 0 and stats.decode_s > 0
    # the tensors actually held equal the mixers' own accounting
    assert stats.state_bytes == model.state_bytes(3, 12, torch.float64) > 0
    assert stats.decode_tokens_per_s == pytest.approx(15 / stats.decode_s)


def test_cli_streams_the_sample_and_reports_its_cost(tmp_path, demo_data, tiny_cfg, capsys):
    tiny_cfg.vocab_size = 4096  # the demo tokenizer's
    save_trained_checkpoint(tmp_path / "run", tiny_cfg, demo_data)
    assert main(["export", str(tmp_path / "run"), str(tmp_path / "out")]) == 0
    capsys.readouterr()
    args = ["generate", str(tmp_path / "out"), "--prompt", "HACKER, n.", "--seed", "3",
            "--max-new-tokens", "12", "--top-p", "0.9"]
    assert main(args) == 0
    first = capsys.readouterr()
    assert main(args) == 0
    assert capsys.readouterr().out == first.out  # seeded: the same text
    assert first.out.startswith("HACKER, n.") and len(first.out) > len("HACKER, n.\n")
    assert "tokens/s" in first.err and "decoding state" in first.err
    # Greedy: the streamed text is the text of the finished sample, in a batch of two too.
    greedy = args[:-2] + ["--temperature", "0", "--max-new-tokens", "40"]
    assert main(greedy) == 0
    streamed = capsys.readouterr().out
    assert main(greedy + ["--num-samples", "2"]) == 0
    batched = capsys.readouterr().out
    assert batched == f"--- sample 0\n{streamed}--- sample 1\n{streamed}"
    # Two prompts of different lengths in one batch: each as it decodes alone.
    assert main(greedy + ["--prompt", "GURU, n. A wizard"]) == 0
    two = capsys.readouterr().out
    other = greedy[:2] + ["--prompt", "GURU, n. A wizard"] + greedy[4:]
    assert main(other) == 0
    assert two == f"--- sample 0\n{streamed}--- sample 1\n{capsys.readouterr().out}"


@pytest.mark.parametrize("flag, value", [("--top-p", "0"), ("--top-p", "1.5"),
                                         ("--temperature", "-1"), ("--max-new-tokens", "0")])
def test_cli_bad_numbers_are_one_line(tmp_path, capsys, flag, value):
    save_trained_checkpoint(tmp_path / "run")
    assert main(["generate", str(tmp_path / "run"), "--prompt", "x", flag, value]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"stripes generate: error: {flag}=")


def test_fixed_shape_steps_equal_the_host_position_steps(tiny_cfg):
    """The graph-ready step (positions on the device, the whole KV cache masked) computes
    what the usual step does, for every mixer, past the sliding window's wrap (window 8)."""
    from numerics import rel_error

    model = build(tiny_cfg)
    prompt = torch.randint(0, tiny_cfg.vocab_size, (2, 9))
    tokens = torch.randint(0, tiny_cfg.vocab_size, (2, 20))
    states = [model.allocate_state(2, 40) for _ in range(2)]
    for state in states:
        model.prefill(prompt, state)
    model.track_position_on_device(states[1])
    for t in range(tokens.shape[1]):
        usual, fixed = (model.step(tokens[:, t:t + 1], s) for s in states)
        assert rel_error(fixed, usual) < 1e-12, t
    assert int(states[1].position) == states[1].length == 29
    with pytest.raises(ValueError, match="only step may follow"):
        model.prefill(prompt, states[1])


def test_generate_with_fixed_shapes_matches(tiny_cfg):
    model = build(tiny_cfg)
    prompt = torch.randint(0, tiny_cfg.vocab_size, (2, 5))
    for kw in ({"temperature": 0}, {"temperature": 1.0, "top_p": 0.9}):
        runs = [generate(model, prompt, 16, generator=torch.Generator().manual_seed(0),
                         fixed_shapes=fixed, **kw) for fixed in (False, True)]
        assert torch.equal(*runs)
    with pytest.raises(ValueError, match="cuda_graph needs a CUDA device"):
        generate(model, prompt, 4, cuda_graph=True)


def test_fixed_shapes_need_every_mixer_to_declare_them(tiny_cfg, monkeypatch):
    from stripes.arch.hyena import Hyena

    model = build(tiny_cfg)
    assert model.unfixed_step_layers() == []
    monkeypatch.setattr(Hyena, "fixed_shape_step", False)  # as a plugin that never opted in
    assert model.unfixed_step_layers()[:2] == ["0: HyenaSE", "2: HyenaMR"]
    prompt = torch.randint(0, tiny_cfg.vocab_size, (1, 4))
    with pytest.raises(ValueError, match="fixed_shape_step; these do not: 0: HyenaSE"):
        generate(model, prompt, 4, fixed_shapes=True)
    assert generate(model, prompt, 4, temperature=0).shape == (1, 8)  # eager steps still


@pytest.mark.parametrize("fixed_shapes", [False, True])
def test_prompts_of_different_lengths_decode_as_if_alone(tiny_cfg, fixed_shapes):
    model = build(tiny_cfg)
    lengths = [3, 9, 6]
    prompts = [torch.randint(0, tiny_cfg.vocab_size, (1, n)) for n in lengths]
    batch = torch.zeros(3, 9, dtype=torch.long)
    for row, p in enumerate(prompts):
        batch[row, :p.shape[1]] = p[0]
    out = generate(model, batch, 7, temperature=0, prompt_lengths=lengths, stop_token=0,
                   fixed_shapes=fixed_shapes)
    assert out.shape == (3, 16)
    for row, (p, n) in enumerate(zip(prompts, lengths, strict=True)):
        alone = generate(model, p, 7, temperature=0)[0]
        assert torch.equal(out[row, :n + 7], alone), row
        assert (out[row, n + 7:] == 0).all()  # padded with the stop token after its 7
    with pytest.raises(ValueError, match="prompt_lengths"):
        generate(model, batch, 2, prompt_lengths=[3, 10, 6])
