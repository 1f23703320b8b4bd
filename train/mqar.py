"""Multi-query associative recall (MQAR): can a mixer look up, later in a sequence, the value
that was paired with a key earlier? Attention does it at small widths; gated convolutions
and recurrences need far more state (Arora et al., 2023, "Zoology"). stripes trains a small
model of any stripe pattern on it and reports the accuracy at the answers.

One sample, seq_len + 1 tokens (inputs are [:-1], targets [1:]):

    k1 v1 k2 v2 ... kP vP | 0 0 k2 v2 0 0 0 k1 v1 0 kP vP 0 ...
    the P pairs             every key queried once, at random, in two-token slots

Keys are P distinct ids from [1, vocab/2), values any ids from [vocab/2, vocab), filler 0.
Only the position of each queried key has a target (its value); every other target is
IGNORE. The value is also the next input, so later queries see earlier answers, as in
Zoology; what is scored is whether the model predicted it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from stripes.core.config import ConfigError, require_positive

IGNORE = -100  # target of every position that is not an answer (cross-entropy ignores it)
FILLER = 0


@dataclass
class MqarTask:
    vocab_size: int = 64  # keys from the first half (without 0), values from the second
    seq_len: int = 64  # inputs per sample; the pairs fill 2 num_pairs of them
    num_pairs: int = 8  # key-value pairs per sample, each queried once

    def validate(self, key: str) -> None:
        for name in ("vocab_size", "seq_len", "num_pairs"):
            require_positive(f"{key}.{name}", getattr(self, name), integer=True)
        if self.num_pairs > self.vocab_size // 2 - 1:
            raise ConfigError(f"{key}.num_pairs", self.num_pairs,
                              f"at most vocab_size / 2 - 1 = {self.vocab_size // 2 - 1}",
                              "keys within a sample are distinct")
        if 4 * self.num_pairs > self.seq_len:
            raise ConfigError(f"{key}.num_pairs", self.num_pairs,
                              f"at most seq_len / 4 = {self.seq_len // 4}",
                              "the pairs and one two-token query slot per pair must fit")


def mqar_batch(task: MqarTask, batch_size: int, generator: torch.Generator
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs [B, seq_len], targets [B, seq_len]) int64 on the CPU."""
    B, P, T = batch_size, task.num_pairs, task.seq_len
    half = task.vocab_size // 2
    keys = torch.rand(B, half - 1, generator=generator).argsort(1)[:, :P] + 1  # distinct
    values = torch.randint(half, task.vocab_size, (B, P), generator=generator)
    tokens = torch.full((B, T + 1), FILLER, dtype=torch.long)
    tokens[:, 0:2 * P:2], tokens[:, 1:2 * P:2] = keys, values
    # Query slots: P of the two-token slots after the pairs, each pair queried once.
    slots = (T + 1 - 2 * P) // 2
    chosen = torch.rand(B, slots, generator=generator).argsort(1)[:, :P]  # [B, P]
    order = torch.rand(B, P, generator=generator).argsort(1)  # which pair each slot asks
    at = 2 * P + 2 * chosen  # [B, P] position of each query key
    rows = torch.arange(B)[:, None]
    tokens[rows, at] = keys.gather(1, order)
    tokens[rows, at + 1] = values.gather(1, order)
    targets = torch.full((B, T), IGNORE, dtype=torch.long)
    targets[rows, at] = values.gather(1, order)
    return tokens[:, :-1], targets


@torch.no_grad()
def mqar_accuracy(model: nn.Module, task: MqarTask, samples: int, batch_size: int,
                  generator: torch.Generator, device: torch.device) -> float:
    """Fraction of answers (over `samples` fresh samples) the model's argmax gets right."""
    was_training = model.training
    model.eval()
    right = total = 0
    try:
        for start in range(0, samples, batch_size):
            inputs, targets = mqar_batch(task, min(batch_size, samples - start), generator)
            guess = model(inputs.to(device)).argmax(-1).cpu()
            answer = targets != IGNORE
            right += int((guess[answer] == targets[answer]).sum())
            total += int(answer.sum())
    finally:
        model.train(was_training)
    return right / total
