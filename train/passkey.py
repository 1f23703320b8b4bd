"""Passkey retrieval: can the model fetch a few tokens it saw far back in its context?

Each sample is seq_len + 1 tokens of random filler with a marker token and a key
(`key_len` random tokens) at `depth` (the fraction of the context before them), and at the
end the marker again followed by the key:

    filler ... M k1 k2 k3 k4 filler ... filler M k1 k2 k3 k4
               ^ depth x the room                ^ scored: predicted from what came before

Scored by teacher forcing: a sample counts when the model's most likely token is right at
every key position at the end. Tokens, not text, so it needs no tokenizer and runs on any
model: the marker is the vocabulary's last id and filler and keys are drawn from ids
FIRST_ID..vocab-2 (below FIRST_ID are sentencepiece's unk, bos and eos, which text never
contains). A model that learned to copy from its context (induction) solves it at any
distance its mixers carry the key over; chance is (vocab - 1 - FIRST_ID)^-key_len. The
accuracy per depth, measured at each stage's length, shows whether an extended context is
actually used.
"""

from __future__ import annotations

from contextlib import AbstractContextManager

import torch
from torch import nn

FIRST_ID = 3


def min_length(key_len: int) -> int:
    """The shortest seq_len that holds the marked key twice (the last key token is only a
    target, never an input)."""
    return 2 * key_len + 1


def passkey_batch(vocab_size: int, seq_len: int, depth: float, key_len: int, samples: int,
                  generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens [samples, seq_len + 1], keys [samples, key_len]), int64, on the CPU."""
    length = seq_len + 1
    room = length - min_length(key_len) - 1  # the last place the first marker may go
    if room < 0 or vocab_size < FIRST_ID + 3:
        raise ValueError(f"passkey: seq_len {seq_len} is too short for a key of {key_len} "
                         f"tokens (at least {min_length(key_len)}), or vocab {vocab_size} < "
                         f"{FIRST_ID + 3}")
    marker = vocab_size - 1
    tokens = torch.randint(FIRST_ID, marker, (samples, length), generator=generator)
    keys = torch.randint(FIRST_ID, marker, (samples, key_len), generator=generator)
    at = round(depth * room)
    tokens[:, at] = marker
    tokens[:, at + 1:at + 1 + key_len] = keys
    tokens[:, length - key_len - 1] = marker
    tokens[:, length - key_len:] = keys
    return tokens, keys


@torch.no_grad()
def passkey_accuracy(model: nn.Module, vocab_size: int, seq_len: int, depths: list[float],
                     key_len: int, samples: int, micro_batch: int, device: torch.device,
                     autocast: AbstractContextManager, seed: int = 0) -> dict[str, float]:
    """{"depth 0.1": fraction of samples retrieved, ...}. Every rank runs the same samples
    (a sharded model gathers inside the forward), so every rank gets the same numbers."""
    generator = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    result = {}
    try:
        for depth in depths:
            tokens, keys = passkey_batch(vocab_size, seq_len, depth, key_len, samples,
                                         generator)
            hits = 0
            for rows in torch.split(torch.arange(samples), micro_batch):
                batch = tokens[rows].to(device)
                with autocast:
                    logits = model(batch[:, :-1])
                guess = logits[:, -key_len:].argmax(-1).cpu()
                hits += int((guess == keys[rows]).all(1).sum())
            result[f"depth {depth:g}"] = hits / samples
    finally:
        model.train(was_training)
    return result
