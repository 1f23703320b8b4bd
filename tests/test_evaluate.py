"""Held-out evaluation: the held-out tail is never trained on, evaluation equals a direct
computation of the loss, and splitting it over ranks changes nothing."""

from __future__ import annotations

from contextlib import nullcontext

import numpy as np
import pytest
import torch
from test_loader import doc_lengths, write_data

from stripes.arch import StripedLM
from stripes.core.config import ConfigError
from stripes.data.loader import LoaderConfig, SourceWeight, TokenDataset
from stripes.train.evaluate import build_eval_set, evaluate, loss_sums

T = 8


@pytest.fixture
def data(tmp_path):
    rng = np.random.default_rng(3)
    layout = {"web": [doc_lengths(rng, n) for n in (301, 250)], "code": [doc_lengths(rng, 173)]}
    write_data(tmp_path / "d", layout, vocab=64)
    return tmp_path / "d"


def dataset(directory, heldout=0.1, **kw) -> TokenDataset:
    sources = [SourceWeight(str(directory), "web", 3.0), SourceWeight(str(directory), "code")]
    return TokenDataset(LoaderConfig(seq_len=T, sources=sources, heldout=heldout, **kw))


def test_heldout_tail_is_never_sampled_for_training(data):
    ds = dataset(data)
    web, code = ds.streams
    # The tail is cut in tokens: web's 551 tokens hold out the last ceil(0.1 x 550) = 55,
    # from token 496: windows of 8 from 62 on; 61 windows end before it; window 61 straddles.
    assert (web.tokens, web.n_windows, web.n_heldout, web.n_samples) == (551, 68, 6, 61)
    assert (code.tokens, code.n_windows, code.n_heldout, code.n_samples) == (173, 21, 1, 19)
    assert (web.first_heldout, code.first_heldout) == (62, 20)
    streams, windows = ds.locate(0, 5000)  # many epochs of both streams
    for s, stream in enumerate(ds.streams):
        assert set(windows[streams == s].tolist()) == set(range(stream.n_samples))
    eval_set = build_eval_set(ds, None, samples=5)
    assert eval_set.names == ["web", "code"]
    assert eval_set.windows.tolist() == [62, 63, 64, 65, 66, 20]  # code holds out only one
    # Held-out windows read like any other: token offsets continue past the trained ones.
    tokens, _ = ds.read_windows(np.array([0]), np.array([62]))
    whole, _ = dataset(data, heldout=0.0).read_windows(np.array([0]), np.array([62]))
    np.testing.assert_array_equal(tokens, whole)


def test_heldout_is_part_of_the_data_fingerprint(data):
    before = dataset(data, heldout=0.0)
    after = dataset(data, heldout=0.1)
    assert before.fingerprint != after.fingerprint
    with pytest.raises(ConfigError, match=r"heldout 0.0 -> 0.1"):
        after.resume_point(before.state(10))
    with pytest.raises(ConfigError, match=r"data.heldout=1.0"):
        dataset(data, heldout=1.0)


def reference(model, ds, eval_set) -> dict[str, float]:
    """Per-source mean token loss, one window at a time, in float64."""
    model64 = model.double()
    out = {}
    for s, name in enumerate(eval_set.names):
        windows = eval_set.windows[eval_set.streams == s]
        tokens, doc_ids = ds.read_windows(np.full(len(windows), s), windows)
        tokens, doc_ids = torch.from_numpy(tokens), torch.from_numpy(doc_ids)
        with torch.no_grad():
            out[name] = float(model64.loss(tokens[:, :-1], tokens[:, 1:], doc_ids))
    model.float()
    return out


def test_evaluation_matches_direct_loss_and_any_split_over_ranks(data, tiny_cfg):
    tiny_cfg.vocab_size = 64
    torch.manual_seed(0)
    model = StripedLM(tiny_cfg)
    model.init_weights()
    ds = dataset(data)
    eval_set = build_eval_set(ds, None, samples=5)  # 6 windows: 5 web + 1 code
    args = (torch.device("cpu"), nullcontext(), True)
    got = evaluate(model, eval_set, 3, 0, 1, *args)
    want = reference(model, ds, eval_set)
    for name in ("web", "code"):
        assert abs(got[name] - want[name]) < 1e-5 * want[name], (name, got, want)
    assert got["loss"] == pytest.approx((3 * got["web"] + got["code"]) / 4, rel=1e-12)
    # 4 ranks over 6 windows: two ranks pad a row that must weigh nothing.
    one_rank = loss_sums(model, eval_set, 3, 0, 1, *args)
    split = [loss_sums(model, eval_set, 2, r, 4, *args) for r in range(4)]
    for i in range(2):
        total = sum(part[i] for part in split)
        torch.testing.assert_close(total, one_rank[i], rtol=1e-6, atol=0)
    assert model.training  # restored after evaluation
    # Without document masking the model sees across packed documents: other numbers.
    unmasked = evaluate(model, eval_set, 3, 0, 1, torch.device("cpu"), nullcontext(), False)
    assert abs(unmasked["web"] - got["web"]) > 1e-4


