"""Passkey retrieval (train/passkey.py): the samples hold the marked key where asked and again
at the end, and the score is right for a model that copies it and for one that cannot."""

from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch
from torch import nn

from stripes.train.passkey import FIRST_ID, min_length, passkey_accuracy, passkey_batch

V = 50


def test_samples_hold_the_key_at_the_depth_and_at_the_end():
    tokens, keys = passkey_batch(V, 40, 0.5, 4, 6, torch.Generator().manual_seed(0))
    assert tokens.shape == (6, 41) and keys.shape == (6, 4)
    assert tokens.min() >= FIRST_ID  # never sentencepiece's unk, bos or eos
    marker = V - 1
    for row, key in zip(tokens, keys, strict=True):
        (first, last) = (row == marker).nonzero().flatten().tolist()  # exactly two markers
        assert last == 41 - 5 and torch.equal(row[last + 1:], key)
        assert torch.equal(row[first + 1:first + 5], key)
        assert first == round(0.5 * (41 - min_length(4) - 1))
    for depth, where in ((0.0, 0), (1.0, 41 - min_length(4) - 1)):
        row = passkey_batch(V, 40, depth, 4, 1, torch.Generator().manual_seed(1))[0][0]
        assert (row == marker).nonzero().flatten().tolist()[0] == where
    with pytest.raises(ValueError, match="too short"):
        passkey_batch(V, min_length(4) - 1, 0.5, 4, 1, torch.Generator())
    passkey_batch(V, min_length(4), 0.5, 4, 1, torch.Generator())  # the shortest that fits


class Copier(nn.Module):
    """Solves the task: after the second marker, predicts what followed the first one."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(*ids.shape, V)
        for b, row in enumerate(ids):
            first, second = (row == V - 1).nonzero().flatten().tolist()
            for t in range(second, ids.shape[1]):
                logits[b, t, row[first + 1 + t - second]] = 1.0
        return logits


class Constant(nn.Module):
    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.zeros(*ids.shape, V)  # argmax 0 everywhere


@pytest.mark.parametrize("model, expected", [(Copier(), 1.0), (Constant(), 0.0)])
def test_accuracy_scores_retrieval(model, expected):
    got = passkey_accuracy(model, V, 30, [0.0, 0.5, 1.0], key_len=3, samples=5, micro_batch=2,
                           device=torch.device("cpu"), autocast=nullcontext())
    assert got == {"depth 0": expected, "depth 0.5": expected, "depth 1": expected}
