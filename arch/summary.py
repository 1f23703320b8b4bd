"""Per-layer accounting of a model: parameters, forward FLOPs per token, decoding state.

Works on a model built on the meta device, so a 70B config is summarised without memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from stripes.arch.model import StripedLM


@dataclass(frozen=True)
class Row:
    name: str  # layer index, or "embed" / "head"
    kind: str
    params: int
    flops_per_token: float
    state_bytes: int


def summarize(model: StripedLM, seq_len: int, batch_size: int = 1,
              dtype: torch.dtype = torch.bfloat16) -> list[Row]:
    """One row per layer plus embedding and head rows; FLOPs are forward, at `seq_len`."""
    def count(module) -> int:
        return sum(p.numel() for p in module.parameters())

    rows = [Row("embed", "embedding", count(model.embed), 0.0, 0)]
    for i, block in enumerate(model.blocks):
        state = block.mixer.state_bytes(batch_size, seq_len, dtype)
        kind = block.kind if block.name == block.kind else f"{block.name} ({block.kind})"
        rows.append(Row(str(i), kind, count(block), block.flops_per_token(seq_len), state))
    head_params = count(model.norm) + (count(model.lm_head) if model.lm_head is not None else 0)
    head_kind = "norm+head (tied)" if model.lm_head is None else "norm+head"
    rows.append(Row("head", head_kind, head_params, model.head_flops_per_token(), 0))
    return rows