def test_separate_eval_sources_and_their_errors(data, tmp_path):
    ds = dataset(data, heldout=0.0)
    eval_set = build_eval_set(ds, [SourceWeight(str(data), "code")], samples=100)
    assert eval_set.names == ["code"] and eval_set.windows.tolist() == list(range(21))
    rng = np.random.default_rng(4)
    write_data(tmp_path / "other", {"x": [doc_lengths(rng, 100)]}, vocab=64,
               tokenizer=b"another tokenizer")
    with pytest.raises(ConfigError, match=r"eval.sources=.*tokenizer"):
        build_eval_set(ds, [SourceWeight(str(tmp_path / "other"), "x")], samples=4)
    with pytest.raises(ConfigError, match=r"eval.sources.0.source='nope'"):
        build_eval_set(ds, [SourceWeight(str(data), "nope")], samples=4)


def test_loss_by_position_splits_the_same_tokens(data, tiny_cfg, monkeypatch):
    """Bucketed by context position, the evaluation tokens are the same tokens: the buckets'
    token-weighted mean is the tokens' mean loss; positions count from each document's start
    under document masking and from the window's start without it."""
    import stripes.train.evaluate as evaluate_module
    from stripes.arch.packing import document_positions

    assert evaluate_module.position_edges(300) == [0, 64, 128, 256, 300]
    assert evaluate_module.position_edges(8, first=4) == [0, 4, 8]
    assert evaluate_module.position_edges(40) == [0, 40]
    edges = [0, 2, 4, 8]
    monkeypatch.setattr(evaluate_module, "position_edges", lambda seq_len: edges)
    tiny_cfg.vocab_size = 64
    torch.manual_seed(0)
    model = StripedLM(tiny_cfg)
    model.init_weights()
    eval_set = build_eval_set(dataset(data), None, samples=5)
    _, doc_ids = eval_set.dataset.read_windows(eval_set.streams, eval_set.windows)
    for masking in (True, False):
        args = (model, eval_set, 3, 0, 1, torch.device("cpu"), nullcontext(), masking)
        loss_sum, count = loss_sums(*args)
        both = evaluate_module.evaluate(*args, by_position=True)
        buckets = both.pop("by_position")
        assert both == evaluate_module.evaluate(*args)  # the same passes, the same sums
        assert list(buckets) == ["0-1", "2-3", "4-7"]
        positions = (document_positions(torch.from_numpy(doc_ids)) if masking
                     else torch.arange(T).expand(len(eval_set.windows), T))
        tokens_in = [int(((positions >= lo) & (positions < hi)).sum())
                     for lo, hi in zip(edges[:-1], edges[1:], strict=True)]
        mean = sum(loss * n for loss, n in zip(buckets.values(), tokens_in, strict=True))
        assert mean / sum(tokens_in) == pytest.approx(float(loss_sum.sum() / count.sum()),
                                                      rel=1e-9)


def test_token_losses_in_chunks_equal_the_whole():
    from stripes.train.evaluate import token_losses

    logits = torch.randn(2, 10, 7, generator=torch.Generator().manual_seed(0))
    targets = torch.randint(0, 7, (2, 10), generator=torch.Generator().manual_seed(1))
    whole = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(),
                                              reduction="none").view(2, 10).double()
    assert torch.equal(token_losses(logits, targets, chunk=3), whole)


def test_the_held_out_tokens_are_the_same_at_every_length(data):
    """Stages of different seq_len (train/stages.py) hold out the same tail of tokens: no
    training window of one length reaches a token a held-out window of another reads."""
    first_held, last_trained = [], []
    for seq_len in (4, 8, 16):
        sources = [SourceWeight(str(data), "web")]
        (web,) = TokenDataset(LoaderConfig(seq_len=seq_len, sources=sources,
                                           heldout=0.1)).streams
        first_held.append(web.first_heldout * seq_len)
        last_trained.append(web.n_samples * seq_len)  # the last training target's index
    assert max(last_trained) < min(first_held), (last_trained, first_held)
