"""Sampling with the decoding protocol: one prefill of the prompt, then one `step` per token.

Every mixer decodes from its recurrent state (KV cache, conv/modal/SSM/retention state), so
the cost per new token does not grow with the text for the recurrent kinds.
"""

from __future__ import annotations

import torch

from stripes.arch.model import StripedLM


@torch.no_grad()
def generate(model: StripedLM, prompt: torch.Tensor, max_new_tokens: int,
             temperature: float = 1.0, top_k: int | None = None,
             generator: torch.Generator | None = None,
             stop_token: int | None = None) -> torch.Tensor:
    """prompt: [B, T] token ids -> [B, T + n] with n <= max_new_tokens new tokens.

    temperature 0 is greedy decoding. Generation stops early when every row has produced
    `stop_token`; rows that stopped keep emitting it."""
    B, T = prompt.shape
    state = model.allocate_state(B, T + max_new_tokens)
    logits = model.prefill(prompt, state)[:, -1]  # [B, V]
    tokens, done = [], torch.zeros(B, dtype=torch.bool, device=prompt.device)
    for i in range(max_new_tokens):
        next_token = _pick(logits.float(), temperature, top_k, generator)  # [B]
        if stop_token is not None:
            next_token = torch.where(done, stop_token, next_token)
            done |= next_token == stop_token
        tokens.append(next_token)
        if bool(done.all()) or i == max_new_tokens - 1:
            break
        logits = model.step(next_token[:, None], state)[:, -1]
    return torch.cat((prompt, torch.stack(tokens, dim=1)), dim=1)


def _pick(logits: torch.Tensor, temperature: float, top_k: int | None,
          generator: torch.Generator | None) -> torch.Tensor:
    """logits [B, V] -> token ids [B]: argmax at temperature 0, else a sample."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k is not None:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]
